"""eval.py: metrics against independent computations, identity, multi-process, missing weights."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.conftest import compose_eval
from tests.helpers import run_tree
from unilip.evaluation.metrics import PSNR_CAP_DB, build_fid, feature_similarity, psnr, ssim
from unilip.evaluation.run import evaluate
from unilip.models import UniLIPTokenizer
from unilip.models.tokenizer import TokenizerOutput

REPO = Path(__file__).resolve().parents[1]


def _photo_pairs():
    """Real photo crops and degraded copies (noise, blur-like shift), as [0, 1] float tensors."""
    rng = np.random.default_rng(0)
    photos = [skdata.astronaut()[100:196, 150:246], skdata.coffee()[50:146, 200:296], skdata.chelsea()[80:176, 100:196]]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255
    noisy = (x + torch.from_numpy(rng.normal(0, 0.05, x.shape)).float()).clamp(0, 1)
    shifted = torch.roll(x, shifts=1, dims=-1) * 0.9
    return x, torch.cat([noisy[:2], shifted[2:]])


@pytest.mark.parametrize("contrast", [1.0, 0.3])  # 0.3: pixels in [0.2, 0.5], the data range is still 1
def test_psnr_and_ssim_equal_scikit_image(contrast):
    x, y = (0.2 + contrast * t if contrast != 1 else t for t in _photo_pairs())
    ours_psnr, ours_ssim = psnr(x, y), ssim(x, y)
    for i in range(len(x)):
        a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        ref_ssim = structural_similarity(
            a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert abs(ours_psnr[i].item() - ref_psnr) < 1e-3
        assert abs(ours_ssim[i].item() - ref_ssim) < 1e-3


def test_identity_metrics_are_perfect_and_finite():
    x, _ = _photo_pairs()
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    features = torch.randn(3, 16, 48)
    cosine, mse = feature_similarity(features, features)
    assert torch.allclose(cosine, torch.ones(3), atol=1e-6) and torch.equal(mse, torch.zeros(3))


class IdentityTokenizer(UniLIPTokenizer):
    """Reconstructs perfectly: what an eval of a perfect model must report."""

    def reconstruct(self, images):
        out = super().reconstruct(images)
        return TokenizerOutput(images.clone(), out.features, out.latent)


@pytest.fixture
def saved_tokenizer(tiny_config, tmp_path):
    model = UniLIPTokenizer(tiny_config)
    model.save_pretrained(tmp_path / "tok", training={"stage": 1, "encoder_trained": False, "teacher": None})
    return tmp_path / "tok"


def test_eval_of_a_perfect_reconstruction_end_to_end(photos_dir, saved_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("unilip.evaluation.run.load_any_tokenizer", _identity_loader)
    results = evaluate(compose_eval(photos_dir, tmp_path / "out", f"ckpt={saved_tokenizer}"))
    agg = results["aggregate"]
    assert results["images"] == 12  # every held-out photo crop once
    assert agg["psnr"]["mean"] == PSNR_CAP_DB and agg["ssim"]["min"] > 0.9999
    # a stage-1 encoder is the original: the teacher is the evaluated encoder itself
    assert agg["feature_cosine"]["min"] > 0.9999 and agg["feature_mse"]["max"] == 0.0
    written = json.loads((tmp_path / "out" / "results.json").read_text())  # strict JSON: no inf or NaN
    assert written["aggregate"] == agg and len(written["per_image"]) == 12
    assert written["config"]["protocol"] == 256 and "reflect-pad to 280x280" in written["protocol"]
    assert written["complete"] is True and written["skipped"] == {"samples": 0, "shards": 0}
    assert "INCOMPLETE" not in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "reconstructions.png").exists()
    # without Inception / VGG weights: no rFID, no LPIPS, and a note saying so; everything else reported
    assert results["rfid"] is None and "lpips" not in agg
    assert any("rFID not measured" in note for note in results["notes"])
    assert "| rFID | not measured |" in (tmp_path / "out" / "summary.md").read_text()
    # the protocol names what was measured, and only that
    assert "PSNR" in written["protocol"] and "feature fidelity" in written["protocol"]
    assert "rFID" not in written["protocol"] and "LPIPS" not in written["protocol"]


def test_feature_fidelity_of_a_trained_encoder_against_its_original(photos_dir, saved_tokenizer, tmp_path):
    """A stage-2-like tokenizer (encoder changed) is measured against the original encoder its lineage
    names; the per-image cosine equals a direct computation on the same crops (not 1 by construction)."""
    from unilip.data import ShardDataModule

    original = UniLIPTokenizer.from_pretrained(saved_tokenizer).eval()
    trained = UniLIPTokenizer.from_pretrained(saved_tokenizer).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in trained.multi_modal_projector.parameters():
            param.add_(0.3 * torch.randn_like(param) * param.std())
    teacher = {"stage": 2, "encoder_trained": True, "teacher": str(saved_tokenizer)}
    trained.save_pretrained(tmp_path / "trained", training=teacher)
    results = evaluate(compose_eval(photos_dir, tmp_path / "out", f"ckpt={tmp_path / 'trained'}", "protocol=56"))
    measured = {record["key"]: record["feature_cosine"] for record in results["per_image"]}

    data = ShardDataModule(
        val_urls=str(photos_dir / "photos" / "val-*.tar"), image_size=56, batch_size=64, num_workers=0
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    images = batch["image"].float() / 255  # uint8 from the loader
    with torch.no_grad():
        a, b = trained.features(images), original.features(images)
    direct = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean(-1)  # per token, averaged per image
    assert sorted(measured) == sorted(batch["key"])
    for key, value in zip(batch["key"], direct.tolist(), strict=True):
        assert measured[key] == pytest.approx(value, abs=1e-5)
    assert max(measured.values()) < 0.999


def test_skipped_data_is_recorded_and_the_summary_says_the_set_was_incomplete(photos_dir, saved_tokenizer, tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad.tar"  # two undecodable samples between two good ones
    good = (photos_dir / "photos" / "val-000000.tar").read_bytes()
    with wds.TarWriter(str(bad), encoder=False) as writer:
        for key in ("a", "b", "c", "d"):
            image = b"not an image" if key in "bc" else _first_image(good)
            writer.write({"__key__": key, "jpg": image})
    broken = tmp_path / "broken.tar"
    broken.write_text("not a tar file")  # an unreadable shard, read last
    urls = f"data.val_urls=['{photos_dir / 'photos' / 'val-*.tar'}','{bad}','{broken}']"
    results = evaluate(compose_eval(photos_dir, tmp_path / "out", f"ckpt={saved_tokenizer}", urls))
    assert results["images"] == 12 + 2
    assert results["complete"] is False and results["skipped"] == {"samples": 2, "shards": 1}
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["skipped"] == {"samples": 2, "shards": 1} and written["complete"] is False
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("**INCOMPLETE: 2 samples and 1 shards of the evaluation set could not be read")


def _first_image(shard: bytes) -> bytes:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        member = next(m for m in tar if m.name.endswith((".jpg", ".png")))
        return tar.extractfile(member).read()


def test_the_protocol_names_every_measured_metric():
    from unilip.evaluation.report import describe_protocol

    text = describe_protocol(448, 28, padded=True, lpips=True, rfid=True, external=True)
    assert "natively" in text and all(m in text for m in ("PSNR", "SSIM", "LPIPS", "rFID", "external vision model"))


def _identity_loader(path, config=None):
    from unilip.training.lineage import load_any_tokenizer

    loaded = load_any_tokenizer(path, config)
    identity = IdentityTokenizer(loaded.tokenizer.config)
    identity.load_state_dict(loaded.tokenizer.state_dict())
    loaded.tokenizer = identity
    return loaded


def test_rfid_with_supplied_inception_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    # a randomly initialised network of the right architecture stands in for the real weights
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(state, tmp_path / "inception.pth")
    fid = build_fid(str(tmp_path / "inception.pth"))
    x, y = _photo_pairs()
    images = torch.cat([x, x.flip(-1), y]).repeat(2, 1, 1, 1).mul(255).round().to(torch.uint8)  # it takes uint8
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(fid.compute().item()) < 1e-2  # identical sets
    assert build_fid(None) is None


class _Payload:
    """Not a tensor or a container of them: a weights-only load must refuse a file holding it."""


def test_an_inception_file_that_is_missing_broken_or_holds_other_objects_is_a_user_error(tmp_path):
    """Each is one `error:` line in eval.py (a UserError / OSError), naming the file; a file holding other
    objects than tensors is refused, not unpickled."""
    from unilip.errors import UnreadableFileError

    absent = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(f'inception_weights={absent} does not exist')}$"):
        build_fid(str(tmp_path / "absent.pth"))
    torch.save({"w": torch.zeros(1), "payload": _Payload()}, tmp_path / "inception.pth")
    with pytest.raises(UnreadableFileError, match=r"inception_weights '.*inception\.pth' is not a plain PyTorch"):
        build_fid(str(tmp_path / "inception.pth"))
    torch.save({"w": torch.zeros(1000)}, tmp_path / "truncated.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "truncated.pth").read_bytes()[:500])
    with pytest.raises(UnreadableFileError, match=r"inception_weights '.*truncated\.pth' cannot be read"):
        build_fid(str(tmp_path / "truncated.pth"))


def test_rfid_is_torchmetrics_fid_on_uint8_images(tmp_path, monkeypatch):
    """build_fid's FID is torchmetrics' own, set up independently for uint8 input: the same statistics of two
    different sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from tests.helpers import random_inception_state

    torch.save(random_inception_state(monkeypatch), tmp_path / "inception.pth")
    ours = build_fid(str(tmp_path / "inception.pth"))
    theirs = FrechetInceptionDistance(normalize=False, feature_extractor_weights_path=str(tmp_path / "inception.pth"))
    x, y = _photo_pairs()
    real = torch.cat([x, y]).repeat(2, 1, 1, 1).mul(255).round().to(torch.uint8)
    fake = torch.cat([y, x.flip(-1)]).repeat(2, 1, 1, 1).mul(255).round().to(torch.uint8)
    for fid in (ours, theirs):
        fid.update(real, real=True)
        fid.update(fake, real=False)
    # the random network's distance is ~0 for any two sets; the statistics it accumulates are what differ
    assert not torch.allclose(theirs.real_features_sum, theirs.fake_features_sum)
    for name in ("real_features_sum", "real_features_cov_sum", "fake_features_sum", "fake_features_cov_sum"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)


