"""eval.py's protocol options: the UniLIP code's 256 px resize, and rFID reference statistics computed once."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio

from tests.conftest import compose_eval
from tests.helpers import random_inception_state
from unilip.evaluation.protocols import reconstruct
from unilip.evaluation.run import evaluate
from unilip.models import UniLIPTokenizer


def authors_pad_reconstruction(tokenizer: UniLIPTokenizer, images: torch.Tensor) -> torch.Tensor:
    """DC_AE_ViT_Stage2_Pad's forward (UniLIP tokenizer/modeling/dc_ae_vit_stage2_pad.py), written out from
    its padding / resize_down / remove_padding: [0, 1] in, [0, 1] out (its [-1, 1] output mapped as (y+1)/2)."""
    h, w = images.shape[-2:]
    new_h, new_w = math.ceil(h / 28) * 28, math.ceil(w / 28) * 28
    pad_h, pad_w = new_h - h, new_w - w
    pad_top, pad_left = pad_h // 2, pad_w // 2
    pad_bottom, pad_right = pad_h - pad_top, pad_w - pad_left
    padded = F.pad(images, (pad_left, pad_right, pad_top, pad_bottom), mode="reflect")
    z = tokenizer.encode(padded)  # a multiple of 28: the encoder pads nothing more
    dec = tokenizer.decoder(z)
    _, _, dh, dw = dec.shape
    dec = F.interpolate(dec, size=(round(dh * 28 / 32), round(dw * 28 / 32)), mode="bilinear", align_corners=True)
    _, _, hp, wp = dec.shape
    dec = dec[:, :, pad_top : hp - pad_bottom, pad_left : wp - pad_right]
    return (dec + 1) / 2


def test_reference_resize_equals_the_authors_pad_model(tiny_tokenizer):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ours = reconstruct(tiny_tokenizer, images, "reference")
        theirs = authors_pad_reconstruction(tiny_tokenizer, images)
        project = reconstruct(tiny_tokenizer, images, "project")
        odd = torch.rand(1, 3, 250, 230)
        odd_diff = (
            (reconstruct(tiny_tokenizer, odd, "reference").images - authors_pad_reconstruction(tiny_tokenizer, odd))
            .abs()
            .max()
        )
    assert ours.images.shape == (2, 3, 256, 256)
    assert (ours.images - theirs).abs().max() <= 1e-6 and odd_diff <= 1e-6
    # the option changes something: the project's align_corners=False differs visibly
    assert (project.images - ours.images).abs().max() > 1e-3
    # native sizes (224, 448) are resized the same way under both settings, as the authors' 224/448 models do
    square = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reconstruct(tiny_tokenizer, square, "reference").images, tiny_tokenizer(square))
    with pytest.raises(ValueError, match="protocol_resize"):
        reconstruct(tiny_tokenizer, images, "nearest")


@pytest.fixture
def saved_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok", training={"stage": 1, "encoder_trained": False, "teacher": None})
    return tmp_path / "tok"


def test_eval_with_reference_resize_reports_the_authors_reconstructions(photos_dir, saved_tokenizer, tmp_path):
    cfg = compose_eval(photos_dir, tmp_path / "out", f"ckpt={saved_tokenizer}", "protocol_resize=reference")
    results = evaluate(cfg)
    assert "align_corners=True" in results["protocol"]
    # the same photos through the test's own implementation of the authors' model
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    tokenizer = UniLIPTokenizer.from_pretrained(saved_tokenizer).eval()
    expected = {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            images = batch["image"].float() / 255  # uint8 from the loader
            recon = authors_pad_reconstruction(tokenizer, images).clamp(0, 1)
            for key, x, y in zip(batch["key"], images, recon, strict=True):
                a, b = x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy()
                expected[key] = peak_signal_noise_ratio(a, b, data_range=1.0)
    assert len(expected) == results["images"] == 12
    for record in results["per_image"]:
        assert record["psnr"] == pytest.approx(expected[record["key"]], abs=1e-4)
    with pytest.raises(Exception, match="protocol_resize"):
        evaluate(compose_eval(photos_dir, tmp_path / "bad", f"ckpt={saved_tokenizer}", "protocol_resize=cubic"))


@pytest.fixture
def inception_file(tmp_path, monkeypatch):
    """A randomly initialised Inception of the FID architecture, saved as a weights file (no download)."""
    state = random_inception_state(monkeypatch)
    torch.save(state, tmp_path / "inception.pth")
    return tmp_path / "inception.pth"


def test_rfid_reference_statistics_are_computed_once_and_reused(
    photos_dir, saved_tokenizer, inception_file, tmp_path, monkeypatch
):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from unilip.evaluation import metrics

    # eval.py's FID from the user's weights file, on Inception's 64-d pool features: the same code path as
    # the 2048-d one, without a 2048 x 2048 matrix square root per run on two CPU cores
    def small_fid(weights):
        metrics.build_fid(weights)  # the checks eval.py makes on the file
        return FrechetInceptionDistance(feature=64, normalize=False, feature_extractor_weights_path=str(weights))

    monkeypatch.setattr("unilip.evaluation.run.build_fid", small_fid)
    fed = {"real": 0, "fake": 0}
    update = FrechetInceptionDistance.update

    def counting(self, imgs, real):
        fed["real" if real else "fake"] += imgs.shape[0]
        return update(self, imgs, real)

    monkeypatch.setattr(FrechetInceptionDistance, "update", counting)
    cache = tmp_path / "cache"

    def run(name, *extra):
        fed.update(real=0, fake=0)
        cfg = compose_eval(
            photos_dir, tmp_path / name, f"ckpt={saved_tokenizer}", f"inception_weights={inception_file}", *extra
        )
        return evaluate(cfg), dict(fed)

    first, first_fed = run("first", f"fid_reference_cache={cache}")  # computed (as without a cache) and saved
    assert first_fed == {"real": 12, "fake": 12} and len(list(cache.glob("fid_reference_*.safetensors"))) == 1
    second, second_fed = run("second", f"fid_reference_cache={cache}")
    assert second_fed == {"real": 0, "fake": 12}  # the references were not fed through Inception again
    assert any("read from" in note for note in second["notes"])
    assert math.isfinite(first["rfid"]) and first["rfid"] > 0
    assert second["rfid"] == pytest.approx(first["rfid"], rel=1e-9, abs=1e-9)


def test_the_reference_key_follows_the_set_the_size_and_the_weights(photos_dir, inception_file, tmp_path):
    from unilip.data.shards import expand_urls
    from unilip.evaluation.fid_reference import reference_key, weights_digest

    urls = expand_urls(str(photos_dir / "photos" / "val-*.tar"), "urls")
    digest = weights_digest(inception_file)
    base = reference_key(urls, 256, digest)
    assert reference_key(list(urls), 256, digest) == base  # stable
    assert reference_key(urls, 224, digest) != base  # another crop size
    assert reference_key(urls, 256, "0" * 64) != base  # other Inception weights
    assert reference_key(urls[:-1], 256, digest) != base  # another set of shards
    import shutil

    copies = [shutil.copy(url, tmp_path / Path(url).name) for url in urls]
    before = reference_key(copies, 256, digest)
    with open(copies[0], "ab") as handle:
        handle.write(b"\0" * 512)  # the shard changed (one more tar block)
    assert reference_key(copies, 256, digest) != before
