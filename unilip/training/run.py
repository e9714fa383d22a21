"""What `python train.py` does: check the config, build the parts, fit, save the result.

The task's LightningModule comes from the builder its `conf/task/<task>.yaml` names (`builder`, a `_target_`):
this module, like the rest of `unilip.training`, imports no task."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.entry import start_run
from unilip.logs import quiet_third_party_noise
from unilip.training.checkpoints import RunCheckpoint
from unilip.training.config import ConfigError, check_train_config
from unilip.training.epochs import plan_steps, world_size
from unilip.training.loggers import logger_resume_arguments
from unilip.training.requeue import SlurmRequeue

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch (for Lightning's throughput monitor): images, or cached latents."""
    return len(batch["key"]) if "key" in batch else batch["image"].shape[0]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to silently overwrite a run."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        if last.exists():
            log.info("resuming from %s", last)
            return _readable_checkpoint(last)
        log.info("resume=auto: no checkpoint in %s yet, starting from the beginning", run_dir)
        return None
    if cfg.resume is not None:
        return _readable_checkpoint(Path(cfg.resume))
    if last.exists():
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
            "or name=<new name> for a new one"
        )
    return None


def _readable_checkpoint(path: Path) -> str:
    """Refuse, before anything is built, a checkpoint file Lightning could not read (truncated or not one)."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ConfigError(
            f"resume: {path} is not a readable checkpoint (truncated, or not a torch.save file); resume from an "
            f"earlier one (resume={path.parent}/step<N>.ckpt)"
        )
    return str(path)


def train(cfg: DictConfig) -> Path:
    """Run one training job described by a composed `conf/train.yaml`; returns the run directory."""
    quiet_third_party_noise()
    check_train_config(cfg)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # fp32 matmuls and convolutions on tensor cores (recipe)
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    run_dir = Path(cfg.run_dir)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    plan_steps(cfg, datamodule)  # recipe.epochs -> trainer.max_steps; logs samples, epochs, steps, global batch
    module = instantiate(cfg.builder)(cfg)  # the task's builder (conf/task/<task>.yaml); every module has save_result
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values() if callback]
    logger = (
        instantiate(cfg.logger, **logger_resume_arguments(cfg.logger.get("_target_"), ckpt_path))
        if cfg.logger
        else False
    )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if trainer.world_size != world_size(cfg.trainer):
        raise ConfigError(
            f"the trainer runs {trainer.world_size} processes, the step plan counted {world_size(cfg.trainer)}; "
            "set trainer.devices (and trainer.num_nodes) explicitly"
        )
    start_run(run_dir, rank=trainer.global_rank)  # every check passed: .hydra/ and the log file
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for each in trainer.loggers:
        each.log_hyperparams(resolved)  # the whole resolved config (W&B: the run's config), not only overrides
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if not isinstance(trainer.checkpoint_callback, RunCheckpoint):  # RunCheckpoint wrote it at the last step
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if any(isinstance(c, SlurmRequeue) and c.stopped for c in trainer.callbacks):  # not finished: continues later
        if trainer.is_global_zero:
            SlurmRequeue.requeue()
        return run_dir
    module.save_result(run_dir)
    return run_dir
