"""rFID's uint8 images (`quantize=`): truncation by default, as the UniLIP evaluator; rounding, as a saved PNG
holds; or the UniLIP evaluation script's whole path. Each is checked against an independent computation, and
eval.py records which one made its rFID."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_eval
from tests.helpers import random_inception_state
from unilip.evaluation.quantize import QUANTIZE, inception_inputs


def test_truncation_and_rounding_on_hand_values():
    # 255 x for each pixel, and its uint8 by truncation and by rounding, by hand (out of range values clamp)
    scaled = [0.0, 0.3, 0.7, 1.2, 99.49, 99.51, 200.8, 254.6, 255.0, -3.0, 260.0]
    truncated = [0, 0, 0, 1, 99, 99, 200, 254, 255, 0, 255]
    rounded = [0, 0, 1, 1, 99, 100, 201, 255, 255, 0, 255]
    reconstructions = (torch.tensor(scaled) / 255).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    inputs = torch.zeros_like(reconstructions)
    for quantize, expected in (("trunc", truncated), ("round", rounded)):
        real, fake = inception_inputs(inputs, reconstructions, quantize)
        assert fake.dtype == torch.uint8 and fake[0, 0, 0].tolist() == expected, quantize
        assert real.dtype == torch.uint8 and not real.any()


def _fractional_levels(shape, seed=0):
    """[0, 1] images whose 255 x sits 0.1-0.4 or 0.6-0.9 past a level: away from where rounding ties."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 255, shape, generator=generator).float()
    offsets = torch.rand(shape, generator=generator) * 0.3 + 0.1
    offsets = torch.where(torch.rand(shape, generator=generator) < 0.5, offsets, offsets + 0.5)
    return (levels + offsets) / 255


def test_rounding_is_what_a_saved_png_holds_and_truncation_is_the_floor():
    from torchvision.utils import save_image

    reconstructions = _fractional_levels((2, 3, 16, 16))
    _, rounded = inception_inputs(torch.zeros_like(reconstructions), reconstructions, "round")
    _, truncated = inception_inputs(torch.zeros_like(reconstructions), reconstructions, "trunc")
    for index, image in enumerate(reconstructions):
        buffer = io.BytesIO()
        save_image(image, buffer, format="png")  # the PNG torch-fidelity / clean-fid would score
        png = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(rounded[index], png)
    floor = np.floor(reconstructions.numpy().astype(np.float64) * 255)
    assert torch.equal(truncated, torch.from_numpy(floor).to(torch.uint8))
    difference = rounded.int() - truncated.int()
    assert set(difference.unique().tolist()) == {0, 1}  # rounding lifts the upper half of each level by one
    assert 0.4 < difference.float().mean().item() < 0.6


def test_the_reference_path_equals_the_unilip_evaluation_script():
    """The UniLIP evaluation written out from its lines (nnnth/UniLIP 299817d): the loader's ToTensor and
    Normalize, eval_reconstruction's clamp and 8-bit rounding (utils/train_utils_stage2.py l.567-569), then
    VQGANEvaluator.update's conversions (evaluator/evaluator.py l.149 and l.166-173)."""
    from torchvision.transforms import Normalize

    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), generator=generator, dtype=torch.uint8)
    decoded = _fractional_levels((2, 3, 16, 16), seed=2) * 2 - 1  # the decoder's [-1, 1] output
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    loaded = Normalize(mean, std)(pixels.float() / 255)  # what its evaluation loader delivers
    reconstructed = torch.clamp(decoded, -1.0, 1.0)
    reconstructed = (torch.round((reconstructed + 1) / 2 * 255.0) - 127.5) / 127.5
    fake_theirs = ((reconstructed + 1) / 2 * 255).to(torch.uint8)
    real_theirs = (
        (loaded * torch.tensor(std)[None, :, None, None] + torch.tensor(mean)[None, :, None, None]) * 255
    ).to(torch.uint8)

    real, fake = inception_inputs(pixels.float() / 255, (decoded + 1) / 2, "reference")
    assert torch.equal(fake, fake_theirs) and torch.equal(real, real_theirs)
    assert not torch.equal(real, pixels)  # the reference's inputs are not their own levels (some lose one)
    assert ((pixels.int() - real.int()) >= 0).all() and ((pixels.int() - real.int()) <= 1).all()
    real_own, _ = inception_inputs(pixels.float() / 255, (decoded + 1) / 2, "trunc")
    assert torch.equal(real_own, pixels)  # trunc and round feed the inputs' own levels


