"""Stopping honestly on a signal: checkpoint at a step boundary on every rank together, then stop.

Two signals end a job before its last step:

- SIGTERM (`scancel`, a preemption, a Kubernetes eviction; schedulers send SIGKILL some seconds later):
  `StopOnSignal` stops after the step in progress, `RunCheckpoint` writes `checkpoints/last.ckpt`, and
  `train.py` exits with 143 (128 + 15, what a process killed by SIGTERM reports), without a result, so the
  scheduler records a stopped job, not a finished one; `resume=auto` continues it exactly.
- SIGUSR1 under SLURM (`#SBATCH --signal=USR1@300`, five minutes before the time limit, docker/README.md):
  `SlurmRequeue` does the same, then asks SLURM to requeue the job (`scontrol requeue`) and exits 0; the
  requeued job continues with `resume=auto`.

Lightning's own handlers act inside the signal handler, i.e. wherever the step happens to be: its SLURM
handler saves a checkpoint there (after the optimizer step and before the schedule, say), so the resumed run
is not the uninterrupted one, and under DDP/FSDP each rank saves (a collective) whenever its own signal
arrives; its SIGTERM handler makes the loop raise a `SystemExit` without a checkpoint, whose exit code is 0.
Here the handler only sets a flag; at the end of a step the ranks agree (one tiny all-reduce every
`check_every` steps: a signal that reached one rank stops all) and stop together after that step.
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


class StopOnSignal(L.Callback):
    """Stop at a step boundary, on every rank together, when `signal_name` arrives (see the module docstring).

    Args:
        signal_name: the signal that stops the run (SIGTERM by default).
        check_every: steps between the ranks' checks of the flag; a scheduler's grace period (SLURM's
            KillWait, Kubernetes' terminationGracePeriodSeconds: 30 s by default) must cover this many steps
            plus writing a checkpoint.
    """

    def __init__(self, signal_name: str = "SIGTERM", check_every: int = 1):
        self.signum = signal.Signals[signal_name]
        self.check_every = check_every
        self.received = False
        self.stopped = False  # training stopped on the signal: the run is not finished
        self._previous: Any = None

    @property
    def exit_code(self) -> int:
        """What the process reports once it stopped: 128 + the signal's number, as if the signal had ended it."""
        return 128 + int(self.signum)

    def _install(self) -> None:
        if self._previous is None:
            self._previous = signal.signal(self.signum, self._on_signal)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before the fit loop starts: replace it here.
        if self._previous is not None:
            return
        self._install()

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
        if received and not self.stopped:
            log.info("%s at step %d: stopping to checkpoint", self.signum.name, trainer.global_step)
            self.stopped = True
            trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            if signal.getsignal(self.signum) == self._on_signal:
                signal.signal(self.signum, self._previous)
            self._previous = None


class SlurmRequeue(StopOnSignal):
    """Under SLURM, stop at a step boundary on the requeue signal, then requeue (see the module docstring).

    Args:
        signal_name: the signal `#SBATCH --signal` sends (SIGUSR1 by default, as Lightning's).
        check_every: steps between checks; the lead time of `--signal` must cover this many steps
            plus writing a checkpoint.
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every: int = 10):
        super().__init__(signal_name, check_every)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and SLURMEnvironment.detect():
            self._install()  # before Lightning would install its own

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # outside SLURM the signal means nothing here

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