def _run_eval(photos_dir, out, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "eval.py"),
        f"paths.data_dir={photos_dir}",
        f"hydra.run.dir={out}",
        "data.val_num_workers=1",
        "batch_size=4",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    result = run_tree(command, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_three_process_evaluation_equals_one_process_and_leaves_one_log(photos_dir, saved_tokenizer, tmp_path):
    one = _run_eval(photos_dir, tmp_path / "one", f"ckpt={saved_tokenizer}", "trainer=cpu")
    three = _run_eval(
        photos_dir,
        tmp_path / "three",
        f"ckpt={saved_tokenizer}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=3",
    )
    assert [r["key"] for r in one["per_image"]] == [r["key"] for r in three["per_image"]]  # each image once
    for name, stats in one["aggregate"].items():
        for stat, value in stats.items():
            assert three["aggregate"][name][stat] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, stat)
    # the other ranks log to the console only: no train_ddp_process_<rank>.log beside the results
    written = sorted(p.name for p in (tmp_path / "three").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        ".hydra", "eval.log", "reconstructions.png", "results.json", "summary.md"
    ]  # fmt: skip


def test_eval_config_errors_are_one_line(photos_dir, tmp_path):
    with pytest.raises(Exception, match="pass preset=unilip_1b"):
        evaluate(compose_eval(photos_dir, tmp_path, f"ckpt={tmp_path / 'x.pth'}"))
    with pytest.raises(Exception, match="does not exist"):
        evaluate(compose_eval(photos_dir, tmp_path, "ckpt=/nonexistent/run"))


