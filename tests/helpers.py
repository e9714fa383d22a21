"""Test-only pieces that configs can name (`_target_: tests.helpers...`) in subprocess runs."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class KillAfterCheckpoint(L.Callback):
    """SIGKILL the process right after the checkpoint of step `step` is written: a real crash, no clean-up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning runs checkpoint callbacks last, so the checkpoint of step `self.step` exists only
        # once the next batch starts.
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class _GlobalBatches(Dataset):
    """Step s serves global batch s of a fixed image tensor; rank r takes its contiguous slice."""

    def __init__(self, images: torch.Tensor, global_batch: int, steps: int, rank: int, world_size: int):
        self.images, self.global_batch, self.steps = images, global_batch, steps
        self.local = global_batch // world_size
        self.rank = rank

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        start = (step * self.global_batch) % len(self.images) + self.rank * self.local
        index = torch.arange(start, start + self.local) % len(self.images)
        return {"image": self.images[index], "key": [str(i) for i in index.tolist()]}


class FixedGlobalBatches(L.LightningDataModule):
    """Identical global batches whatever the number of processes (for the DDP-equals-one-process test)."""

    def __init__(self, images_file: str, global_batch: int, steps: int, image_size: int = 112, **_: object):
        super().__init__()
        self.images = torch.load(images_file, weights_only=True)
        self.global_batch, self.steps, self.image_size = global_batch, steps, image_size

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        dataset = _GlobalBatches(self.images, self.global_batch, self.steps, rank, world)
        return DataLoader(dataset, batch_size=None, shuffle=False)


class StopAfter(L.Callback):
    """Ask the trainer to stop (gracefully, on every rank) once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
