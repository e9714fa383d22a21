"""Building a unified run (`python train.py task=unified stage=1|2`) from its config: where the generator,
the captioner and the reward encoders come from, and what the stage trains.

    generator_from   a saved generator (`<run>/generator`) or a run that wrote one: a generation run, a
                     released import, or a unified stage-2 run (the next round); its record gives the MLLM
                     preset, the UniLIP tokenizer and the latent space
    captioner_from   a saved captioner or a unified run (`<run>/captioner`); `base`: the MLLM's own LLM;
                     null: stage 1 starts from the MLLM's own LLM, stage 2 reads this name's stage-1 run
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.evaluation.similarity import EncoderSpec, ReconstructionSimilarity, describe
from unilip.models.captioner import CaptionFormat, build_captioner, load_captioner, locate_captioner
from unilip.models.generator import CONFIG_NAME, read_meta
from unilip.models.lora import LoRASpec, add_lora
from unilip.models.mllm import MLLMPreset
from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline
from unilip.tasks.unified.module import UnifiedTraining
from unilip.tasks.unified.rollouts import UnifiedNetworks
from unilip.training.checkpoints import locate
from unilip.training.config import ConfigError

log = logging.getLogger(__name__)

DIT_TRAINING = ("lora", "full")


def check_unified_config(cfg: DictConfig) -> None:
    """Start-up checks of a `task=unified` config, one clear line per mistake."""
    module = cfg.module
    if module.group_size < 2:
        raise ConfigError(f"module.group_size={module.group_size}: GRPO compares at least 2 outputs per input")
    if module.updates_per_rollout < 1:
        raise ConfigError(f"module.updates_per_rollout={module.updates_per_rollout} must be >= 1")
    if not 0 < module.clip_range < 1 or module.kl_weight < 0:
        raise ConfigError(f"module.clip_range={module.clip_range} must be in (0, 1), module.kl_weight >= 0")
    if module.sampling.noise_level <= 0:
        raise ConfigError(
            f"module.sampling.noise_level={module.sampling.noise_level}: the SDE needs noise (> 0, Flow-GRPO: 0.7)"
        )
    if module.rendering.scheduler not in SCHEDULERS:
        raise ConfigError(f"module.rendering.scheduler={module.rendering.scheduler!r}; use one of {SCHEDULERS}")
    if cfg.dit_training.mode not in DIT_TRAINING:
        raise ConfigError(f"dit_training.mode={cfg.dit_training.mode!r}; use lora or full")
    if not cfg.reward.encoders:
        raise ConfigError("reward.encoders is empty; give at least one encoder (conf/reward/)")
    if cfg.generator_from is None:
        raise ConfigError(
            "task=unified needs generator_from=<a saved generator, or a run that wrote one: generation, released "
            "import, unified stage 2>"
        )
    for key in ("generator_from", "captioner_from", "tokenizer_from"):
        value = cfg.get(key)
        if value not in (None, "base") and not Path(value).exists():
            raise ConfigError(f"{key}={value} does not exist; give an existing run directory or saved model")


def _generator_dir(source: str) -> Path:
    located = locate(source, "generator")
    if not (located / CONFIG_NAME).is_file():
        raise ConfigError(
            f"generator_from={source} holds no saved generator (a finished run has generator/{CONFIG_NAME}); "
            "give the run's generator directory, or finish the run first"
        )
    return located


def _captioner_source(cfg: DictConfig) -> str | None:
    """The saved captioner to start from, or None for the MLLM's own LLM."""
    if cfg.captioner_from == "base":
        return None
    if cfg.captioner_from is not None:
        try:
            return str(locate_captioner(cfg.captioner_from))
        except FileNotFoundError as error:
            raise ConfigError(f"captioner_from: {error}") from None
    if cfg.stage == 1:
        return None
    stage1 = Path(cfg.paths.runs_dir) / cfg.name / cfg.task / "stage1"
    if (stage1 / "captioner").is_dir():
        log.info("stage 2 captions with this run name's stage-1 captioner: %s", stage1 / "captioner")
        return str(stage1 / "captioner")
    raise ConfigError(
        f"stage 2 needs captioner_from=<a stage-1 run or saved captioner> (or captioner_from=base for the MLLM's "
        f"own captions); none given and no finished stage-1 run at {stage1}"
    )


