"""What changes with the number of ranks, checked in one process: evaluation reads each shard once and
each sample once, training streams differ per rank and worker, metrics reduce over every rank, and
gradients land in DDP's buckets without a copy."""

import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from unilip.data.simulate import simulate_evaluation, simulate_training, synthetic_shards
from unilip.data.streams import TrainSource, eval_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {n: synthetic_shards(root / str(n), n, samples_per_shard=3) for n in (5, 40)}


@pytest.mark.parametrize(("num_shards", "ranks", "workers"), [(5, 64, 8), (40, 64, 8), (40, 3, 2), (5, 1, 1)])
def test_evaluation_reads_each_shard_once_and_each_sample_once(shards, num_shards, ranks, workers):
    """The whole pass opens every shard exactly once, however many ranks x workers there are (before: with
    fewer shards than the 512 slots of 64 ranks x 8 workers, every slot read every shard: 2,560 reads of 5)."""
    report = simulate_evaluation(shards[num_shards], ranks, workers)
    assert report["shard reads"] == num_shards
    assert report["samples seen"] == report["distinct samples"] == 3 * num_shards
    fewest, most = map(int, report["fewest / most samples on a rank"].split(" / "))
    assert most - fewest <= 3 * (1 + (num_shards % ranks != 0))  # ranks differ by at most one shard


def test_eval_shard_assignment_balances_ranks():
    """50 shards (ImageNet val) on 8 ranks x 8 workers: 7 or 6 shards per rank, one per worker, none twice."""
    plan = {(r, w): eval_shards(50, r, 8, w, 8) for r in range(8) for w in range(8)}
    every = sorted(i for shards in plan.values() for i in shards)
    assert every == list(range(50))
    per_rank = [sum(len(plan[r, w]) for w in range(8)) for r in range(8)]
    assert per_rank == [7, 7, 6, 6, 6, 6, 6, 6]
    assert max(len(shards) for shards in plan.values()) == 1


def test_training_streams_differ_per_rank_and_worker(shards):
    report = simulate_training([TrainSource("s", tuple(shards[40]), 1.0)], world_size=16, num_workers=4, samples=12)
    assert report["streams"] == report["distinct streams"] == 64


def test_epoch_means_are_per_sample_over_all_ranks_even_with_empty_ranks():
    """3 gloo ranks, 2 samples: rank 2 sees none and must still join the reduction; the result is the mean over
    samples (not over ranks or batches), as one process computes it."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_epoch_means_rank, args=(3, f"file://{tmp}/store", results), nprocs=3, join=True)
        assert dict(results) == {r: {"val/psnr": pytest.approx(15.0)} for r in range(3)}


def _epoch_means_rank(rank, world_size, init, results):
    from unilip.training.validation import EpochMeans

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    means = EpochMeans(["val/psnr", "val/ssim"])
    if rank == 0:
        means.add("val/psnr", torch.tensor([10.0]))
    if rank == 1:
        means.add("val/psnr", torch.tensor([20.0]))
    results[rank] = means.compute(torch.device("cpu"))  # val/ssim: seen by no rank, left out
    dist.destroy_process_group()


class _DepthwiseAfterLinear(nn.Module):
    """A linear layer on (B, H, W, C) moved to (B, C, H, W): channels-last activations into a depthwise conv,
    the pattern of diffusers' DC-AE attention and SANA's GLUMBConv."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.depthwise(self.linear(x).movedim(-1, 1)).square().mean()


@pytest.mark.parametrize("probe", [True, False])
def test_gradients_arrive_in_their_ddp_bucket_layout_after_the_first_step(tmp_path, probe):
    """DDP compares gradient and bucket strides exactly; a depthwise weight's gradient arrives channels-last.
    After the probe (first step) the buckets are rebuilt with the gradients' strides: no copy per step."""
    from torch.nn.parallel import DistributedDataParallel

    from unilip.training.distributed import GradientLayoutProbe

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = _DepthwiseAfterLinear()
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
        arrived = []
        model.depthwise.weight.register_post_accumulate_grad_hook(lambda p: arrived.append(p.grad.stride()))
        before = model.depthwise.weight.detach().clone()
        buckets = []
        for step in range(3):
            model.zero_grad(set_to_none=True)
            layouts = GradientLayoutProbe(model.parameters()) if probe and step == 0 else None
            ddp(torch.randn(2, 5, 5, 8)).backward()
            if layouts is not None:
                assert layouts.apply() == 1  # only the depthwise weight differs
                assert torch.equal(model.depthwise.weight, before)  # a new description of the same values
            buckets.append(model.depthwise.weight.grad.stride())  # after DDP: the grad is the bucket view
    finally:
        dist.destroy_process_group()
    assert arrived == [(9, 1, 3, 1)] * 3
    if probe:
        assert buckets[1:] == arrived[1:]
    else:
        assert buckets[1:] != arrived[1:]  # what DDP copies every step without the probe


def test_every_rank_yields_as_many_validation_batches(photos_dir):
    """One shard of 12 photos on 3 ranks: rank 0 reads it all (5 + 5 + 2), ranks 1 and 2 yield as many
    padding batches, so FSDP's collective forward passes meet on every rank."""
    import torch.multiprocessing as mp

    url = str(photos_dir / "photos" / "val-000000.tar")
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_validation_batches_rank, args=(3, f"file://{tmp}/store", url, results), nprocs=3, join=True)
        sizes = {rank: [(len(keys), padding) for keys, padding in results[rank]] for rank in range(3)}
        assert sizes[0] == [(5, False), (5, False), (2, False)]
        assert sizes[1] == sizes[2] == [(1, True)] * 3
        assert len({k for keys, _ in results[0] for k in keys}) == 12  # every photo once, on rank 0


def _validation_batches_rank(rank, world_size, init, url, results):
    from unilip.data import EvalLoader, SampleTransform

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    loader = EvalLoader([url], SampleTransform(32, train=False), batch_size=5, rank=rank, world_size=world_size)
    results[rank] = [(list(batch["key"]), bool(batch.get("padding"))) for batch in loader]
    dist.destroy_process_group()
