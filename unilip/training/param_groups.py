"""The optimizer's parameter groups: which parameters get weight decay (the tokenizer and generation recipes)."""

from __future__ import annotations

from typing import Any

from torch import nn


def decay_groups(params: list[nn.Parameter], **group: Any) -> list[dict[str, Any]]:
    """Weight decay on matrices and convolutions only; norms, biases and LayerScale vectors are exempt."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, **group}, {"params": no_decay, **group, "weight_decay": 0.0}) if g["params"]]
