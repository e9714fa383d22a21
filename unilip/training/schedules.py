"""Learning-rate schedules."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int, final_ratio: float) -> LambdaLR:
    """Linear warm-up from 0, then cosine from each group's LR down to `final_ratio` times it.

    The UniLIP recipe: 10k warm-up steps, lr 1e-4 -> 1e-5 (final_ratio 0.1). The factor is
    the same for every parameter group, so a group at 0.1x LR ends at 0.1x the final LR.
    """
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"final LR ratio {final_ratio} must be in [0, 1]")
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
