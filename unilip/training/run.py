"""What `python train.py` does: check the config, build the parts, fit, save the result."""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.entry import start_run
from unilip.logs import quiet_third_party_noise
from unilip.models.hub import load_strict
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer
from unilip.tasks.generation.setup import build_generation_training
from unilip.tasks.tokenizer.module import TokenizerTraining
from unilip.tasks.unified.setup import build_unified_training
from unilip.training.checkpoints import RunCheckpoint, read_checkpoint
from unilip.training.config import ConfigError, check_train_config
from unilip.training.epochs import plan_steps, world_size
from unilip.training.lineage import build_teacher, check_same_architecture, load_trained_tokenizer
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
    module = instantiate(
        cfg.module,
        tokenizer=tokenizer,
        loss=instantiate(cfg.loss),
        discriminator=instantiate(cfg.discriminator) if gan else None,
        teacher=teacher,
        metadata={"lineage": lineage, "init_from": init_path},
    )
    if cfg.discriminator_from == "init" and module.discriminator is not None:
        carry_over_discriminator(module, init_path)
    elif cfg.discriminator_from not in (None, "init"):
        raise ConfigError(f"discriminator_from={cfg.discriminator_from!r}: use null (a fresh one) or init")
    return module


def carry_over_discriminator(module: TokenizerTraining, init_path: str | None) -> None:
    """Start the discriminator and its LeCam EMAs from the checkpoint of the run `init_path` names (e.g.
    stage 2 at 448 px from the 224 px stage-2 run, whose GAN trained for its last 200k steps)."""
    checkpoint = None
    if init_path is not None:
        path = Path(init_path)
        last = path / "checkpoints" / "last.ckpt"
        checkpoint = read_checkpoint(last if last.exists() else path, "tokenizer")
    state = checkpoint["state_dict"] if checkpoint else {}
    weights = {k[len("discriminator.") :]: v for k, v in state.items() if k.startswith("discriminator.")}
    if not weights:
        raise ConfigError(
            f"discriminator_from=init: init_from={init_path} holds no discriminator (a run or checkpoint whose GAN "
            "had started is needed); use discriminator_from=null for a fresh one"
        )
    load_strict(module.discriminator, weights, what=f"the discriminator of {init_path}")
    lecam = {k[len("lecam.") :]: v for k, v in state.items() if k.startswith("lecam.")}
    load_strict(module.lecam, lecam, what=f"the LeCam EMAs of {init_path}")
    log.info("discriminator and LeCam EMAs carried over from %s", init_path)


# task name -> builder of its LightningModule; every module has `save_result(run_dir)`.
TASKS: dict[str, Callable[[DictConfig], L.LightningModule]] = {
    "tokenizer": build_tokenizer_training,
    "generate": build_generation_training,
    "unified": build_unified_training,
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
