"""SigLIP and SigLIP 2 vision towers (the encoders of UniWorld-V1 and X-Omni), through transformers' own classes.

Two ways transformers holds SigLIP 2: the fixed-resolution checkpoints (`google/siglip2-so400m-patch14-384`,
`-patch16-384`, ...) are `SiglipVisionModel`s, which run other sizes by interpolating their position
embeddings; the NaFlex ones (`google/siglip2-so400m-patch16-naflex`) are `Siglip2VisionModel`s, which take
patches and resize their position embeddings to any grid. Features are the last hidden state (after the
post-layernorm) on the patch grid; the attention-pooling head is not used and is kept, frozen, for export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from unilip.models.encoders.vision_model import VisionModelEncoder


class SiglipEncoder(VisionModelEncoder):
    """`SiglipVisionModel`: SigLIP, and SigLIP 2 at a fixed resolution."""

    kind = "siglip"
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    image_mean = (0.5, 0.5, 0.5)  # SigLIP's image processor: [0, 1] -> [-1, 1]
    image_std = (0.5, 0.5, 0.5)

    def patch_tokens(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patch = tower.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        return tower(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state, grid

    def blocks(self) -> list[nn.Module]:
        return list(self.core.encoder.layers)

    def unused_parameters(self) -> list[nn.Parameter]:
        head = getattr(self.core, "head", None)
        return list(head.parameters()) if head is not None else []

    def restore_buffers(self, device: str | torch.device | None = None) -> None:
        embeddings = self.core.embeddings
        if hasattr(embeddings, "position_ids"):  # SiglipVisionEmbeddings: arange(positions), not saved
            positions = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
            embeddings.register_buffer("position_ids", positions, persistent=False)


class Siglip2Encoder(SiglipEncoder):
    """`Siglip2VisionModel` (NaFlex): the image is cut into patches here, as its image processor does, and the
    position embeddings are resized to the patch grid of every input size."""

    kind = "siglip2"
    config_class = Siglip2VisionConfig
    model_class = Siglip2VisionModel

    def patch_tokens(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patch = tower.config.patch_size
        batch, channels, height, width = pixel_values.shape
        h, w = height // patch, width // patch
        # (B, C, h, p, w, p) -> (B, h * w, p * p * C): rows of patches, each flattened channels-last
        # (transformers' Siglip2ImageProcessor, convert_image_to_patches)
        patches = pixel_values.reshape(batch, channels, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(batch, h * w, patch * patch * channels)
        mask = torch.ones(batch, h * w, dtype=torch.int32, device=pixel_values.device)
        shapes = torch.tensor([[h, w]] * batch, device=pixel_values.device)
        out = tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.last_hidden_state, (h, w)
