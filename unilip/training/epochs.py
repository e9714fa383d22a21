"""Stages given in data epochs, as the reference counts them (5 per generation stage), turned into steps.

One data epoch reads every training source `repeat` times (its sample count from the shards' index):
    steps = ceil(epochs x samples per epoch / global batch),   global batch = data.batch_size x processes
The plan is logged at the start of every run, with max_steps given directly too (then in epochs, when
the data is counted), so a run says how much of its data it will see.
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig, ListConfig

from unilip.training.config import ConfigError

log = logging.getLogger(__name__)


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the trainer config asks for: devices x num_nodes ("auto"/-1: the visible GPUs, or 1)."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, list | ListConfig):
        count = len(devices)
    elif devices in ("auto", -1, "-1"):
        gpu = trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    else:
        count = int(devices)
    return count * int(trainer_cfg.get("num_nodes", 1))


def plan_steps(cfg: DictConfig, datamodule) -> int:
    """Set `trainer.max_steps` from `recipe.epochs` when the recipe gives epochs instead of steps; log the plan."""
    recipe = cfg.recipe
    epochs, max_steps = recipe.get("epochs"), recipe.get("max_steps")
    if (epochs is None) == (max_steps is None):
        raise ConfigError(
            f"stages.stage{cfg.stage}: give either epochs (data epochs, as the reference) or max_steps, not "
            f"{'both' if epochs is not None else 'neither'} (epochs={epochs}, max_steps={max_steps})"
        )
    global_batch = cfg.data.batch_size * world_size(cfg.trainer)
    samples = per_source = None
    if hasattr(datamodule, "epoch_samples") and datamodule.train_sources:
        samples, per_source = datamodule.epoch_samples()
    if epochs is not None:
        if samples is None:
            uncounted = [name for name, (repeat, n) in (per_source or {}).items() if repeat is None or n is None]
            raise ConfigError(
                f"stages.stage{cfg.stage}.epochs={epochs} needs every data source to give `repeat` and a sample "
                f"count; {uncounted or 'this data'} does not (count shards with `python -m unilip.data.index DIR`, "
                "or give max_steps)"
            )
        max_steps = math.ceil(epochs * samples / global_batch)
        cfg.trainer.max_steps = max_steps
    sources = ", ".join(
        f"{name} {repeat or '-'} x {n if n is not None else '?'}" for name, (repeat, n) in (per_source or {}).items()
    )
    if samples is None:
        log.info(
            "data: %d steps at global batch %d = %d samples (sources: %s)",
            max_steps,
            global_batch,
            max_steps * global_batch,
            sources or "not counted",
        )
    else:
        log.info(
            "data: %d samples per epoch (%s), %.2f epochs, global batch %d (%d per process x %d) -> %d steps",
            samples,
            sources,
            max_steps * global_batch / samples,
            global_batch,
            cfg.data.batch_size,
            world_size(cfg.trainer),
            max_steps,
        )
    return max_steps
