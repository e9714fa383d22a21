"""uint8 batches: the loaders deliver bytes, and the modules turn them into floats on their device, to
exactly the values the float loader delivered before (the same crops, the same floats)."""

import random

import numpy as np
import pytest
import torch

from unilip.data.shards import SkipCounter, expand_urls, read_shard
from unilip.data.transforms import SampleTransform, batch_to_float, collate, lookup_levels, to_float


def float_loader_conversion(arrays: list[np.ndarray]) -> torch.Tensor:
    """What the loader delivered before uint8 batches: each (S, S, 3) uint8 crop as (3, S, S) float32 / 255
    on the host, stacked."""
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0) for a in arrays])


def test_every_level_converts_to_the_correctly_rounded_float():
    """On the host by division, on an accelerator by looking up the host's values (tested here on the host)."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    expected = np.arange(256, dtype=np.float32) / np.float32(255)  # IEEE division, rounded once
    for got in (to_float(levels), lookup_levels(levels)):
        assert got.dtype == torch.float32 and got.shape == (1, 1, 16, 16)
        np.testing.assert_array_equal(got.flatten().numpy(), expected)
    photo = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 9, 7), dtype=np.uint8))
    assert torch.equal(lookup_levels(photo), to_float(photo))
    floats = torch.rand(2, 3, 4, 4)
    assert to_float(floats) is floats  # float batches (synthetic ones) pass through


@pytest.mark.parametrize(
    ("size", "resize", "edits"),
    [(224, "shorter_edge", False), (448, "shorter_edge", False), (56, "square", True)],
)
def test_uint8_batches_of_real_photos_equal_the_float_path(photos_dir, size, resize, edits):
    """Random training crops and flips (the tokenizer) and whole images with edit sources (generation): the
    batch holds the transform's crops byte for byte, and the conversion gives the float loader's values."""
    pattern = "edit-train-*.tar" if edits else "train-*.tar"
    raws = [s for url in expand_urls(str(photos_dir / "photos" / pattern)) for s in read_shard(url, SkipCounter())]
    transform = SampleTransform(size, train=True, with_source=edits, resize=resize)
    examples = [transform(raw, random.Random(f"photos/{i}")) for i, raw in enumerate(raws[:24])]
    batch = collate(examples, with_source=edits)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (24, 3, size, size)
    assert batch["image"].is_contiguous()
    converted = batch_to_float(batch)
    assert torch.equal(converted["image"], float_loader_conversion([e["image"] for e in examples]))
    if edits:
        sources = [e["source"] for e in examples]
        assert all(s is not None for s in sources) and batch["has_source"].all()
        assert torch.equal(converted["source_image"], float_loader_conversion(sources))
        assert converted["has_source"] is batch["has_source"]
    assert converted["key"] == batch["key"] and converted["caption"] == batch["caption"]


def _module_classes():
    from unilip.evaluation.module import ReconstructionEvaluation
    from unilip.tasks.generation.module import GenerationTraining
    from unilip.tasks.tokenizer.module import TokenizerTraining

    return [TokenizerTraining, GenerationTraining, ReconstructionEvaluation]


@pytest.mark.parametrize("index", range(3))
def test_every_module_converts_its_batches_on_the_device(index):
    """Lightning calls `on_after_batch_transfer` on the device copy of every batch, before the step."""
    cls = _module_classes()[index]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch = {"image": images, "source_image": images.flip(0), "has_source": torch.tensor([True, False])}
    batch |= {"key": ["a", "b"], "caption": ["x", "y"]}
    out = cls.on_after_batch_transfer(object.__new__(cls), batch, 0)
    assert torch.equal(out["image"], images.float() / 255)
    assert torch.equal(out["source_image"], images.flip(0).float() / 255)
    assert out["has_source"] is batch["has_source"] and out["key"] == ["a", "b"]
