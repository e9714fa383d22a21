"""DINOv2 (RAE's encoder), with or without registers, through transformers' `Dinov2Model` and
`Dinov2WithRegistersModel`. Features are the last hidden state (after the final layernorm) without the
CLS and register tokens; other input sizes interpolate the position embeddings (transformers does it for
every size). The mask token, used only for masked-image pretraining, is kept, frozen, for export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from unilip.models.encoders.vision_model import VisionModelEncoder


class Dinov2Encoder(VisionModelEncoder):
    """`Dinov2Model` (facebook/dinov2-base, -large, ...)."""

    kind = "dinov2"
    config_class = Dinov2Config
    model_class = Dinov2Model

    def prefix_tokens(self, tower: nn.Module) -> int:
        """Tokens before the patches: CLS (and the registers)."""
        return 1 + getattr(tower.config, "num_register_tokens", 0)

    def patch_tokens(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patch = tower.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        return tower(pixel_values=pixel_values).last_hidden_state[:, self.prefix_tokens(tower) :], grid

    def blocks(self) -> list[nn.Module]:
        return list(self.vision_tower.encoder.layer)

    def unused_parameters(self) -> list[nn.Parameter]:
        mask = getattr(self.vision_tower.embeddings, "mask_token", None)
        return [mask] if mask is not None else []


class Dinov2WithRegistersEncoder(Dinov2Encoder):
    """`Dinov2WithRegistersModel` (facebook/dinov2-with-registers-base, -large, ...): 4 register tokens."""

    kind = "dinov2_with_registers"
    config_class = Dinov2WithRegistersConfig
    model_class = Dinov2WithRegistersModel
