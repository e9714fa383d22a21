"""How rFID's images become the 8-bit images Inception reads (`quantize=` of eval.py).

Inception-V3 for FID takes uint8 images, so the [0, 1] reconstructions are quantised first, and the way
moves rFID: truncation lowers every pixel by half a level on average against rounding. Three ways:

- `trunc` (the default): floor(255 x), as the UniLIP reference's evaluator turns reconstructions into uint8
  (nnnth/UniLIP 299817d, tokenizer/evaluator/evaluator.py l.149: `((fake_images+1)/2 * 255).to(torch.uint8)`),
  and torchmetrics' FID with `normalize=True`.
- `round`: floor(255 x + 0.5), what a PNG saved with torchvision's `save_image` holds (`mul(255).add_(0.5)`,
  then uint8): the practice of torch-fidelity and clean-fid, which score image files.
- `reference`: the reference's whole path as its evaluation script runs it (tokenizer/scripts/evaluation.py ->
  `eval_reconstruction` -> `evaluator.update`): the reconstruction rounded to 8 bits and mapped to [-1, 1]
  (utils/train_utils_stage2.py l.569: `(torch.round((r+1)/2 * 255.0) - 127.5) / 127.5`), then truncated as
  above, which in float32 lowers levels 1-95 by one; and the input images, which its loader normalised with
  the ImageNet mean and std, de-normalised and truncated (evaluator.py l.166-173: `real_images * std + mean`,
  `(real_images * 255).to(torch.uint8)`), which lowers some levels by one as well (62, 39 and 36 of the 256 in
  R, G, B).

Under `trunc` and `round` the input images are their own 8-bit levels (they were uint8 before `to_float`).
"""

from __future__ import annotations

import torch

QUANTIZE = ("trunc", "round", "reference")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the reference evaluator's (l.166-167)


def _levels(images: torch.Tensor) -> torch.Tensor:
    """Images that were uint8 (v / 255) -> the same uint8 (rounding is exact for them)."""
    return images.float().mul(255).round().clamp(0, 255).to(torch.uint8)


def inception_inputs(
    images: torch.Tensor, reconstructions: torch.Tensor, quantize: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) inputs (8-bit levels / 255) and reconstructions in [0, 1] -> the (real, fake) uint8 images
    rFID feeds Inception, quantised as `quantize` says (`QUANTIZE`)."""
    fake = reconstructions.float().clamp(0, 1)
    if quantize == "trunc":
        return _levels(images), fake.mul(255).to(torch.uint8)  # toward zero: floor, the values being >= 0
    if quantize == "round":
        return _levels(images), fake.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    if quantize == "reference":
        signed = (torch.round(fake * 255.0) - 127.5) / 127.5
        fake_levels = ((signed + 1) / 2 * 255).to(torch.uint8)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        normalised = (images.float() - mean) / std  # the reference loader's Normalize
        return ((normalised * std + mean) * 255).to(torch.uint8), fake_levels
    raise ValueError(f"quantize={quantize!r}: use one of {QUANTIZE}")
