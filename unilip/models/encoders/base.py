"""What the tokenizer asks of its encoder, whichever pretrained vision encoder it is.

    pixels (B, 3, H, W), normalised with the encoder's own mean and std
      -> the encoder's transformer -> its patch tokens on an (H/p, W/p) grid
      -> token merge (InternVL's pixel shuffle + projector; a 2x2 merge or none for the others)
      =  features (B, h * w, D) on an (h, w) grid       what the bottleneck reads and stage 2 distils

An `Encoder` also says which of its blocks are the units of FSDP sharding and which of its parameters the
features never use (kept for the way home, never trained). How its pretrained weights are loaded (strictly,
from its home checkpoint) and how a trained copy is written back there is its home's business
(`unilip.pretrained`, registered by the same `kind`): the networks never import that code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import InternVLConfig, PretrainedConfig

from unilip.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def merge_tokens(tokens: torch.Tensor, grid: tuple[int, int], factor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, h * w, C) tokens on an (h, w) grid -> (B, h/f * w/f, f * f * C): each f x f patch of tokens
    concatenated, in row-major order inside the patch. `factor` 1 returns the tokens as they are."""
    if factor == 1:
        return tokens, grid
    batch, _, channels = tokens.shape
    (height, width), f = grid, factor
    x = tokens.reshape(batch, height // f, f, width // f, f, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, (height // f) * (width // f), f * f * channels)
    return x, (height // f, width // f)


class EncoderConfig(Protocol):
    """What an encoder reads of the tokenizer's config (`unilip.models.tokenizer.TokenizerConfig`, which asks the
    encoders for their sizes and so cannot be imported here): its architecture fields and what follows from them."""

    vision: dict[str, Any]
    llm_hidden_size: int | None
    downsample_ratio: float
    projector_hidden_act: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def input_multiple(self) -> int: ...

    def vision_config(self) -> PretrainedConfig: ...

    def internvl_config(self) -> InternVLConfig: ...


class Encoder(nn.Module):
    """A pretrained vision encoder as the tokenizer uses it; subclasses are registered by `kind` in
    `unilip.models.encoders.ENCODERS` and chosen by the preset's `encoder` key.

    Every encoder keeps the transformers model it wraps as `vision_tower` (what activation checkpointing
    and `torch.compile` act on). Its modules become the tokenizer's own (`UniLIPTokenizer`), so their
    weights are saved under the names they have here.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    image_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN  # its image processor's normalisation
    image_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(self, config: EncoderConfig):
        super().__init__()
        # The tokenizer's config at build time; what the encoder reads of it (vision, downsample_ratio,
        # normalisation) is architecture, which a built tokenizer never changes.
        self.config = config

    # ------------------------------------------------------------------ what the config knows before building
    @classmethod
    def vision_config(cls, vision: dict[str, Any]) -> PretrainedConfig:
        return cls.config_class(**vision)

    @classmethod
    def patch_size(cls, vision: dict[str, Any]) -> int:
        patch = cls.vision_config(vision).patch_size
        return int(patch[0] if isinstance(patch, (list, tuple)) else patch)

    @classmethod
    def merge_factor(cls, config: EncoderConfig) -> int:
        """Side of the square of patch tokens merged into one feature (2 for `downsample_ratio` 0.5)."""
        return round(1 / config.downsample_ratio)

    @classmethod
    def feature_width(cls, config: EncoderConfig) -> int:
        """D of the (B, N, D) features."""
        return cls.vision_config(config.vision).hidden_size * cls.merge_factor(config) ** 2

    @classmethod
    def check_config(cls, config: EncoderConfig) -> None:
        """Refuse settings this encoder cannot honour (called when the config is created)."""
        if config.llm_hidden_size is not None:
            raise ConfigError(
                f"llm_hidden_size={config.llm_hidden_size}: the {cls.kind} encoder has no InternVL projector; "
                "remove llm_hidden_size from the preset"
            )

    # ------------------------------------------------------------------ features
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) normalised pixels, H and W multiples of the input multiple -> ((B, N, D), (h, w))."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order (FSDP shards the encoder per block)."""
        raise NotImplementedError

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters of the home model the features never use (e.g. a pooling head): frozen, kept for export."""
        return []

    def restore_buffers(self, device: str | torch.device | None = None) -> None:
        """Re-create the buffers that are not saved (a model built on `meta` and loaded has none)."""

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the encoder's input (CPU, float32); for checks outside the tokenizer."""
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (images - mean) / std
