"""The unified task turns uint8 images into floats as every other module does (`unilip.data.transforms.to_float`:
v / 255, the same bits on every device), not with a division of its own, which a GPU computes as a multiply by
the reciprocal: another last bit at about half of the 256 levels."""

import torch

from unilip.data import transforms
from unilip.tasks.unified import module

LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)


def test_every_level_converts_as_the_shared_conversion():
    converted = module.as_unit_float(LEVELS)
    assert converted.dtype == torch.float32 and torch.equal(converted, transforms.to_float(LEVELS))
    hand = torch.tensor([v / 255 for v in range(256)], dtype=torch.float64).float()  # correctly rounded v / 255
    assert torch.equal(converted[0, 0].flatten(), hand)
    floats = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(module.as_unit_float(floats), floats.float())  # float images: only made float32


def test_the_conversion_goes_through_the_shared_one(monkeypatch):
    """On a CPU a division by 255 and the shared conversion agree on every level; on a GPU they do not. Here the
    shared conversion is replaced by what a GPU's division computes (v x float32(1 / 255)), which differs from v / 255
    at many levels: the module's images follow it, bit for bit."""
    reciprocal = torch.tensor(1 / 255, dtype=torch.float32)

    def as_a_gpu_divides(images):
        return images.float() * reciprocal if images.dtype == torch.uint8 else images

    gpu_like = as_a_gpu_divides(LEVELS)
    assert (gpu_like != LEVELS.float() / 255).sum() > 2 * 3 * 50  # a case where the two ways differ
    monkeypatch.setattr(transforms, "to_float", as_a_gpu_divides)
    monkeypatch.setattr(module, "to_float", as_a_gpu_divides, raising=False)
    assert torch.equal(module.as_unit_float(LEVELS), gpu_like)
