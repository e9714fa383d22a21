"""What every encoder's home does: the checkpoint format its pretrained weights come from, and a trained copy
goes back to.

    load(checkpoint)              the home checkpoint's weights into the encoder, every key matched
    export(out_dir, base, dtype)  the trained encoder written back in the home format
    verify_export(out_dir, base)  what `export` wrote, reloaded with transformers: does it compute the features?

A home is registered by its encoder's `kind` (`unilip.pretrained.homes.HOMES`) and wraps that encoder
(`unilip.models.encoders`), which knows nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig

from unilip.errors import UserError
from unilip.models.encoders import Encoder

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


def vision_field(config: PretrainedConfig, name: str) -> Any:
    value = getattr(config, name, None)
    return tuple(value) if isinstance(value, list) else value


class Home:
    """The way home of one encoder (`encoder.kind == kind`); subclasses are registered in `HOMES` by `kind`."""

    kind: ClassVar[str]  # the `Encoder.kind` it serves
    checkpoint: ClassVar[str]  # what `export` writes, in words
    weights_option: ClassVar[str] = "model.encoder_weights"  # the config key naming its pretrained weights

    def __init__(self, encoder: Encoder):
        if encoder.kind != self.kind:
            raise TypeError(f"{type(self).__name__} is the home of {self.kind} encoders, not of {encoder.kind}")
        self.encoder = encoder

    def load(self, name_or_path: str | Path) -> None:
        """Load the encoder from its home checkpoint (hub id or directory); every key must match."""
        raise NotImplementedError

    def export(self, out_dir: Path, base: str | None, dtype: torch.dtype | None) -> Path:
        """Write the encoder back into its home format at `out_dir` (`base`: the home checkpoint it came from)."""
        raise NotImplementedError

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        """Reload what `export` wrote with transformers and compare its features with this encoder's (`base`: the
        one given to `export`)."""
        raise NotImplementedError
