"""Every script under perf/ runs at its smallest size and writes the fields its docs read, so that no benchmark
rots unseen (perf/overhead.py broke once when `configure_optimizers` changed what it returns, and nothing ran it).

Each runs as a program, as the docs show it, in its own process tree (killed on a timeout); its numbers are not
checked: the machine's load decides them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


def _rows(written):
    return written if isinstance(written, list) else [written]


# script -> (its smallest arguments, where its JSON keeps its rows, the fields every row has). "{out}" is the
# JSON path, "{repo}" this checkout.
SMALLEST = {
    "overhead.py": (
        "--steps 3 --warmup 1 --repeats 2 --json {out}",
        _rows,
        ["lightning_ms_per_step", "bare_ms_per_step", "median_ratio", "min_ratio", "max_ratio", "ratios", "threads"],
    ),
    "throughput.py": (
        "--stages 1 2 g2 g2c --sizes 56 --batch 56=1 --generation-batch 3 --steps 3 --json {out}",
        _rows,
        ["preset", "stage", "size", "batch", "images_per_s", "ms_per_step", "model_tflop_per_step"],
    ),
    "ddp_step_time.py": (
        "--repo {repo} --processes 2 --steps 4 --warmup 1 --repeat 1 --json {out}",
        lambda written: list(written.values()),  # per checkout
        ["median_ms", "steps"],
    ),
    "prepare_speed.py": (
        "--samples 8 --repeats 1 --json {out}",
        lambda written: list(written["results"].values()),  # per dataset family
        ["1_process", "2_processes"],
    ),
    "target_flops.py": (
        "--presets unilip_1b --json {out}",
        _rows,
        ["encode_unilip_448", "source_features_448", "encode_dcae_512", "step_stage2_t2i", "bytes_t2i"],
    ),
    "unified_cost.py": (
        "--images 1 --group 2 --caption-tokens 4 --render-steps 1 --sde-steps 1 --json {out}",
        lambda written: [written["stage1"], written["stage2"]],
        ["tflops", "total_tflops", "seconds"],
    ),
    "loader_before_after.py": (
        "--before {repo} --sizes 56 --workers 0 1 --rounds 2 --batches 2 --batch-size 4 --images 16 --json {out}",
        lambda written: list(written["settings"].values()),  # per size / worker count
        ["before", "after", "ratios", "median_ratio", "min_ratio", "max_ratio"],
    ),
}


def test_every_perf_script_has_its_smallest_run():
    assert sorted(SMALLEST) == sorted(p.name for p in (REPO / "perf").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_a_perf_script_runs_at_its_smallest_size(script, tmp_path):
    arguments, rows_of, fields = SMALLEST[script]
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "perf" / script)]
    command += [a.format(out=out, repo=REPO) for a in arguments.split()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["OMP_NUM_THREADS"] = "1"
    result = run_tree(command, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-4000:]}"
    rows = rows_of(json.loads(out.read_text()))
    assert rows
    for row in rows:
        missing = [f for f in fields if f not in row]
        assert not missing, f"{script}: {missing} missing from {sorted(row)}"
