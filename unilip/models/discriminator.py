"""PatchGAN discriminator (Isola et al. 2017; the VQGAN variant), for the tokenizer's GAN loss."""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm '{kind}' is not one of group, batch, none")


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, 1, h, w) patch logits.

    GroupNorm by default rather than the original BatchNorm: per-sample statistics make the
    loss independent of how a global batch is split over GPUs (and FSDP-friendly).
    """

    def __init__(self, base_channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=norm == "none"), _norm(norm, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images * 2 - 1)