def build_unified_training(cfg: DictConfig) -> UnifiedTraining:
    """The `UnifiedTraining` of `cfg` (task=unified): networks from their sources, the stage's trained parameters."""
    check_unified_config(cfg)
    generator_dir = _generator_dir(str(cfg.generator_from))
    record = {k: v for k, v in read_meta(generator_dir).items() if k not in ("format", "config")}
    try:
        pipe = UniLIPPipeline.from_pretrained(
            generator_dir,
            tokenizer=cfg.tokenizer_from,
            mllm_weights=cfg.mllm_weights,
            scheduler=cfg.module.rendering.scheduler,
        )
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"generator_from={cfg.generator_from}: {error}") from None
    mllm = MLLMPreset(**record["mllm"])
    if cfg.mllm_weights is not None:
        mllm.weights = cfg.mllm_weights
    tokenizer = pipe.conditioner.tokenizer
    captioning = cfg.captioner
    caption_format = CaptionFormat(prompt=captioning.prompt)
    source = _captioner_source(cfg)
    if source is None:
        captioner = build_captioner(
            mllm, tokenizer, pipe.conditioner.text_tokenizer, caption_format, captioning.max_new_tokens,
            captioning.temperature,
        )  # fmt: skip
        captioner_lora = None
    else:
        captioner, captioner_lora, _ = load_captioner(
            source, tokenizer, cfg.mllm_weights, caption_format, captioning.max_new_tokens, captioning.temperature
        )
    generator = pipe.generator.requires_grad_(False)
    reference_dit = dit_lora = None
    if cfg.stage == 1:
        if captioner_lora is None:
            captioner_lora = LoRASpec(**OmegaConf.to_container(captioning.lora, resolve=True))
            adapters = add_lora(captioner.language_model, captioner_lora)
        else:  # continue the adapters of an earlier round
            adapters = {n: p for n, p in captioner.language_model.named_parameters() if ".lora_" in n}
            for param in adapters.values():
                param.requires_grad_(True)
        trained = {f"captioner.{name}": param for name, param in adapters.items()}
    elif cfg.dit_training.mode == "lora":
        dit_lora = LoRASpec(**OmegaConf.to_container(cfg.dit_training.lora, resolve=True))
        trained = {f"dit.{name}": param for name, param in add_lora(generator.dit, dit_lora).items()}
    else:
        if cfg.module.kl_weight > 0:
            reference_dit = copy.deepcopy(generator.dit).requires_grad_(False).eval()
        trained = {f"dit.{name}": param.requires_grad_(True) for name, param in generator.dit.named_parameters()}
    specs = [EncoderSpec(**spec) for spec in OmegaConf.to_container(cfg.reward.encoders, resolve=True)]
    try:
        similarity = ReconstructionSimilarity.from_specs(specs)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"reward: {error}") from None
    networks = UnifiedNetworks(
        captioner, generator, pipe.conditioner, pipe.latents, similarity, reference_dit, pipe.flow_shift
    )
    metadata: dict[str, Any] = {
        "generator_from": str(generator_dir),
        "captioner_from": source,
        "generator_record": record,
        "captioner_record": {"mllm": mllm.to_dict(), "tokenizer": record["tokenizer"], "generator": str(generator_dir)},
        "reward": describe(specs),
    }
    log.info(
        "unified stage %d trains the %s: %d tensors, %.2fM parameters",
        cfg.stage,
        "captioner's adapters" if cfg.stage == 1 else f"DiT ({cfg.dit_training.mode})",
        len(trained),
        sum(p.numel() for p in trained.values()) / 1e6,
    )
    # objects go in as they are (instantiate's own kwargs would pass through OmegaConf)
    factory = instantiate(cfg.module, _partial_=True)
    return factory(
        networks=networks, trained=trained, captioner_lora=captioner_lora, dit_lora=dit_lora, metadata=metadata
    )
