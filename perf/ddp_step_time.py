"""Step time of tokenizer stage 2 (GAN on) under DDP with CPU processes, for any checkout of the project.

    python perf/ddp_step_time.py --repo . --processes 2 --repeat 3 [--json ddp_step_time.json]
    python perf/ddp_step_time.py --repo /path/to/older/checkout      # the same, before a change

Runs that checkout's `train.py` (tiny preset, bundled photos, gloo) and reports the median time per
step over the steps after `--warmup`, from the ThroughputMonitor's `train/time` column: what a
change to the distributed set-up (unused-parameter search, gradient copies into buckets) costs
or saves per step, measured end to end. Runs of two checkouts should be interleaved on a quiet
machine (`--repeat`), since one step of the tiny model takes tens of milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def step_times(repo: Path, processes: int, steps: int, data_dir: Path, run_dir: Path) -> list[float]:
    """Seconds per step of one run (steps 1.. of `train/time`, the cumulative training time)."""
    command = [
        sys.executable,
        str(repo / "train.py"),
        "experiment=quickstart",
        "stage=2",
        f"init_from={run_dir.parent / 'init'}",
        f"paths.data_dir={data_dir}",
        f"paths.runs_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={processes}",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"stages.stage2.max_steps={steps}",
        "stages.stage2.gan_start_step=0",
        "stages.stage2.image_size=56",
        f"data.train_batches_per_epoch={steps}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_urls=null",
        "loss.perceptual_weight=0",
        f"checkpoint_every={10 * steps}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(repo)
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"train.py failed in {repo}:\n{result.stderr[-3000:]}")
    with open(run_dir / "logs" / "metrics.csv") as file:
        times = [float(row["train/time"]) for row in csv.DictReader(file) if row.get("train/time")]
    return [b - a for a, b in itertools.pairwise(times)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, action="append", help="checkout(s) to measure (default: this one)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out")
    parser.add_argument("--repeat", type=int, default=3, help="runs per checkout, interleaved")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    repos = [path.resolve() for path in (args.repo or [Path(__file__).resolve().parents[1]])]
    sys.path.insert(0, str(repos[0]))
    from unilip.data import build_photo_shards
    from unilip.models import UniLIPTokenizer

    try:
        from unilip.models.presets import tokenizer_preset
    except ImportError:  # a checkout from before unilip.models.loading became unilip.models.presets
        from unilip.models.loading import tokenizer_preset

    samples: dict[str, list[float]] = {str(repo): [] for repo in repos}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_photo_shards(root / "photos")
        UniLIPTokenizer(tokenizer_preset("tiny")).save_pretrained(root / "runs" / "init")
        for run in range(args.repeat):
            for index, repo in enumerate(repos):
                run_dir = root / "runs" / f"repo{index}-run{run}"
                times = step_times(repo, args.processes, args.steps, root, run_dir)
                samples[str(repo)] += times[args.warmup :]
    report = {repo: {"median_ms": 1000 * statistics.median(t), "steps": len(t)} for repo, t in samples.items()}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
