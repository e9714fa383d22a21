"""The unified loop optimises: both steps raise the mean reward on the bundled photos (tiny models, CPU).

    python -m unilip.tasks.unified.demo [--steps 200] [--seed 0] [--out runs/unified_demo] [--json out.json]
        [--threads 1] [--stages 1 2] [key=value ...]

A tiny generator with random weights (the quick start's sizes) is the decoder, the tiny InternVL LLM over the
tiny UniLIP encoder the captioner, and the reward the similarity under two fixed random encoders
(`reward=tiny`), which the tiny models can move. Both stages run through `train()` as `python train.py
task=unified` does, on the same two photos every step (astronaut and coffee at 56 px). The mean reward is
measured before and after each stage with the same randomness (`--measure-seeds`, 64, rollouts of G samples per
photo: captions and renderings for stage 1, SDE samples for stage 2), so start -> end compares the policies,
not the draws. Stage 2 regenerates stage 1's captions.

Toy settings on top of the quick start's: captions of 8 tokens, and stage 1 renders with guidance 15 at
learning rate 1e-2. A random generator barely listens to its caption (over 64 captions of one photo its reward
varies by a standard deviation of 0.002 to 0.02, against 0.07 over rendering noise); guidance amplifies what it
hears, which gives the captioner something to learn (standard deviations 0.014 and 0.033 at guidance 15).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unilip.logs import cli_logging, output, quiet_third_party_noise
from unilip.models.presets import compose_config
from unilip.models.toy import save_toy_generator

PHOTOS = ("astronaut", "coffee")
SIZE = 56


class _Repeat(Dataset):
    def __init__(self, batch: dict, count: int):
        self.batch, self.count = batch, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.batch


class FixedPhotos(L.LightningDataModule):
    """The same bundled photos (whole, resized to `size`) every step, one process."""

    def __init__(self, names: list[str], size: int, steps: int, **_: object):
        super().__init__()
        from unilip.data.samples import load_photo

        images = [np.asarray(load_photo(n).resize((size, size), Image.Resampling.LANCZOS)) for n in names]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        self.batch = {"image": pixels, "key": list(names), "caption": list(names)}
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, self.steps), batch_size=None, collate_fn=lambda b: b)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, 1), batch_size=None, collate_fn=lambda b: b)


def save_tiny_generator(root: Path, seed: int) -> Path:
    """The quick start's generator sizes with random weights (seeded), saved as training saves one."""
    return save_toy_generator(root, num_queries=16, seed=seed)


def config(out: Path, generator: Path, stage: int, steps: int, seed: int, group: int, extra: list[str]):
    return compose_config(
        "train",
        [
            "experiment=unified/quickstart",
            f"stage={stage}",
            "name=demo",
            f"seed={seed}",
            f"paths.runs_dir={out}",
            f"paths.data_dir={out / 'data'}",
            f"run_dir={out / 'demo' / 'unified' / f'stage{stage}'}",
            f"generator_from={generator}",
            "data._target_=__main__.FixedPhotos",
            f"+data.names={list(PHOTOS)}",
            f"+data.size={SIZE}",
            f"+data.steps={steps}",
            "+trainer.use_distributed_sampler=false",
            "trainer.check_val_every_n_epoch=100000",  # no validation: the measurement below is the evaluation
            "trainer.enable_progress_bar=false",
            f"stages.stage{stage}.max_steps={steps}",
            f"module.group_size={group}",
            "captioner.max_new_tokens=8",
            "module.rendering.guidance_scale=15",
            "stages.stage1.lr=1.0e-2",
            *extra,
        ],
    )


@torch.no_grad()
def mean_rewards(cfg, images: torch.Tensor, seeds: list[int], checkpoint: Path | None = None) -> list[float]:
    """The stage's mean rollout reward under each seed's randomness (before training, or with `checkpoint`'s
    weights): one number per seed, so that start and end pair up."""
    from unilip.tasks.unified.setup import build_unified_training

    module = build_unified_training(cfg)
    if checkpoint is not None:
        module.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    rewards = []
    for seed in seeds:
        module.rng.manual_seed(seed)
        rewards.append(module.rollout(images).rewards.mean().item())
    return rewards


def seconds_per_step(run: Path) -> float:
    """Median wall time of a training step (rollout, update, logging), from the run's ThroughputMonitor log."""
    with open(run / "logs" / "metrics.csv") as handle:
        times = [float(row["train/time"]) for row in csv.DictReader(handle) if row.get("train/time")]
    return float(np.median(np.diff(times)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", type=int, default=8)
    # 64: stage 1's gain is a few thousandths with a paired spread of ~0.02, which 16 measurements cannot resolve
    parser.add_argument("--measure-seeds", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/unified_demo"))
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more thrash on a loaded machine)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both stages (key=value)")
    args = parser.parse_args(argv)
    cli_logging(logging.WARNING)
    quiet_third_party_noise()
    torch.set_num_threads(args.threads)
    from unilip.training.run import train

    out = args.out.resolve()
    generator = save_tiny_generator(out / "tiny", args.seed)
    images = FixedPhotos(list(PHOTOS), SIZE, 1).batch["image"]
    seeds = [10_000 + s for s in range(args.measure_seeds)]
    results = {"seed": args.seed, "steps": args.steps, "group_size": args.group, "photos": list(PHOTOS),
               "size": SIZE, "measure_seeds": seeds, "overrides": args.overrides, "stages": {}}  # fmt: skip
    for stage in args.stages:
        cfg = config(out, generator, stage, args.steps, args.seed, args.group, args.overrides)
        before = mean_rewards(cfg, images, seeds)
        started = time.perf_counter()
        run = train(cfg)
        seconds = time.perf_counter() - started
        after = mean_rewards(cfg, images, seeds, run / "checkpoints" / "last.ckpt")
        per_step = seconds_per_step(run)
        gains = np.subtract(after, before)
        gain_se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
        results["stages"][stage] = {
            "start": float(np.mean(before)),
            "end": float(np.mean(after)),
            "gain_se": gain_se,  # standard error of the paired gain over the measurement seeds
            "start_per_seed": before,
            "end_per_seed": after,
            "seconds": seconds,
            "seconds_per_step": per_step,
        }
        output(__name__).info(
            f"stage {stage}: mean reward {np.mean(before):.4f} -> {np.mean(after):.4f} (gain {gains.mean():+.4f} "
            f"+- {gain_se:.4f} over {len(seeds)} measurements; {args.steps} steps, {per_step:.2f} s per step, "
            f"{seconds:.0f} s in all)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
