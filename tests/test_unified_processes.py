"""The unified task with two CPU processes (gloo), as `python train.py task=unified trainer=ddp|fsdp` runs it:
each rank has its own images and rollouts. DDP keeps the trained parameters identical on both ranks; FSDP2
shards them and must train exactly what DDP trains, and resume exactly."""

import csv
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests import sampling_helpers
from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


class SaveTrainedPerRank(L.Callback):
    """Every rank writes what it holds of its trained parameters at the end of fit (`rank<r>.pt` in `directory`):
    whole tensors under DDP, its shards under FSDP2."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        held = {}
        for name, tensor in pl_module.trained.state_dict().items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            held[name] = local.detach().cpu().clone()
        if pl_module.networks.reference_dit is not None:
            reference = pl_module.networks.reference_dit.parameters()
            held["reference_elements"] = torch.tensor(sum(p.to_local().numel() for p in reference))
        torch.save(held, self.directory / f"rank{trainer.global_rank}.pt")


def unified(photos_dir, tmp_path, generator, name, stage, trainer, *overrides, steps=2) -> Path:
    """One `train.py task=unified` run on 2 processes; returns its run directory."""
    run_dir = tmp_path / "runs" / name / "unified" / f"stage{stage}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [
        sys.executable, str(REPO / "train.py"), "task=unified", "experiment=unified/quickstart", f"stage={stage}",
        f"name={name}", f"paths.data_dir={photos_dir}", f"paths.runs_dir={tmp_path / 'runs'}",
        f"hydra.run.dir={run_dir}", f"generator_from={generator}", f"trainer={trainer}", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "data.num_workers=0", "data.val_num_workers=0", "data.pin_memory=false", "data.val_batch_size=2",
        f"stages.stage{stage}.max_steps={steps}", "data.train_batches_per_epoch=2", "module.group_size=2",
        "captioner.max_new_tokens=4", "module.rendering.steps=1", "module.sampling.steps=2",
        "+callbacks.ranks._target_=tests.test_unified_processes.SaveTrainedPerRank",
        f"+callbacks.ranks.directory={run_dir / 'ranks'}", *overrides,
    ]  # fmt: skip
    result = run_tree(command, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, f"{name} stage {stage} failed:\n{result.stderr[-4000:]}"
    assert "sync_dist" not in result.stderr  # validation means are reduced once, and Lightning knows it
    return run_dir


def held(run_dir: Path) -> tuple[dict, dict]:
    return tuple(torch.load(run_dir / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def rewards(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as file:
        return [float(row["reward/total"]) for row in csv.DictReader(file) if row.get("reward/total")]


def worst_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow  # four CLI starts of two processes each: a minute or two on two shared cores
def test_fsdp_trains_what_ddp_trains_in_both_stages(photos_dir, tmp_path, tiny_config):
    generator = sampling_helpers.save_tiny_generator(tmp_path / "tiny", tiny_config)
    # SGD: updates linear in the gradients, so the comparison measures the gradients (Adam's g / sqrt(v) turns
    # rounding in near-zero gradients into steps of size lr, which says nothing about FSDP)
    sgd = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "+optim.optimizer.momentum=0.9"]
    sgd.append("module.gradient_checkpointing=true")  # as the real recipes run (recomputation gathers again)
    # stage 2 renders its validation batches one row at a time: a rank whose validation data is done (padding
    # batches of one row) must still gather the sharded DiT as often as the other
    stages = {1: ["stages.stage1.lr=0.2"], 2: ["stages.stage2.lr=0.2", "module.rollout_chunk=1"]}
    runs = {
        (strategy, stage): unified(photos_dir, tmp_path, generator, strategy, stage, strategy, *sgd, *extra)
        for strategy in ("ddp", "fsdp")
        for stage, extra in stages.items()
    }
    for stage in (1, 2):
        first, second = held(runs["ddp", stage])  # DDP: the same whole tensors on both ranks
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), stage
        shards = held(runs["fsdp", stage])  # FSDP2: each rank holds half of every trained tensor
        for name, whole in first.items():
            rows = [s[name].shape[0] for s in shards]
            assert sum(rows) == whole.shape[0] and max(rows) < whole.shape[0], (name, rows)
            assert (torch.cat([s[name] for s in shards]) - whole).abs().max() < 1e-5, name
        # the same rollouts, step for step
        assert rewards(runs["fsdp", stage]) == pytest.approx(rewards(runs["ddp", stage]), abs=1e-5)
    # the results, gathered from the shards: what DDP trained (its adapters moved; FSDP's sums round alike)
    ddp, fsdp = (load_file(runs[s, 1] / "captioner" / "adapter_model.safetensors") for s in ("ddp", "fsdp"))
    lora_b = max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k)
    print(f"stage 1 adapters, FSDP2 vs DDP: max |difference| {worst_difference(ddp, fsdp):.2e}, max |B| {lora_b:.2e}")
    assert lora_b > 1e-3 and worst_difference(ddp, fsdp) < 1e-5
    ddp, fsdp = (load_file(runs[s, 2] / "generator" / "model.safetensors") for s in ("ddp", "fsdp"))
    start = load_file(Path(generator) / "model.safetensors")
    moved, apart = worst_difference(start, ddp), worst_difference(ddp, fsdp)
    print(f"stage 2 generator, FSDP2 vs DDP: max |difference| {apart:.2e}, moved by up to {moved:.2e}")
    assert moved > 1e-3 and apart < 1e-5


@pytest.mark.slow  # three CLI starts of two processes each
def test_fsdp_resume_of_a_fully_trained_dit_is_exact(photos_dir, tmp_path, tiny_config):
    from unilip.training.distributed import load_sharded_checkpoint

    generator = sampling_helpers.save_tiny_generator(tmp_path / "tiny", tiny_config)
    # every DiT weight trained, its frozen copy the KL's reference (sharded too), two updates per rollout
    full = ["captioner_from=base", "dit_training.mode=full", "module.updates_per_rollout=2", "checkpoint_every=2"]
    args = (photos_dir, tmp_path, generator)
    straight = unified(*args, "straight", 2, "fsdp", *full, steps=4)
    stop = ["+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.step=2"]
    unified(*args, "resumed", 2, "fsdp", *full, *stop, steps=4)
    resumed = unified(*args, "resumed", 2, "fsdp", *full, "resume=auto", steps=4)
    a, b = (load_sharded_checkpoint(run / "checkpoints" / "last.ckpt") for run in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    assert rewards(straight) == rewards(resumed)
    saved = [load_file(run / "generator" / "model.safetensors") for run in (straight, resumed)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    whole = sum(v.numel() for k, v in saved[0].items() if k.startswith("dit."))
    shards = held(straight)  # the trained DiT and its reference copy, half on each rank
    assert sum(s["reference_elements"].item() for s in shards) == whole
    assert max(s["reference_elements"].item() for s in shards) < 0.6 * whole
    assert sum(v.numel() for s in shards for k, v in s.items() if k != "reference_elements") == whole
