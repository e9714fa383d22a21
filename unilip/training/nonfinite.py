"""Skipping optimizer steps whose loss or gradients are not finite, with or without a host sync per step."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from unilip.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteStreak(UserError, RuntimeError):
    """Too many non-finite steps in a row: the run stops (one line in the CLI; what it wrote before is kept).
    `since`: the optimizer step after which the steps went bad (checkpoints up to it are good)."""

    def __init__(self, message: str, since: int):
        super().__init__(message)
        self.since = since


class NonFiniteGuard(nn.Module):
    """Counts non-finite steps in buffers (so checkpoints and resumes carry them) and stops a run that
    has too many in a row.

    A step is bad when its loss or any gradient norm is not finite on any rank (a finite loss can
    have inf or NaN gradients, e.g. through a sqrt at 0). Two ways to skip it, chosen per step by
    the module that owns the guard, after backward and gradient clipping:

    - with a sync (`flag(...).item()`): the optimizer step is not taken and nothing changes;
    - sync-free: a fused AdamW is given the flag as `found_inf` (as under GradScaler) and leaves
      weights and moments alone on the device; schedules and EMAs still advance, and a streak is
      noticed at the next logging step (`count(..., check=True)` only there).
    """

    def __init__(self, max_streak: int = 20):
        super().__init__()
        self.max_streak = max_streak
        self.register_buffer("total", torch.zeros(()))
        self.register_buffer("streak", torch.zeros(()))

    @staticmethod
    def flag(*values: torch.Tensor) -> torch.Tensor:
        """1.0 on every rank if any of `values` (scalars: the loss, gradient norms) is not finite on any
        rank, else 0.0; a device tensor (no host sync)."""
        stacked = torch.stack([value.detach().float().reshape(()) for value in values])
        bad = (~torch.isfinite(stacked)).any().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every rank must skip together
        return bad.clamp(max=1.0)

    def count(self, bad: torch.Tensor, step: int, check: bool, steps_advanced: bool = True) -> None:
        """Add one step's flag; with `check`, raise (a host sync) when the streak reached `max_streak`.
        `steps_advanced`: the bad steps were counted as optimizer steps (sync-free), so the last good one is
        `step - streak`; otherwise (synced skips) the step count stood still at the last good step."""
        self.total += bad
        self.streak.mul_(bad).add_(bad)  # +1 while bad, back to 0 on a good step
        if check and self.streak.item() >= self.max_streak:
            streak = int(self.streak)
            raise NonFiniteStreak(
                f"the loss or its gradients were not finite for {streak} steps in a row (up to step "
                f"{step}); lower the learning rate, check the data, or resume from an earlier checkpoint",
                since=step - streak if steps_advanced else step,
            )

    def skip_now(self, bad: torch.Tensor | None, sync_free: bool, step: int) -> bool:
        """The synced path: True (counted, warned) if this step's optimizer step must not be taken.
        Nothing to do (False, no sync) when unchecked (`bad` None) or sync-free."""
        if bad is None or sync_free or not bad.item():  # the one host sync of a step
            return False
        self.count(bad, step, check=True, steps_advanced=False)
        log.warning("non-finite loss or gradients at step %d: step skipped (%d in a row)", step, int(self.streak))
        return True


def takes_found_inf(optimizer) -> bool:
    """Whether `optimizer` (or the one a Lightning wrapper holds) can skip a step on the device."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(inner.defaults.get("fused"))
