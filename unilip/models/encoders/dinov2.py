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

_DINOV2_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "layerscale_value",
    "use_swiglu_ffn",
    "qkv_bias",
)


class Dinov2Encoder(VisionModelEncoder):
    """`Dinov2Model` (facebook/dinov2-base, -large, ...)."""

    kind = "dinov2"
    config_class = Dinov2Config
    model_class = Dinov2Model
    home = "Dinov2Model checkpoint"
    home_model_types = ("dinov2",)
    compared_fields = (*_DINOV2_FIELDS, "use_mask_token")

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
    home = "Dinov2WithRegistersModel checkpoint"
    home_model_types = ("dinov2_with_registers",)
    compared_fields = (*_DINOV2_FIELDS, "num_register_tokens")
