"""InternViT + InternVL's pixel shuffle and projector `mlp1`: the UniLIP encoder (REFERENCE section 1).

The vision tower, projector and pixel shuffle are transformers' own InternVL code, so the trained
encoder drops back into `InternVLForConditionalGeneration` unchanged (its home: `unilip.pretrained.internvl`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from unilip.errors import ConfigError
from unilip.models.encoders.base import Encoder, EncoderConfig


def internvl_features(
    vision_tower: InternVLVisionModel,
    projector: InternVLMultiModalProjector,
    pixel_values: torch.Tensor,
    config: EncoderConfig,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """InternVL's image-feature path: ViT -> drop CLS -> pixel shuffle -> projector.

    (B, 3, H, W) normalised pixels -> ((B, N, D) features, (h, w) grid of the N tokens).
    """
    pixel_values = pixel_values.to(vision_tower.embeddings.patch_embeddings.projection.weight.dtype)
    hidden = vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
    patch = vision_tower.config.patch_size[0]
    grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    hidden = hidden.reshape(hidden.shape[0], grid_h, grid_w, hidden.shape[-1])
    # transformers' own pixel shuffle (a plain function of its arguments), so the features
    # match InternVLModel.get_image_features bit for bit.
    hidden = InternVLModel.pixel_shuffle(None, hidden, scale_factor=config.downsample_ratio)
    grid = (hidden.shape[1], hidden.shape[2])
    return projector(hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])), grid


class InternViTEncoder(Encoder):
    """`vision_tower` (InternVLVisionModel) + `multi_modal_projector`; features are InternVL's
    `get_image_features(...).pooler_output`, D = the LLM's hidden size (`llm_hidden_size`)."""

    kind = "internvit"
    config_class = InternVLVisionConfig

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        internvl = config.internvl_config()
        internvl.vision_config._attn_implementation = "sdpa"
        self.vision_tower = InternVLVisionModel(internvl.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(internvl)

    @classmethod
    def feature_width(cls, config: EncoderConfig) -> int:
        return config.llm_hidden_size

    @classmethod
    def check_config(cls, config: EncoderConfig) -> None:
        if config.llm_hidden_size is None:
            raise ConfigError("the internvit encoder needs llm_hidden_size (the InternVL projector's output width)")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return internvl_features(self.vision_tower, self.multi_modal_projector, pixel_values, self.config)

    def blocks(self) -> list[nn.Module]:
        return list(self.vision_tower.encoder.layer)
