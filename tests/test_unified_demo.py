"""The unified loop's demonstration (`python -m unilip.tasks.unified.demo`, docs/unified.md) at a reduced size:
stage 2 (the DiT trained with Flow-GRPO on its own samples) raises the mean reward, measured before and after
under the same randomness. Stage 1 is left out: at toy size its rise is not reliable across seeds (a random
generator barely hears its caption; docs/unified.md, "Demonstration"), so a test of it would be a coin toss.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stage_two_of_the_demo_raises_the_reward(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = tmp_path / "demo.json"
    command = [
        sys.executable, "-m", "unilip.tasks.unified.demo", "--seed", "0", "--steps", "40", "--measure-seeds", "4",
        "--stages", "2", "--out", str(tmp_path / "runs"), "--json", str(out),
        "captioner_from=base",  # stage 2 alone: the MLLM's own captions instead of a stage-1 run's
    ]  # fmt: skip
    result = run_tree(command, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = json.loads(out.read_text())["stages"]["2"]
    gains = np.subtract(stage["end_per_seed"], stage["start_per_seed"])
    # measured at this size: +0.339 +- 0.011 (each of the 4 paired measurements +0.31 to +0.36), in ~15 s of
    # training; another CPU's rounding takes another sample path, hence the margins
    assert (gains > 0).all(), gains
    assert gains.mean() > 0.1 and gains.mean() > 5 * stage["gain_se"], (gains.mean(), stage["gain_se"])
