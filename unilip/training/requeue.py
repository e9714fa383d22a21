"""SLURM auto-requeue: on the warning signal before the time limit, checkpoint at a step boundary on
every rank together, requeue the job, and stop; the requeued job continues with `resume=auto`.

    #SBATCH --signal=USR1@300        # SIGUSR1 five minutes before the time limit (docker/README.md)
    srun python train.py ... resume=auto

Lightning's own handler (`SLURMEnvironment(auto_requeue=True)`) saves the checkpoint inside the
signal handler, i.e. wherever the step happens to be (after the optimizer step and before the
schedule, say), so the resumed run is not the uninterrupted one; and under DDP/FSDP each rank
saves (a collective) whenever its own signal arrives, which can interleave with the step's
collectives. Here the handler only sets a flag; at the end of a step the ranks agree (one tiny
all-reduce every `check_every` steps) and stop together after that step, `RunCheckpoint` writes
`checkpoints/last.ckpt` at that step boundary, and `train.py` asks SLURM to requeue the job and
exits without writing a result. Installing this handler first keeps Lightning from installing its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SlurmRequeue(L.Callback):
    """Stop at a step boundary when SLURM's requeue signal arrives, then requeue (see the module docstring).

    Args:
        signal_name: the signal `#SBATCH --signal` sends (SIGUSR1 by default, as Lightning's).
        check_every: steps between checks; the lead time of `--signal` must cover this many steps
            plus writing a checkpoint.
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every: int = 10):
        self.signum = signal.Signals[signal_name]
        self.check_every = check_every
        self.received = False
        self.stopped = False  # training stopped for a requeue: the run is not finished
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and SLURMEnvironment.detect():
            self._previous = signal.signal(self.signum, self._on_signal)  # before Lightning installs its own

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True  # only a flag: the step in progress finishes first

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.check_every:
            return
        received = self.received
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(received)], device=pl_module.device)
            dist.all_reduce(flag)
            received = bool(flag.item())
        if received:
            log.info("requeue signal at step %d: stopping to checkpoint and requeue", trainer.global_step)
            self.stopped = True
            trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    @staticmethod
    def requeue() -> None:
        """`scontrol requeue` this job (or array task); call on one rank after the checkpoint is written."""
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        else:
            log.info("requeued SLURM job %s; it continues from the checkpoint with resume=auto", job)
