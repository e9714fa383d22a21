"""Start-up checks of a composed training config: one clear line per mistake, before anything is built."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from unilip.errors import ConfigError

TOKENIZER_STAGES = {1: "decoder alignment", 2: "self-distillation"}
GENERATION_STAGES = {1: "connector alignment", 2: "pretraining", 3: "SFT"}
UNIFIED_STAGES = {1: "generation for understanding", 2: "understanding for generation"}


# task -> its stages, named for the error message
TASK_STAGES = {"tokenizer": TOKENIZER_STAGES, "generate": GENERATION_STAGES, "unified": UNIFIED_STAGES}

__all__ = ["ConfigError", "check_train_config"]


def check_train_config(cfg: DictConfig) -> None:
    stages = TASK_STAGES.get(cfg.task)
    if stages is None:
        raise ConfigError(f"task={cfg.task!r} is not known; use one of {sorted(TASK_STAGES)}")
    stage = cfg.stage
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in stages:
        choices = " or ".join(f"stage={number} ({name})" for number, name in stages.items())
        raise ConfigError(f"stage={stage!r} is not a {cfg.task} stage; use {choices}")
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
