"""The pretrained vision encoders a tokenizer can be built on, by the name a preset gives (`encoder:`).

Networks only: the architecture and the features. Each one's home (loading its pretrained checkpoint, writing
a trained copy back) is in `unilip.pretrained`, registered under the same `kind`. May import `unilip.models.hub`
and the foundation (`unilip.errors`); never `unilip.pretrained`, training or tasks.
"""

from __future__ import annotations

from unilip.errors import ConfigError
from unilip.models.encoders.base import Encoder, EncoderConfig, merge_tokens
from unilip.models.encoders.dinov2 import Dinov2Encoder, Dinov2WithRegistersEncoder
from unilip.models.encoders.internvit import InternViTEncoder
from unilip.models.encoders.siglip import Siglip2Encoder, SiglipEncoder

ENCODERS: dict[str, type[Encoder]] = {
    cls.kind: cls
    for cls in (InternViTEncoder, SiglipEncoder, Siglip2Encoder, Dinov2Encoder, Dinov2WithRegistersEncoder)
}


def encoder_class(kind: str) -> type[Encoder]:
    """The `Encoder` subclass a preset's `encoder: <kind>` names."""
    if kind not in ENCODERS:
        raise ConfigError(f"encoder={kind!r} is not a known encoder; use one of {', '.join(ENCODERS)}")
    return ENCODERS[kind]


__all__ = ["ENCODERS", "Encoder", "EncoderConfig", "encoder_class", "merge_tokens"]
