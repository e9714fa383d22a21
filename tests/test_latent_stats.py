"""The latent scale: measured per tokenizer, stored with it, used by generation, overrides checked."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from unilip.evaluation.latent_stats import main, measure
from unilip.models import UniLIPTokenizer
from unilip.models.latents import latent_scale


def test_measure_recovers_a_known_scale_on_synthetic_latents():
    sigma, mu = 0.094, 0.3  # 1 / 0.094 = 10.64, the order of UniLIP-1B's 10.6
    generator = torch.Generator().manual_seed(0)

    def encode(images: torch.Tensor) -> torch.Tensor:  # a stand-in tokenizer: N(mu, sigma^2) latents
        return mu + sigma * torch.randn(images.shape[0], 32, 16, 16, generator=generator)

    batches = (torch.zeros(b, 3, 8, 8) for b in [7, 16, 16, 16, 16, 16, 16])
    stats = measure(encode, batches, samples=100)
    assert stats.samples == 100 and stats.elements == 100 * 32 * 16 * 16
    assert abs(stats.scale - 1 / sigma) < 0.01 * (1 / sigma) and abs(stats.mean - mu) < 1e-3
    one_batch = measure(lambda x: torch.tensor([[1.0, 2.0, 3.0, 4.0]]), [torch.zeros(1, 3, 8, 8)], samples=5)
    assert one_batch.std == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item())  # unbiased, like torch


def test_the_command_writes_the_scale_that_generation_then_uses(tmp_path, tiny_tokenizer, photos_dir, caplog, capsys):
    from unilip.data import ShardDataModule

    directory = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(directory)
    shards = str(photos_dir / "photos" / "val-*.tar")
    with pytest.raises(ValueError, match="records no latent scale"):
        latent_scale(UniLIPTokenizer.from_pretrained(directory), None, str(directory))

    stats = main(
        [str(directory), shards, "--size", "56", "--samples", "10", "--batch-size", "4", "--workers", "0", "--write"]
    )
    assert json.loads(capsys.readouterr().out)["scale"] == pytest.approx(stats.scale)
    # independently: encode the same 10 images (whole, resized to 56 x 56) in one go
    data = ShardDataModule(val_urls=shards, image_size=56, batch_size=10, num_workers=0, resize="square")
    images = next(iter(data.val_dataloader()))["image"][:10].float() / 255  # uint8 from the loader
    with torch.no_grad():
        expected = 1 / tiny_tokenizer.encode(images).double().std().item()
    assert stats.samples == 10 and stats.scale == pytest.approx(expected, rel=1e-6)

    reloaded = UniLIPTokenizer.from_pretrained(directory)
    assert reloaded.config.latent_scale == pytest.approx(expected, rel=1e-6)
    assert json.loads((directory / "config.json").read_text())["latent_stats"]["samples"] == 10
    assert latent_scale(reloaded, None, "tok") == reloaded.config.latent_scale
    caplog.set_level(logging.WARNING, logger="unilip.models.latents")
    assert latent_scale(reloaded, expected * 1.05, "tok") == expected * 1.05 and not caplog.records
    assert latent_scale(reloaded, 10.6, "tok") == 10.6 and "overrides the tokenizer's measured" in caplog.text


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, tiny_tokenizer, photos_dir):
    with pytest.raises(SystemExit, match=r"error: .*no such tokenizer"):
        main([str(tmp_path / "missing"), "x.tar"])
    checkpoint_like = tmp_path / "model.safetensors"
    checkpoint_like.write_bytes(b"")
    with pytest.raises(SystemExit, match="error: --write needs a saved tokenizer"):
        main([str(checkpoint_like), str(photos_dir / "photos" / "val-*.tar"), "--write"])


def test_trained_tokenizers_do_not_inherit_the_released_scale(tmp_path, photos_dir):
    """A tokenizer trained from the unilip presets (10.6 for the released weights) must be measured again."""
    from tests.conftest import compose_train, quick_overrides
    from unilip.tasks.tokenizer.setup import build_tokenizer_training

    run = tmp_path / "tok" / "tokenizer" / "stage1"
    cfg = compose_train(quick_overrides(photos_dir, run, "stage=1", "+model.config.latent_scale=10.6"))
    assert cfg.model.config.latent_scale == 10.6
    assert build_tokenizer_training(cfg).tokenizer.config.latent_scale is None
