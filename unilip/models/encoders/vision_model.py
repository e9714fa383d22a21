"""Encoders that are one transformers vision model (SigLIP, SigLIP 2, DINOv2): its patch tokens, merged. Their
home (loading that model's checkpoint strictly, writing it back, checking what was written) is
`unilip.pretrained.vision_models`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from unilip.models.encoders.base import Encoder, EncoderConfig, merge_tokens


class VisionModelEncoder(Encoder):
    """`vision_tower` is a `model_class` (e.g. `SiglipVisionModel`); the features are its last hidden state's
    patch tokens (`patch_tokens`), merged `merge_factor` x `merge_factor` (`downsample_ratio` 0.5: 2 x 2)."""

    model_class: ClassVar[type[PreTrainedModel]]

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        vision = self.vision_config(config.vision)
        vision._attn_implementation = "sdpa"
        self.vision_tower = self.model_class(vision)
        for param in self.unused_parameters():
            param.requires_grad_(False)

    @property
    def core(self) -> nn.Module:
        """The transformer inside `vision_tower` (transformers 5.0 wraps SigLIP's in `vision_model`; later
        versions do not): the module whose state dict has the home checkpoint's names."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    def patch_tokens(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Run `tower` (this encoder's or a reloaded export) -> ((B, h * w, C) patch tokens, (h, w))."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_tokens(self.vision_tower, pixel_values)
        return merge_tokens(tokens, grid, self.merge_factor(self.config))