@pytest.mark.slow
def test_ablation_script_runs_every_arm(photos_dir, tmp_path):
    from unilip.evaluation.ablation import main

    out = tmp_path / "table.md"
    main(
        [
            "--runs-dir",
            str(tmp_path / "runs"),
            "--data-dir",
            str(photos_dir),
            "--out",
            str(out),
            "stages.stage1.max_steps=3",
            "stages.stage2.max_steps=3",
            "stages.stage2.gan_start_step=1",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "trainer.enable_progress_bar=false",
        ]
    )
    rows = out.read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "stage 1",
        "stage 1, longer",
        "stage 2, distill",
        "stage 2, no distill",
        "stage 2, distill, GAN from half-way",
    ]


@pytest.mark.slow
def test_encoder_comparison_script_runs_every_encoder_and_stage(photos_dir, tmp_path):
    from unilip.evaluation.encoders import main

    out = tmp_path / "table.md"
    quick = ["stages.stage1.max_steps=3", "stages.stage2.max_steps=3", "data.num_workers=0", "data.val_num_workers=0"]
    main(["--runs-dir", str(tmp_path / "runs"), "--data-dir", str(photos_dir), "--out", str(out), *quick])
    rows = [[cell.strip() for cell in row.split("|")[1:-1]] for row in out.read_text().splitlines()[2:]]
    assert [row[:2] for row in rows] == [[p, s] for p in ("tiny", "tiny_siglip2", "tiny_dinov2") for s in ("1", "2")]
    assert all(row[4] == "1.0000" for row in rows[::2])  # stage 1 never trains the encoder
    assert all(float(row[2]) > 5 for row in rows)  # PSNR of an actual reconstruction


