"""What the tokenizer asks of its encoder, whichever pretrained vision encoder it is.

    pixels (B, 3, H, W), normalised with the encoder's own mean and std
      -> the encoder's transformer -> its patch tokens on an (H/p, W/p) grid
      -> token merge (InternVL's pixel shuffle + projector; a 2x2 merge or none for the others)
      =  features (B, h * w, D) on an (h, w) grid       what the bottleneck reads and stage 2 distils

An `Encoder` also says which of its blocks are the units of FSDP sharding, which of its parameters the
features never use (kept for the way home, never trained), how its pretrained weights are loaded
(strictly, from its home checkpoint) and how a trained copy is written back there (`export`, verified
by `verify_export`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from unilip.errors import ConfigError, UserError

if TYPE_CHECKING:
    from unilip.models.tokenizer import TokenizerConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Relative tolerance of the export check, times the largest feature magnitude: float32 noise between two
# computations of the same features (measured: 0 to ~1e-6). It does not depend on the dtype the checkpoint
# is saved in because the reference does: the tokenizer's weights are rounded to that dtype first, and both
# sides compute in float32, so a bfloat16 export is held to the same tight bound as a float32 one instead of
# a loose one that would also let a wrong feature layer through. What the rounding costs is reported.
EXPORT_RTOL = 1e-4


class ExportMismatchError(UserError, RuntimeError):
    """The exported checkpoint does not compute the tokenizer's features."""


@dataclass
class ExportCheck:
    """What `verify_export` measured; differences are max |a - b| over the features of one random image."""

    dtype: torch.dtype  # the dtype the checkpoint was saved in
    difference: float  # exported model vs the tokenizer rounded to `dtype`, both computed in float32
    tolerance: float  # EXPORT_RTOL x the largest feature magnitude
    rounding: float  # the tokenizer rounded to `dtype` vs the tokenizer itself: what saving in `dtype` costs
    how: str = "transformers loads it with no missing or unexpected keys"  # what else was checked, in words

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance


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


def vision_field(config: PretrainedConfig, name: str) -> Any:
    value = getattr(config, name, None)
    return tuple(value) if isinstance(value, list) else value


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
    weights_option: ClassVar[str] = "model.encoder_weights"  # the config key naming its pretrained weights
    home: ClassVar[str]  # what `export` writes, in words

    def __init__(self, config: TokenizerConfig):
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
    def merge_factor(cls, config: TokenizerConfig) -> int:
        """Side of the square of patch tokens merged into one feature (2 for `downsample_ratio` 0.5)."""
        return round(1 / config.downsample_ratio)

    @classmethod
    def feature_width(cls, config: TokenizerConfig) -> int:
        """D of the (B, N, D) features."""
        return cls.vision_config(config.vision).hidden_size * cls.merge_factor(config) ** 2

    @classmethod
    def check_config(cls, config: TokenizerConfig) -> None:
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

    # ------------------------------------------------------------------ home
    def load_pretrained(self, name_or_path: str | Path) -> None:
        """Load the encoder from its home checkpoint (hub id or directory); every key must match."""
        raise NotImplementedError

    def export(self, out_dir: Path, base: str | None, dtype: torch.dtype | None) -> Path:
        """Write the encoder back into its home format at `out_dir` (`base`: the home checkpoint it came from)."""
        raise NotImplementedError

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        """Reload what `export` wrote with transformers and compare its features with this encoder's (`base`: the
        one given to `export`)."""
        raise NotImplementedError

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the encoder's input (CPU, float32); for checks outside the tokenizer."""
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (images - mean) / std
