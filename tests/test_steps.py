"""The backward and guarded optimiser step the tokenizer and generation tasks share (unilip.training.steps).

The module stands in for a LightningModule with what the step reads (`device_mesh` is None without FSDP2,
as Lightning's own property); the optimiser is a real AdamW, fused or not, behind the `.optimizer` of
Lightning's wrapper.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from unilip.training.nonfinite import NonFiniteGuard, NonFiniteStreak
from unilip.training.steps import backward_step, optimizer_step

FINITE = [torch.tensor(0.5), torch.tensor(2.0)]  # a loss and a gradient norm
BAD = [torch.tensor(0.5), torch.tensor(float("inf"))]  # a finite loss, a non-finite gradient norm


class _Count:
    def __init__(self) -> None:
        self.updates = 0

    def update(self) -> None:
        self.updates += 1


class _Wrapped:
    """What `LightningModule.optimizers()` returns: the optimiser behind `.optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()


def _module(skip: bool = True, logging: bool = True, mesh=None, max_streak: int = 20) -> SimpleNamespace:
    connector = SimpleNamespace(should_update_logs=logging)  # what Lightning's `is_logging_step` reads
    return SimpleNamespace(
        skip_nonfinite=skip,
        nonfinite=NonFiniteGuard(max_streak),
        global_step=7,
        ema=_Count(),
        trainer=SimpleNamespace(_logger_connector=connector),
        device_mesh=mesh,
    )


def _training(fused: bool):
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    return param, _Wrapped(optimizer), LambdaLR(optimizer, lambda step: 1.0)


def _no_host_sync(monkeypatch) -> None:
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host sync (.item()) in a sync-free step"))


def test_a_fused_optimizer_skips_a_bad_step_on_the_device_without_a_host_sync(monkeypatch):
    """Sync-free: the flag goes to fused AdamW as `found_inf` (weights and moments untouched), the step still
    counts (schedule and EMA advance), the running state gets the flag, and nothing waits for the device."""
    param, optimizer, scheduler = _training(fused=True)
    module, flags = _module(logging=False), []
    _no_host_sync(monkeypatch)
    logged = optimizer_step(module, optimizer, scheduler, BAD, flags.append)
    monkeypatch.undo()
    assert logged is False  # not a logging step
    assert torch.equal(param.detach(), torch.ones(3))
    assert float(optimizer.optimizer.found_inf) == 1.0
    assert (scheduler.last_epoch, module.ema.updates) == (1, 1)
    assert [float(flag) for flag in flags] == [1.0]
    assert (float(module.nonfinite.total), float(module.nonfinite.streak)) == (1.0, 1.0)

    _no_host_sync(monkeypatch)
    optimizer_step(module, optimizer, scheduler, FINITE, flags.append)  # a good step: the flag is reset
    monkeypatch.undo()
    assert float(optimizer.optimizer.found_inf) == 0.0 and not torch.equal(param.detach(), torch.ones(3))
    assert [float(flag) for flag in flags] == [1.0, 0.0]
    assert (float(module.nonfinite.total), float(module.nonfinite.streak)) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("fused", "mesh"), [(False, None), (True, "a device mesh")], ids=["unfused", "fused-under-FSDP2"]
)
def test_without_a_device_side_skip_a_bad_step_is_not_taken(fused, mesh):
    """Unfused AdamW, or fused under FSDP2 (the flag would have to meet sharded parameters): the step is
    skipped with a sync, and nothing moves: weights, schedule, EMA, running state."""
    param, optimizer, scheduler = _training(fused=fused)
    module, flags = _module(mesh=mesh), []
    assert optimizer_step(module, optimizer, scheduler, BAD, flags.append) is False
    assert torch.equal(param.detach(), torch.ones(3)) and not hasattr(optimizer.optimizer, "found_inf")
    assert (scheduler.last_epoch, module.ema.updates, flags) == (0, 0, [])
    assert float(module.nonfinite.total) == 1.0

    assert optimizer_step(module, optimizer, scheduler, FINITE, flags.append) is True  # a good, logged step
    assert not torch.equal(param.detach(), torch.ones(3))
    assert (scheduler.last_epoch, module.ema.updates, [float(flag) for flag in flags]) == (1, 1, [0.0])


def test_with_the_check_off_every_step_is_taken_and_nothing_is_counted():
    param, optimizer, scheduler = _training(fused=True)
    module, flags = _module(skip=False), []
    assert optimizer_step(module, optimizer, scheduler, BAD, flags.append) is True
    assert not torch.equal(param.detach(), torch.ones(3)) and not hasattr(optimizer.optimizer, "found_inf")
    assert (scheduler.last_epoch, module.ema.updates, flags) == (1, 1, [None])
    assert float(module.nonfinite.total) == 0.0


def test_a_sync_free_streak_stops_the_run_at_the_next_logging_step():
    """Sync-free steps look at the streak only where Lightning logs (a host sync there anyway)."""
    _, optimizer, scheduler = _training(fused=True)
    module = _module(logging=False, max_streak=2)
    for _ in range(3):  # past the limit, but no logging step yet
        optimizer_step(module, optimizer, scheduler, BAD)
    module.trainer._logger_connector.should_update_logs = True
    with pytest.raises(NonFiniteStreak, match="not finite for 4 steps in a row"):
        optimizer_step(module, optimizer, scheduler, BAD)


def _depthwise():
    """A depthwise conv fed channels-last activations: its weight (C, 1, 3, 3) has strides (9, 9, 3, 1), its
    gradient arrives with (9, 1, 3, 1): the same memory, described two ways (what DDP compares exactly)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    loss = conv(torch.randn(2, 5, 5, 8).movedim(-1, 1)).square().mean()
    return conv, loss


def test_the_first_backward_gives_parameters_their_gradients_strides_and_later_ones_do_not():
    conv, loss = _depthwise()
    before = conv.weight.detach().clone()
    module = SimpleNamespace(_probe_layouts=True, parameters=conv.parameters, manual_backward=torch.Tensor.backward)
    backward_step(module, loss)
    assert conv.weight.stride() == conv.weight.grad.stride() == (9, 1, 3, 1)
    assert torch.equal(conv.weight, before) and not module._probe_layouts  # same values; once only

    conv, loss = _depthwise()  # the probe is off (later steps, or FSDP2): parameters keep their layout
    module.parameters = conv.parameters
    backward_step(module, loss)
    assert conv.weight.stride() == (9, 9, 3, 1) and conv.weight.grad is not None
