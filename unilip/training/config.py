"""Start-up checks of a composed training config: every mistake in one line, before anything is built or written.

`check_train_config` is the one place: the task and stage, every value against the typed schema below
(`unilip.schema`: types and ranges, checked where each value is set), then the rules that tie keys
together. `train.py` calls it before the heavy imports, so a mistake is reported in about a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf

from unilip.errors import ConfigError
from unilip.schema import Data, Trainer, problems, raw, value

TOKENIZER_STAGES = {1: "decoder alignment", 2: "self-distillation"}
GENERATION_STAGES = {1: "connector alignment", 2: "pretraining", 3: "SFT"}
UNIFIED_STAGES = {1: "generation for understanding", 2: "understanding for generation"}


# task -> its stages, named for the error message
TASK_STAGES = {"tokenizer": TOKENIZER_STAGES, "generate": GENERATION_STAGES, "unified": UNIFIED_STAGES}

__all__ = ["ConfigError", "check_train_config"]

EMA = "null: no EMA"


def _betas(betas: list) -> bool:
    numbers = [b for b in betas if isinstance(b, (int, float)) and not isinstance(b, bool)]
    return len(betas) == 2 and len(numbers) == 2 and all(0 <= b < 1 for b in numbers)


# ------------------------------------------------------------------ the schema (unilip.schema)
@dataclass
class AdamW:
    weight_decay: float = value(ge=0)
    betas: list = value(check=lambda betas: None if _betas(betas) else "must be [beta1, beta2], each in [0, 1)")
    fused: bool | None = value()


@dataclass
class Optim:
    optimizer: AdamW
    lr: float = value(gt=0)
    discriminator_lr: float = value(ge=0, hint="0 holds the discriminator still")
    final_lr: float = value(ge=0, hint="where the cosine schedule ends")
    warmup_steps: int = value(ge=0)
    grad_clip: float | None = value(gt=0, hint="null: no clipping")
    ema_decay: float | None = value(ge=0, lt=1, hint=EMA)


@dataclass
class Recipe:
    """One `stages.stage<N>` block; a stage runs max_steps, or epochs of its data."""

    max_steps: int | None = value(ge=1, hint="or give epochs")
    epochs: float | None = value(gt=0, hint="or give max_steps")
    image_size: int = value(ge=1)


@dataclass
class TokenizerRecipe(Recipe):
    gan_start_step: int = value(ge=0)
    distill_weight: float = value(ge=0)
    encoder_lr_multiplier: float = value(ge=0)


@dataclass
class GenerationRecipe(Recipe):
    latent_space: Literal["unilip", "dcae"] = value()
    train_dit: bool = value()


@dataclass
class UnifiedRecipe(Recipe):
    lr: float = value(gt=0)


@dataclass
class Module:
    """What every task's LightningModule takes (each value usually comes from `optim` or the recipe)."""

    lr: float = value(gt=0)
    final_lr: float = value(ge=0)
    max_steps: int = value(ge=1)
    grad_clip: float | None = value(gt=0, hint="null: no clipping")
    ema_decay: float | None = value(ge=0, lt=1, hint=EMA)
    max_nonfinite_streak: int = value(ge=1)
    skip_nonfinite: bool = value()
    gradient_checkpointing: bool = value()


@dataclass
class TokenizerModule(Module):
    discriminator_lr: float = value(ge=0, hint="0 holds the discriminator still")
    encoder_lr_multiplier: float = value(ge=0)
    warmup_steps: int = value(ge=0)
    gan_start_step: int = value(ge=0)
    lecam_decay: float = value(ge=0, le=1)
    compile: bool | str = value()
    channels_last: bool = value()


@dataclass
class GenerationModule(Module):
    warmup_ratio: float = value(ge=0, le=1)
    weight_decay: float = value(ge=0)
    cfg_dropout: float = value(ge=0, le=1)
    logit_mean: float = value()
    logit_std: float = value(gt=0)
    num_samples: int = value(ge=0)
    sample_size: int = value(ge=1)
    sample_steps: int = value(ge=1)
    guidance_scale: float = value(ge=0)
    sample_scheduler: Literal["dpm", "euler"] = value()
    flow_shift: float | None = value(gt=0, hint="null: the DiT preset's")


@dataclass
class Rendering:
    steps: int = value(ge=1)
    guidance_scale: float = value(ge=0)
    size: int = value(ge=1)


@dataclass
class Sampling(Rendering):
    noise_level: float = value(ge=0)


@dataclass
class UnifiedModule(Module):
    rendering: Rendering
    sampling: Sampling
    warmup_steps: int = value(ge=0)
    weight_decay: float = value(ge=0)
    group_size: int = value(ge=2, hint="GRPO compares G outputs of one input")
    clip_range: float = value(gt=0)
    kl_weight: float = value(ge=0)
    flow_kl: Literal["flow_grpo", "step"] = value()
    null_branch_gradient: bool = value()
    updates_per_rollout: int = value(ge=1)
    rollout_chunk: int | None = value(ge=1, hint="null: the whole rollout")