def test_an_unknown_quantisation_and_a_float_fid_are_refused():
    from unilip.evaluation.module import ReconstructionEvaluation
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    with pytest.raises(ValueError, match="quantize='floor'"):
        inception_inputs(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), "floor")
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny"))

    class FloatFID(torch.nn.Module):
        normalize = True

    with pytest.raises(ValueError, match="normalize=False"):
        ReconstructionEvaluation(tokenizer, fid=FloatFID())
    assert set(QUANTIZE) == {"trunc", "round", "reference"}


@pytest.fixture
def saved_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok", training={"stage": 1, "encoder_trained": False, "teacher": None})
    return tmp_path / "tok"


@pytest.fixture
def recorded_fid(tmp_path, monkeypatch):
    """eval.py's FID on 64-d pool features of a random Inception, recording the uint8 images it is fed."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    state = random_inception_state(monkeypatch)
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    fed: dict[str, list[torch.Tensor]] = {"real": [], "fake": []}
    update = FrechetInceptionDistance.update

    def recording(self, imgs, real):
        fed["real" if real else "fake"].append(imgs.clone())
        return update(self, imgs, real)

    monkeypatch.setattr(FrechetInceptionDistance, "update", recording)
    monkeypatch.setattr(
        "unilip.evaluation.run.build_fid",
        lambda path: FrechetInceptionDistance(feature=64, normalize=False, feature_extractor_weights_path=str(path)),
    )
    return weights, fed


def test_eval_feeds_and_records_the_quantisation_it_used(
    photos_dir, saved_tokenizer, recorded_fid, tmp_path, monkeypatch
):
    """quantize=round through eval.py: Inception is fed the PNGs of the reconstructions (saved and read back
    independently), and results.json, summary.md and the protocol say rounding; the default is truncation."""
    from torchvision.utils import save_image

    from unilip.evaluation import module as evaluation_module
    from unilip.evaluation.run import evaluate

    weights, fed = recorded_fid
    reconstructions = []
    quantise = evaluation_module.inception_inputs

    def recording(images, recon, quantize):
        reconstructions.append(recon.clone())
        return quantise(images, recon, quantize)

    monkeypatch.setattr(evaluation_module, "inception_inputs", recording)
    out = tmp_path / "round"
    overrides = [f"ckpt={saved_tokenizer}", f"inception_weights={weights}", "fid_reference_cache=null"]
    results = evaluate(compose_eval(photos_dir, out, *overrides, "quantize=round"))
    pngs = []
    for image in torch.cat(reconstructions):
        buffer = io.BytesIO()
        save_image(image, buffer, format="png")
        pngs.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"))).permute(2, 0, 1))
    fake = torch.cat(fed["fake"])
    assert fake.dtype == torch.uint8 and torch.equal(fake, torch.stack(pngs))
    assert torch.cat(fed["real"]).dtype == torch.uint8 and len(fake) == results["images"]
    written = json.loads((out / "results.json").read_text())
    assert results["rfid_quantize"] == written["rfid_quantize"] == written["config"]["quantize"] == "round"
    assert "rFID (uint8 by rounding) |" in (out / "summary.md").read_text()
    assert "reconstructions to uint8 by rounding" in written["protocol"]
    assert compose_eval(photos_dir, out, *overrides).quantize == "trunc"  # the default: the UniLIP evaluator's


def test_a_bad_quantize_is_one_line_naming_the_key(photos_dir, saved_tokenizer, tmp_path):
    from unilip.evaluation.run import evaluate
    from unilip.training.config import ConfigError

    with pytest.raises(ConfigError, match="quantize"):
        evaluate(compose_eval(photos_dir, tmp_path / "bad", f"ckpt={saved_tokenizer}", "quantize=floor"))
    assert not (tmp_path / "bad").exists()
