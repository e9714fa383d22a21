"""Every encoder's home, by the encoder's `kind` (the same keys as `unilip.models.encoders.ENCODERS`)."""

from __future__ import annotations

from unilip.models.encoders import Encoder
from unilip.pretrained.base import Home
from unilip.pretrained.internvit import InternViTHome
from unilip.pretrained.vision_models import Dinov2Home, Dinov2WithRegistersHome, Siglip2Home, SiglipHome

HOMES: dict[str, type[Home]] = {
    cls.kind: cls for cls in (InternViTHome, SiglipHome, Siglip2Home, Dinov2Home, Dinov2WithRegistersHome)
}


def home_of(encoder: Encoder) -> Home:
    """The home of `encoder` (its pretrained checkpoint in, its trained copy out)."""
    return HOMES[encoder.kind](encoder)