def test_external_features_are_the_cosine_of_the_models_pooled_embeddings(tmp_path):
    """eval.py's `external_features=<dir>`: images clamped to [0, 1], resized to the processor's crop size (or its
    shortest edge without a centre crop), normalised by its mean and std, the model's pooled output compared by
    cosine; recomputed here with the model and the processor's numbers directly."""
    import torch.nn.functional as F
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from unilip.evaluation.metrics import ExternalFeatures

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=24, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24}, image_mean=mean, image_std=std
    )
    processor.save_pretrained(tmp_path / "clip")
    external = ExternalFeatures(str(tmp_path / "clip"))
    assert external.size == 24  # the centre crop's size
    images, other = torch.rand(3, 3, 48, 48) * 3 - 1, torch.rand(3, 3, 48, 48)  # pixels out of [0, 1]

    model = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()

    def pooled(x):
        x = F.interpolate(x, size=(24, 24), mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return model(pixel_values=x).pooler_output

    with torch.no_grad():
        expected = F.cosine_similarity(pooled(images), pooled(other), dim=-1)
        measured = external(images, other)
        assert measured.shape == (3,)
        assert torch.allclose(measured, expected, atol=1e-6)
        assert torch.allclose(external(images, images), torch.ones(3), atol=1e-6)
    (tmp_path / "clip" / "model.safetensors").unlink()
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")  # same config, other random weights
    assert not torch.equal(ExternalFeatures(str(tmp_path / "clip")).embed(images), external.embed(images))
    CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(tmp_path / "clip")
    assert ExternalFeatures(str(tmp_path / "clip")).size == 32  # no crop: the shortest edge
    assert not any(parameter.requires_grad for parameter in external.parameters())  # frozen


def _tiny_clip_processor(path, side=24):
    from transformers import CLIPImageProcessor

    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    crop = {"height": side, "width": side}
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size=crop, image_mean=mean, image_std=std).save_pretrained(
        path
    )
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _resized(images, side, mean, std):
    import torch.nn.functional as F

    return (F.interpolate(images, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1) - mean) / std


