"""Building a tokenizer run from its config: the starting weights, the stage-2 teacher, the discriminator.

Stage 2 starts from `init_from`, by default this run name's stage-1 run (`<runs>/<name>/tokenizer/stage1`), and
finds its teacher through the lineage the starting weights record (`unilip.training.lineage`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from unilip.models.hub import load_strict
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer
from unilip.tasks.tokenizer.module import TokenizerTraining
from unilip.training.checkpoints import read_checkpoint
from unilip.training.config import ConfigError
from unilip.training.lineage import build_teacher, check_same_architecture, load_trained_tokenizer

log = logging.getLogger(__name__)


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
