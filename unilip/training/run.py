"""What `python train.py` does: check the config, build the parts, fit, save the result."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.logs import quiet_third_party_noise
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer
from unilip.training.config import ConfigError, check_train_config
from unilip.training.epochs import plan_steps, world_size
from unilip.training.generation_setup import build_generation_training
from unilip.training.lineage import build_teacher, check_same_architecture, load_trained_tokenizer
from unilip.training.tokenizer import TokenizerTraining

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, Any]) -> int:
    """Images in a batch (for Lightning's throughput monitor)."""
    return batch["image"].shape[0]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to silently overwrite a run."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto":
        if last.exists():
            log.info("resuming from %s", last)
            return str(last)
        log.info("resume=auto: no checkpoint in %s yet, starting from the beginning", run_dir)
        return None
    if cfg.resume is not None:
        return str(cfg.resume)
    if last.exists():
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
            "or name=<new name> for a new one"
        )
    return None


def _init_source(cfg: DictConfig) -> str | None:
    if cfg.init_from is not None:
        return str(cfg.init_from)
    if cfg.stage == 1:
        return None
    stage1 = Path(cfg.paths.runs_dir) / cfg.name / cfg.task / "stage1"
    if stage1.exists():
        log.info("stage 2 starts from this run name's stage-1 run: %s", stage1)
        return str(stage1)
    raise ConfigError(
        f"stage 2 needs init_from=<stage-1 run directory or checkpoint>; none given and no stage-1 run at {stage1}"
    )


def build_tokenizer_training(cfg: DictConfig) -> TokenizerTraining:
    preset: TokenizerConfig = instantiate(cfg.model.config)
    init_path = _init_source(cfg)
    teacher = None
    lineage: dict[str, Any] = {"stage": cfg.stage, "encoder_trained": cfg.stage == 2, "teacher": None}
    if init_path is None:
        tokenizer: UniLIPTokenizer = instantiate(cfg.model)
    else:
        init = load_trained_tokenizer(init_path)
        config = check_same_architecture(init.tokenizer.config, preset, init.source)
        tokenizer = init.tokenizer
        tokenizer.config = config
        if cfg.stage == 1 and init.lineage.get("encoder_trained"):
            raise ConfigError(f"init_from={init_path} has a trained encoder; stage 1 starts from the original encoder")
        if cfg.stage == 2:
            teacher, lineage["teacher"] = build_teacher(cfg.teacher_from, init, preset)
    # training moves the latents: a trained tokenizer's scale is measured again, never inherited
    tokenizer.config = dataclasses.replace(tokenizer.config, latent_scale=None)
    gan = cfg.recipe.gan_start_step < cfg.trainer.max_steps
    return instantiate(
        cfg.module,
        tokenizer=tokenizer,
        loss=instantiate(cfg.loss),
        discriminator=instantiate(cfg.discriminator) if gan else None,
        teacher=teacher,
        metadata={"lineage": lineage, "init_from": init_path},
    )


# task name -> builder of its LightningModule; every module has `save_result(run_dir)`.
TASKS: dict[str, Callable[[DictConfig], L.LightningModule]] = {
    "tokenizer": build_tokenizer_training,
    "generate": build_generation_training,
}


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
    module = TASKS[cfg.task](cfg)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values() if callback]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if trainer.world_size != world_size(cfg.trainer):
        raise ConfigError(
            f"the trainer runs {trainer.world_size} processes, the step plan counted {world_size(cfg.trainer)}; "
            "set trainer.devices (and trainer.num_nodes) explicitly"
        )
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    module.save_result(run_dir)
    return run_dir
