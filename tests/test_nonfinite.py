"""The non-finite guard on its own: what counts as a bad step, the streak, when a run stops, which optimizer
can skip on the device."""

import logging
import tempfile

import pytest
import torch
import torch.distributed as dist

from unilip.training.nonfinite import NonFiniteGuard, takes_found_inf

INF, NAN = float("inf"), float("nan")


def test_a_step_is_bad_when_the_loss_or_any_gradient_norm_is_not_finite():
    flag = NonFiniteGuard.flag
    assert flag(torch.tensor(1.5)).item() == 0.0
    assert flag(torch.tensor(1.5), torch.tensor(3.0), torch.tensor([0.5])).item() == 0.0
    for bad in (INF, -INF, NAN):
        assert flag(torch.tensor(bad)).item() == 1.0  # the loss
        assert flag(torch.tensor(0.2), torch.tensor(bad)).item() == 1.0  # a gradient norm, loss finite
        assert flag(torch.tensor(0.2), torch.tensor(1.0), torch.tensor(bad)).item() == 1.0
    assert flag(torch.tensor(NAN), torch.tensor(INF)).item() == 1.0  # at most 1, however many are bad
    assert flag(torch.tensor(1.0, requires_grad=True) * 2).dtype == torch.float32  # detached, a float flag


def test_the_streak_counts_consecutive_bad_steps_and_stops_the_run_at_its_limit():
    guard = NonFiniteGuard(max_streak=3)
    bad, good = torch.tensor(1.0), torch.tensor(0.0)
    for flag, total, streak in ((bad, 1, 1), (bad, 2, 2), (good, 2, 0), (bad, 3, 1), (bad, 4, 2)):
        guard.count(flag, step=0, check=True)
        assert (guard.total.item(), guard.streak.item()) == (total, streak)
    guard.count(bad, step=7, check=False)  # a streak of 3, not checked (sync-free, not a logging step)
    assert guard.streak.item() == 3
    with pytest.raises(RuntimeError, match=r"not finite for 4 steps in a row \(up to step 8\)") as stopped:
        guard.count(bad, step=8, check=True)
    # sync-free, the bad steps 5-8 were counted as steps: the last good one (the checkpoint to go back to) is 4
    assert stopped.value.since == 4
    assert {name for name, _ in guard.named_buffers()} == {"total", "streak"}  # saved in checkpoints


def test_skip_now_skips_and_counts_only_bad_synced_steps(caplog):
    guard = NonFiniteGuard(max_streak=2)
    assert not guard.skip_now(None, sync_free=False, step=0)  # unchecked
    assert not guard.skip_now(torch.tensor(0.0), sync_free=False, step=0)  # a good step
    assert not guard.skip_now(torch.tensor(1.0), sync_free=True, step=0)  # sync-free: the optimizer skips
    assert guard.total.item() == 0
    with caplog.at_level(logging.WARNING):
        assert guard.skip_now(torch.tensor(1.0), sync_free=False, step=5)
    assert guard.total.item() == 1 and guard.streak.item() == 1
    assert [r.getMessage() for r in caplog.records] == [
        "non-finite loss or gradients at step 5: step skipped (1 in a row)"
    ]
    with pytest.raises(RuntimeError, match=r"2 steps in a row \(up to step 6\)") as stopped:
        guard.skip_now(torch.tensor(1.0), sync_free=False, step=6)
    assert stopped.value.since == 6  # synced skips do not count as steps: the step count stood at the last good one
    assert NonFiniteGuard().max_streak == 20  # the documented default: 20 bad steps in a row stop a run


def test_only_a_fused_optimizer_skips_on_the_device():
    weights = [torch.nn.Parameter(torch.zeros(2))]
    assert takes_found_inf(torch.optim.AdamW(weights, fused=True))
    assert not takes_found_inf(torch.optim.AdamW(weights))
    assert not takes_found_inf(torch.optim.SGD(weights, lr=0.1))

    class Wrapped:  # Lightning's LightningOptimizer holds the optimizer in `.optimizer`
        optimizer = torch.optim.AdamW(weights, fused=True)

    assert takes_found_inf(Wrapped())


def test_the_flag_is_reduced_over_the_process_group(tmp_path):
    """In a process group (one rank here, in this process) the flag goes through the all-reduce."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert NonFiniteGuard.flag(torch.tensor(NAN)).item() == 1.0
        assert NonFiniteGuard.flag(torch.tensor(0.0)).item() == 0.0
    finally:
        dist.destroy_process_group()


def test_every_rank_skips_when_one_rank_is_bad():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        flags = mp.Manager().dict()
        mp.spawn(_flag_rank, args=(f"file://{tmp}/store", flags), nprocs=2, join=True)
        # rank 1 bad -> both skip; both bad -> still 1 (a flag, not a count of bad ranks)
        assert dict(flags) == {(0, "one"): 1.0, (1, "one"): 1.0, (0, "both"): 1.0, (1, "both"): 1.0}


def _flag_rank(rank, init, flags):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    loss = torch.tensor(NAN if rank == 1 else 0.5)
    flags[rank, "one"] = NonFiniteGuard.flag(loss, torch.tensor(1.0)).item()
    flags[rank, "both"] = NonFiniteGuard.flag(torch.tensor(INF), torch.tensor(1.0)).item()
    dist.destroy_process_group()
