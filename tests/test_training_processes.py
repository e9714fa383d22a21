"""train.py as users run it, in subprocesses: crash and resume, DDP, FSDP2, config errors, sweeps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_train(data_root, run_dir, *overrides, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=quickstart",
        f"paths.data_dir={data_root}",
        f"paths.runs_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
        "data.num_workers=1",
        "data.val_num_workers=0",
        "data.pin_memory=false",
        "loss.perceptual_weight=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


# GAN from step 4 so the discriminator, its optimizer groups and the LeCam buffers are all in play.
RESUME = [
    "stage=2",
    "stages.stage2.max_steps=12",
    "stages.stage2.gan_start_step=4",
    "checkpoint_every=6",
    "data.train_batches_per_epoch=5",
    "stages.stage2.image_size=56",
    "data.batch_size=4",
]


@pytest.fixture(scope="module")
def stage1_dir(photos_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "s1"
    run_train(
        photos_dir,
        run_dir,
        "stage=1",
        "stages.stage1.max_steps=4",
        "stages.stage1.image_size=56",
        "data.train_batches_per_epoch=4",
        "data.batch_size=4",
    )
    return run_dir


def test_kill_and_resume_is_bit_identical(photos_dir, stage1_dir, tmp_path):
    straight = tmp_path / "straight"
    run_train(photos_dir, straight, *RESUME, f"init_from={stage1_dir}")

    crashed = tmp_path / "crashed"
    killed = run_train(
        photos_dir,
        crashed,
        *RESUME,
        f"init_from={stage1_dir}",
        "+callbacks.kill._target_=tests.helpers.KillAfterCheckpoint",
        "+callbacks.kill.step=6",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: a real crash
    assert (crashed / "checkpoints" / "last.ckpt").exists() and not (crashed / "tokenizer").exists()
    refused = run_train(photos_dir, crashed, *RESUME, f"init_from={stage1_dir}", check=False)
    assert refused.returncode != 0 and "resume=auto" in refused.stderr.strip().splitlines()[-1]
    run_train(photos_dir, crashed, *RESUME, f"init_from={stage1_dir}", "resume=auto")

    a, b = module_state(straight / "checkpoints" / "last.ckpt"), module_state(crashed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("discriminator.") for k in a)
    assert any(k.startswith("lecam.") for k in a)
    assert not any("teacher" in k for k in a)  # the frozen teacher is rebuilt, not saved
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    opt_a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    opt_b = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_bad_configs_fail_with_one_clear_line(photos_dir, tmp_path):
    cases = {
        "stage=3": "stage=3 is not a tokenizer stage",
        "stage=2 init_from=null": "stage 2 needs init_from",
        "stages.stage1.image_size=250 model.config.pad_to_multiple=false": "not a multiple of 28",
        "init_from=/nonexistent": "init_from=/nonexistent does not exist",
    }
    for overrides, message in cases.items():
        result = run_train(photos_dir, tmp_path / "bad", *overrides.split(), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr[
            -2000:
        ]
        assert "Traceback" not in result.stderr
