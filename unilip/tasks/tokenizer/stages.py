"""Which tokenizer parts each UniLIP training stage trains (paper, Sec. 3.2 / REFERENCE section 2)."""

from __future__ import annotations

from torch import nn

from unilip.errors import ConfigError
from unilip.models.tokenizer import UniLIPTokenizer

# stage 1 (decoder alignment): the CLIP encoder is frozen, the bottleneck and decoder learn.
# stage 2 (self-distillation): everything learns; the encoder at a reduced LR (see the optimiser).
TRAINABLE_PARTS = {1: ("bottleneck", "decoder"), 2: ("encoder", "bottleneck", "decoder")}


def check_stage(stage: int) -> int:
    if stage not in TRAINABLE_PARTS:
        raise ConfigError(f"stage={stage!r} is not a tokenizer stage; use stage=1 (decoder alignment) or stage=2")
    return stage


def apply_stage(tokenizer: UniLIPTokenizer, stage: int) -> dict[str, list[nn.Parameter]]:
    """Set `requires_grad` for `stage` and return the trainable parameters by part."""
    trainable = TRAINABLE_PARTS[check_stage(stage)]
    groups = {}
    for part in tokenizer.parts():
        params = tokenizer.part_parameters(part)
        for param in params:
            param.requires_grad_(part in trainable)
        if part in trainable:
            groups[part] = params
    return groups
