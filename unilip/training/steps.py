"""The backward and optimiser step the tokenizer and generation tasks share (manual optimisation).

Both take, per training step: one backward (restriding parameters once under DDP, see
`GradientLayoutProbe`), gradient clipping of their own, then `optimizer_step`: the non-finite check
on the loss and every gradient norm (synced, or sync-free through fused AdamW's `found_inf`), the
optimiser and schedule steps, the EMA, and the streak count. The module provides `nonfinite` (a
`NonFiniteGuard`), `skip_nonfinite`, `ema` (or None) and `_probe_layouts`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unilip.logs import is_logging_step
from unilip.training.distributed import GradientLayoutProbe
from unilip.training.nonfinite import takes_found_inf


def backward_step(module, loss: torch.Tensor) -> None:
    """`module.manual_backward(loss)`; on the first call under DDP, parameters take their gradients' strides."""
    probe = GradientLayoutProbe(module.parameters()) if module._probe_layouts else None
    module.manual_backward(loss)
    if probe is not None:
        module._probe_layouts = False
        probe.apply()


def optimizer_step(
    module,
    optimizer,
    scheduler,
    checked: list[torch.Tensor],
    after_step: Callable[[torch.Tensor | None], None] | None = None,
) -> bool:
    """Step `optimizer` and `scheduler` unless a value of `checked` (the loss, the gradient norms) is not
    finite on some rank; then `after_step(bad)` (other running state: `bad` is the step's 0/1 flag, or None
    when unchecked) and the EMA. Returns whether Lightning logs this step (False for a skipped step too)."""
    # sync-free on one device or DDP; under FSDP2 the flag would have to meet sharded parameters
    sync_free = module.skip_nonfinite and takes_found_inf(optimizer) and getattr(module, "device_mesh", None) is None
    bad = module.nonfinite.flag(*checked) if module.skip_nonfinite else None
    if module.nonfinite.skip_now(bad, sync_free, module.global_step):
        return False
    if sync_free:
        optimizer.optimizer.found_inf = bad  # fused AdamW leaves weights and moments alone if 1
    optimizer.step()
    scheduler.step()
    if after_step is not None:
        after_step(bad)
    if module.ema is not None:
        module.ema.update()
    logging_step = is_logging_step(module.trainer)
    if bad is not None:
        module.nonfinite.count(bad, module.global_step, check=sync_free and logging_step)
    return logging_step
