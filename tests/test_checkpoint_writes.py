"""Checkpoint files are written beside their target and renamed into place: a kill or a failure mid-write
leaves the previous checkpoint whole and nothing in $TMPDIR (which on clusters is often another filesystem)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]

# Writes a valid checkpoint, then a second one through the trainer the config builds, and stalls where the
# written file would be moved into place, so that the test can SIGKILL it there.
CHILD = """
import os, shutil, sys, time
from pathlib import Path
import torch
from hydra.utils import instantiate
from tests.conftest import compose_train

target, ready = Path(sys.argv[1]), Path(sys.argv[2])
cfg = compose_train(["trainer=cpu", f"run_dir={target.parent}"])
io = instantiate(cfg.trainer, logger=False, callbacks=[]).strategy.checkpoint_io
io.save_checkpoint({"w": torch.zeros(8)}, target)

def stall(*args, **kwargs):
    ready.write_text("writing")
    time.sleep(120)

os.replace = shutil.move = stall
io.save_checkpoint({"w": torch.ones(4 << 20)}, target)  # 16 MB
"""


def _checkpoint_io():
    cfg = compose_train(["trainer=cpu", "run_dir=."])
    return instantiate(cfg.trainer, logger=False, callbacks=[]).strategy.checkpoint_io


def test_a_kill_during_a_checkpoint_write_leaves_the_last_one_whole_and_nothing_in_tmpdir(tmp_path):
    tmpdir, target, ready = tmp_path / "tmpdir", tmp_path / "checkpoints" / "last.ckpt", tmp_path / "ready"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(ready)], cwd=REPO, env=env) as child:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
    assert ready.exists(), "the child never reached the move"
    left = [p for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache folder aside
    assert left == []  # Lightning's own writer leaves a full-size orphan here
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(8))  # the previous one, whole
    assert sorted(p.name for p in target.parent.iterdir()) == [".last.ckpt.partial", "last.ckpt"]
    _checkpoint_io().save_checkpoint({"w": torch.full((3,), 2.0)}, target)  # the next write of that name
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.full((3,), 2.0))


def test_a_failed_checkpoint_write_removes_its_file_and_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "step0000100.ckpt"
    io = _checkpoint_io()
    io.save_checkpoint({"w": torch.zeros(8)}, target)
    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"w": torch.ones(1 << 20), "unpicklable": lambda: None}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000100.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(8))


def test_every_trainer_config_writes_checkpoints_this_way():
    for kind in ("cpu", "default", "ddp", "fsdp"):
        plugins = compose_train([f"trainer={kind}", "run_dir=."]).trainer.plugins
        assert [p._target_ for p in plugins] == ["unilip.training.checkpoints.BesideTargetCheckpointIO"], kind