def test_external_features_from_a_text_and_vision_checkpoint_use_its_vision_tower(tmp_path):
    """A whole CLIP checkpoint (text and vision, as published): the features are its vision tower's pooled output,
    the same numbers as the full model's `vision_model` gives."""
    from transformers import CLIPConfig, CLIPModel

    from unilip.evaluation.metrics import ExternalFeatures

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=24,
                  patch_size=8)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "clip")
    mean, std = _tiny_clip_processor(tmp_path / "clip")
    external = ExternalFeatures(str(tmp_path / "clip"))
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=_resized(images, 24, mean, std)).pooler_output
        torch.testing.assert_close(external.embed(images), expected, atol=1e-6, rtol=1e-5)


def test_external_features_of_a_model_without_pooled_output_average_its_tokens(tmp_path):
    """A model whose output has no `pooler_output` (ViT-MAE, unmasked): the embedding is the mean of its last
    hidden states over the tokens."""
    from transformers import ViTMAEConfig, ViTMAEModel

    from unilip.evaluation.metrics import ExternalFeatures

    torch.manual_seed(0)
    config = ViTMAEConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=24, patch_size=8, mask_ratio=0.0)  # fmt: skip
    model = ViTMAEModel(config).eval()
    model.save_pretrained(tmp_path / "mae")
    mean, std = _tiny_clip_processor(tmp_path / "mae")
    external = ExternalFeatures(str(tmp_path / "mae"))
    images, other = torch.rand(3, 3, 40, 40), torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        embed = [model(pixel_values=_resized(x, 24, mean, std)).last_hidden_state.mean(dim=1) for x in (images, other)]
        assert embed[0].shape == (3, 32)
        torch.testing.assert_close(external.embed(images), embed[0], atol=1e-5, rtol=1e-5)  # tokens shuffled
        torch.testing.assert_close(external(images, other), torch.nn.functional.cosine_similarity(*embed), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def test_external_features_input_size_from_a_processor_without_centre_crop(tmp_path):
    """SigLIP's processor resizes to a fixed height and width and has no centre crop: that size is the input."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from unilip.evaluation.metrics import ExternalFeatures

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    external = ExternalFeatures(str(tmp_path / "siglip"))
    assert external.size == 32
    assert external(torch.rand(2, 3, 40, 40), torch.rand(2, 3, 40, 40)).shape == (2,)


def test_external_features_with_weights_missing_is_a_user_error_naming_them(tmp_path):
    """A checkpoint whose config asks for more layers than its weights hold: one line naming how many weights are
    missing and the first five (eval.py prints it as `error:`), not a model run on random weights."""
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModel

    from unilip.errors import UnreadableFileError
    from unilip.evaluation.metrics import ExternalFeatures

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=24, patch_size=8)  # fmt: skip
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    _tiny_clip_processor(tmp_path / "clip")
    saved = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**saved, "num_hidden_layers": 2}))
    first = ["layer_norm1.bias", "layer_norm1.weight", "layer_norm2.bias", "layer_norm2.weight", "mlp.fc1.bias"]
    listed = ", ".join(f"encoder.layers.1.{name}" for name in first)
    expected = (
        f"external_features={tmp_path / 'clip'}: the checkpoint lacks 16 weights its config asks for (first: {listed});"
        " point it at a complete transformers image model directory"
    )
    with pytest.raises(UnreadableFileError) as error:
        ExternalFeatures(str(tmp_path / "clip"))
    assert str(error.value) == expected
