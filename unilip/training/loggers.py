"""A run's metric history survives a resume: the CSV file is continued, not replaced, and a W&B run
is continued under its own id.

Lightning's CSV logger deletes `metrics.csv` when it starts in a directory that has one, so a
resumed run used to lose everything logged before the interruption. Here:

- `CSVLogger` keeps the file; the first row a run logs, at step s, cuts it back to the rows of
  steps before s (what was logged after the checkpoint is logged again by the resumed run, exactly
  once; a run from the beginning, at step 0, starts an empty file), and new rows are appended;
- `RunHistory` (a callback) writes the CSV rows out as soon as a checkpointed batch has logged
  them (at the start of the next batch), so that a crash after a checkpoint loses no row of it,
  and records the W&B run id in every checkpoint;
- `train.py` reads the W&B id from the checkpoint it resumes (`logger_resume_arguments`), so the
  W&B logger continues the same run.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

CHECKPOINT_KEY = "unilip_run_history"


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing `metrics.csv` is continued: the first row this run logs
    (at step s) cuts the file back to its rows of steps before s, and new rows are appended."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._continued = False

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._continued:
            self._continued = True
            self._keep_steps_before(step if step is not None else 0)
        super().log_metrics(metrics_dict, step)

    def _keep_steps_before(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header, rows = reader.fieldnames or [], [row for row in reader if int(row["step"]) < step]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = list(header)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger whose `metrics.csv` is continued by a resumed run (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def flush(self) -> None:
        self.save()


class RunHistory(L.Callback):
    """Lets a resumed run continue its loggers' history (see the module docstring)."""

    def __init__(self) -> None:
        self._flush_next_batch = False

    @staticmethod
    def _csv_loggers(trainer: L.Trainer) -> list[CSVLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            ids = [logger.experiment.id for logger in trainer.loggers if isinstance(logger, WandbLogger)]
            checkpoint[CHECKPOINT_KEY] = {"wandb_id": ids[0]} if ids else {}
        # the checkpointed batch logs its row after this hook: write it out before the next batch
        self._flush_next_batch = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, index: int) -> None:
        if self._flush_next_batch:
            self._flush_next_batch = False
            for logger in self._csv_loggers(trainer):
                logger.flush()


def logger_resume_arguments(logger_target: str | None, checkpoint: str | None) -> dict[str, Any]:
    """Constructor arguments that make the logger continue the run of `checkpoint` (a file, or an FSDP
    checkpoint directory): the W&B run id. Empty for a fresh run or another logger."""
    if checkpoint is None or not logger_target or not logger_target.endswith("WandbLogger"):
        return {}
    path = Path(checkpoint)
    if path.is_dir():  # FSDP2: Lightning keeps the non-tensor state in meta.pt
        path = path / "meta.pt"
    if not path.is_file():
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    run_id = state.get(CHECKPOINT_KEY, {}).get("wandb_id")
    return {"id": run_id} if run_id else {}