@dataclass
class TokenizerLoss:
    l2_weight: float = value(ge=0)
    l1_weight: float = value(ge=0)
    perceptual_weight: float = value(ge=0)
    lpips_weight: float = value(ge=0)
    convnext_weight: float = value(ge=0)
    distill_weight: float = value(ge=0)
    gan_weight: float = value(ge=0)
    lecam_weight: float = value(ge=0)


@dataclass
class StopOnSignal:
    check_every: int = value(ge=1)


@dataclass
class Callbacks:
    requeue: StopOnSignal
    sigterm: StopOnSignal


@dataclass
class TrainConfig:
    """conf/train.yaml, the keys every task shares; the task adds its recipe, module (and loss)."""

    optim: Optim
    data: Data
    trainer: Trainer
    callbacks: Callbacks
    name: str = value()
    seed: int = value(ge=0, lt=2**32)
    checkpoint_every: int = value(ge=1, hint="optimizer steps between checkpoints")
    tf32: bool = value()
    resume: str | None = value(hint="auto, or a checkpoint")
    init_from: str | None = value()


# task -> (its recipe, its LightningModule's arguments, its loss)
TASK_SCHEMAS: dict[str, tuple[type, type, type | None]] = {
    "tokenizer": (TokenizerRecipe, TokenizerModule, TokenizerLoss),
    "generate": (GenerationRecipe, GenerationModule, None),
    "unified": (UnifiedRecipe, UnifiedModule, None),
}


# ------------------------------------------------------------------ the checks
def check_train_config(cfg: DictConfig) -> None:
    """Refuse, in one line naming every bad key, a config that cannot run (see the module docstring)."""
    stages = TASK_STAGES.get(cfg.task)
    if stages is None:
        raise ConfigError(f"task={cfg.task!r} is not known; use one of {sorted(TASK_STAGES)}")
    stage = cfg.stage
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in stages:
        choices = " or ".join(f"stage={number} ({name})" for number, name in stages.items())
        raise ConfigError(f"stage={stage!r} is not a {cfg.task} stage; use {choices}")
    recipe, module, loss = TASK_SCHEMAS[cfg.task]
    found = problems(cfg, TrainConfig, "")
    found += problems(OmegaConf.select(cfg, f"stages.stage{stage}"), recipe, f"stages.stage{stage}")
    found += problems(cfg.get("module"), module, "module")
    if loss is not None:
        found += problems(cfg.get("loss"), loss, "loss")
    if found:
        raise ConfigError("; ".join(found))
    _check_schedule(cfg)
    image_size = cfg.data.image_size
    model = cfg.model.config
    multiple = int(model.vision.patch_size / model.downsample_ratio)
    if image_size % multiple and not model.pad_to_multiple:
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of {multiple} and model.config.pad_to_multiple=false; "
            f"use a multiple of {multiple} (224, 448) or set model.config.pad_to_multiple=true"
        )
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume} does not exist; use resume=auto or an existing checkpoint")
    if cfg.init_from is not None and not Path(cfg.init_from).exists():
        raise ConfigError(
            f"init_from={cfg.init_from} does not exist; give a run directory, a checkpoint (.ckpt) or a saved tokenizer"
        )


def _check_schedule(cfg: DictConfig) -> None:
    """The cosine schedule runs from the peak LR down to `final_lr`: an absolute LR (the recipe's 1e-4 -> 1e-5),
    so a peak below it is refused, naming both keys where they are set."""
    lr, final_lr = cfg.module.get("lr"), cfg.module.get("final_lr")
    if lr is None or final_lr is None or final_lr <= lr:
        return
    lr_key, final_key = source_key(cfg, "module.lr"), source_key(cfg, "module.final_lr")
    raise ConfigError(
        f"{lr_key}={lr:g} is below {final_key}={final_lr:g}, where the cosine schedule ends; lower {final_key} "
        f"too (e.g. {final_key}={lr / 10:g}, the recipe's tenth of the peak) or raise {lr_key}"
    )


def source_key(cfg: DictConfig, key: str) -> str:
    """The key a value is set under: `module.lr` -> `optim.lr` (its `${optim.lr}`), `recipe.x` ->
    `stages.stage<N>.x`. For messages: name what the user types."""
    for _ in range(10):  # interpolation chains are short; a cycle would not resolve anyway
        parent, _, leaf = key.rpartition(".")
        if parent.split(".")[0] == "recipe":
            parent = f"stages.stage{cfg.stage}" + parent[len("recipe") :]
        written = raw(OmegaConf.select(cfg, parent) if parent else cfg)
        item = written.get(leaf) if isinstance(written, dict) else None
        match = re.fullmatch(r"\$\{([\w.]+)\}", item) if isinstance(item, str) else None
        key = f"{parent}.{leaf}" if parent else leaf
        if match is None:
            return key
        key = match.group(1)
    return key
