"""Building a generation run from its config: where the tokenizer, the starting weights and the latents come from.

Stages chain without hand-edited paths: stage N > 1 starts from `init_from`, by default this run
name's stage N-1 (`<runs>/<name>/generate/stage<N-1>`), and reads the tokenizer that run recorded
(`tokenizer_from` overrides it; a first run looks for this name's tokenizer run, stage 2 then 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.models.generator import (
    CONFIG_NAME,
    DiTPreset,
    UniLIPGenerator,
    build_dit,
    from_state,
    read_meta,
)
from unilip.models.latents import DCAELatents, UniLIPLatents, build_dcae, latent_scale
from unilip.models.mllm import MLLMPreset, build_conditioner
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer
from unilip.pipelines.generation import SCHEDULERS
from unilip.tasks.generation.module import GenerationTraining
from unilip.tasks.generation.target_cache import (
    TokenizerNotLoaded,
    check_caches,
    dcae_identity,
    fingerprint,
    stage_caches,
    tokenizer_config,
    tokenizer_digest,
    tokenizer_fields,
    validates,
)
from unilip.training.checkpoints import ema_state, locate, read_checkpoint
from unilip.training.config import ConfigError
from unilip.training.lineage import load_any_tokenizer

log = logging.getLogger(__name__)

LATENT_MULTIPLE = {"unilip": 28, "dcae": 32}  # image sides the latent spaces encode without padding


def check_generation_config(cfg: DictConfig) -> None:
    """Start-up checks of a `task=generate` config, one clear line per mistake."""
    recipe = cfg.recipe
    if recipe.latent_space not in LATENT_MULTIPLE:
        raise ConfigError(f"recipe.latent_space={recipe.latent_space!r}; use unilip (stages 2, 3) or dcae (stage 1)")
    multiple = LATENT_MULTIPLE[recipe.latent_space]
    if recipe.image_size % multiple:
        raise ConfigError(
            f"stages.stage{cfg.stage}.image_size={recipe.image_size} is not a multiple of {multiple}, which the "
            f"{recipe.latent_space} latents need (448 for UniLIP, 512 for DC-AE)"
        )
    if recipe.latent_space == "dcae" and cfg.dit.dcae is None and cfg.dit.dcae_weights is None:
        raise ConfigError("recipe.latent_space=dcae needs a DC-AE: set dit.dcae_weights=<SANA pipeline or DC-AE>")
    if cfg.stage == 3 and "stage3" not in (cfg.get("stage_sources") or {}):
        # never the pretraining mix again: the reference fine-tunes on BLIP3o-60k + ShareGPT-4o-Image
        raise ConfigError(
            "stage 3 (SFT) needs its own data: choose a data preset with a stage-3 mix (data=blip3o_generation, "
            "whose stage_sources.stage3 reads BLIP3o-60k and ShareGPT-4o-Image under paths.data_dir), or give "
            "yours as stage_sources.stage3=[{name: ..., urls: ..., repeat: 1}, ...]"
        )
    if not 0 <= cfg.module.cfg_dropout < 1:
        raise ConfigError(f"module.cfg_dropout={cfg.module.cfg_dropout} must be in [0, 1)")
    if cfg.module.sample_scheduler not in SCHEDULERS:
        raise ConfigError(f"module.sample_scheduler={cfg.module.sample_scheduler!r}; use one of {SCHEDULERS}")
    if cfg.generator.num_queries < 1 or cfg.generator.connector_layers < 1:
        raise ConfigError(f"generator={dict(cfg.generator)}: num_queries and connector_layers must be >= 1")
    if cfg.tokenizer_from is not None and not Path(cfg.tokenizer_from).exists():
        raise ConfigError(
            f"tokenizer_from={cfg.tokenizer_from} does not exist; give a tokenizer run directory, saved tokenizer, "
            "checkpoint or released .pth"
        )


# ------------------------------------------------------------------ starting weights
def load_trained_generator(path: str | Path) -> tuple[UniLIPGenerator, dict[str, Any]]:
    """The (EMA) generator of a run directory, Lightning checkpoint (file or FSDP directory) or saved generator."""
    located = locate(path, "generator")
    if (located / CONFIG_NAME).exists():
        return UniLIPGenerator.from_pretrained(located)
    checkpoint = read_checkpoint(located, "generate")
    if checkpoint is None:
        raise ConfigError(f"init_from={path} is not a generation run directory, checkpoint or saved generator")
    meta = checkpoint["unilip"]
    state = ema_state(checkpoint["state_dict"], "generator")
    return from_state(meta["generator_config"], state, f"generator weights in {located}"), meta


def _init_source(cfg: DictConfig) -> str | None:
    if cfg.init_from is not None:
        return str(cfg.init_from)
    if cfg.stage == 1:
        return None
    previous = Path(cfg.paths.runs_dir) / cfg.name / cfg.task / f"stage{cfg.stage - 1}"
    if previous.exists():
        log.info("stage %d starts from this run name's stage-%d run: %s", cfg.stage, cfg.stage - 1, previous)
        return str(previous)
    raise ConfigError(
        f"stage {cfg.stage} needs init_from=<stage-{cfg.stage - 1} generation run or checkpoint>; none given and "
        f"no run at {previous}"
    )


def _tokenizer_source(cfg: DictConfig, init_meta: dict[str, Any] | None) -> str:
    if cfg.tokenizer_from is not None:
        return str(Path(cfg.tokenizer_from).resolve())
    if init_meta and init_meta.get("tokenizer"):
        return init_meta["tokenizer"]["source"]
    for stage in (2, 1):
        run = Path(cfg.paths.runs_dir) / cfg.name / "tokenizer" / f"stage{stage}"
        if run.exists():
            log.info("tokenizer: this run name's tokenizer run %s", run)
            return str(run.resolve())
    raise ConfigError(
        "task=generate needs tokenizer_from=<UniLIP tokenizer run, saved tokenizer, checkpoint or released .pth>; "
        f"none given and no tokenizer run under {Path(cfg.paths.runs_dir) / cfg.name / 'tokenizer'}"
    )


def _load_tokenizer(source: str, preset: TokenizerConfig) -> UniLIPTokenizer:
    try:
        return load_any_tokenizer(source, preset).tokenizer
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"tokenizer_from={source}: {error}") from None


def _check_same(init_config: dict[str, Any], generator_cfg: DictConfig, dit: DiTPreset, source: str) -> None:
    differs = [k for k in ("num_queries", "connector_layers") if init_config[k] != generator_cfg[k]]
    differs += [f"dit.{k}" for k, v in dit.transformer.items() if init_config["dit"].get(k) != v]
    if differs:
        raise ConfigError(
            f"init_from={source} is a different generator (differs in {', '.join(differs)}); "
            "choose the generator and dit presets it was trained with"
        )


def generator_meta(path: str | Path) -> dict[str, Any]:
    """What a generation run, checkpoint or saved generator was made from (its metadata), without its weights."""
    located = locate(path, "generator")
    if (located / CONFIG_NAME).exists():
        return read_meta(located)
    checkpoint = read_checkpoint(located, "generate")
    if checkpoint is None:
        raise ConfigError(f"init_from={path} is not a generation run directory, checkpoint or saved generator")
    return checkpoint["unilip"]


def run_tokenizer_source(cfg: DictConfig) -> str:
    """The tokenizer a run of `cfg` uses, found as training finds it, without loading any weights."""
    if cfg.tokenizer_from is not None:
        return _tokenizer_source(cfg, None)
    init_path = _init_source(cfg)
    return _tokenizer_source(cfg, generator_meta(init_path) if init_path is not None else None)


def target_latents(cfg: DictConfig, tokenizer, tokenizer_source: str, dit_preset: DiTPreset, load: bool):
    """The latent space of the stage's targets (None unless `load`) and its record {"kind", "scale"}."""
    if cfg.recipe.latent_space == "dcae":
        latents = DCAELatents(build_dcae(dit_preset)) if load else None
        scale = latents.scale if latents is not None else dcae_identity(dit_preset)["scaling_factor"]
        return latents, {"kind": "dcae", "scale": scale}
    try:
        scale = latent_scale(tokenizer, cfg.latent_scale, tokenizer_source)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return (UniLIPLatents(tokenizer, scale) if load else None), {"kind": "unilip", "scale": scale}


def cache_fingerprint(cfg: DictConfig, tokenizer_source: str, tokenizer, dit_preset: DiTPreset) -> dict[str, Any]:
    """The fingerprint of this stage's cached targets (`unilip.tasks.generation.target_cache.fingerprint`)."""
    _, record = target_latents(cfg, tokenizer, tokenizer_source, dit_preset, load=False)
    dcae = dcae_identity(dit_preset) if cfg.recipe.latent_space == "dcae" else None
    tokenizer_record = tokenizer_fields(tokenizer_digest(tokenizer_source), tokenizer.config)
    return fingerprint(cfg, tokenizer_record, record["scale"], dcae)


# ------------------------------------------------------------------ the module
def build_generation_training(cfg: DictConfig) -> GenerationTraining:
    """The `GenerationTraining` of `cfg` (task=generate), with its frozen conditioner and latents.

    With cached targets (`data.latent_cache`), each cache's fingerprint must be this run's; the tokenizer
    and DC-AE are then loaded only if the run validates.
    """
    check_generation_config(cfg)
    mllm: MLLMPreset = instantiate(cfg.mllm)
    dit_preset: DiTPreset = instantiate(cfg.dit)
    caches = stage_caches(cfg)
    init_path = _init_source(cfg)
    init_meta = None
    if init_path is not None:
        generator, init_meta = load_trained_generator(init_path)
        _check_same(generator.config.to_dict(), cfg.generator, dit_preset, init_path)
    tokenizer_source = _tokenizer_source(cfg, init_meta)
    preset = instantiate(cfg.model.config)
    load_encoders = caches is None or validates(cfg)
    if load_encoders:
        tokenizer = _load_tokenizer(tokenizer_source, preset)
    else:
        tokenizer = TokenizerNotLoaded(tokenizer_config(tokenizer_source, preset), tokenizer_source)
    if caches is not None:
        check_caches(caches, cache_fingerprint(cfg, tokenizer_source, tokenizer, dit_preset))
        log.info(
            "targets: cached latents of %s (fingerprints match); the step runs no encoder%s",
            ", ".join(caches),
            "; the tokenizer is loaded for validation" if load_encoders else "; the tokenizer is not loaded",
        )
    try:
        conditioner = build_conditioner(mllm, tokenizer)
    except ValueError as error:
        raise ConfigError(f"mllm and tokenizer do not fit: {error}") from None
    if init_path is None:
        try:
            generator = UniLIPGenerator.from_language_model(
                conditioner.language_model, build_dit(dit_preset), **OmegaConf.to_container(cfg.generator)
            )
        except ValueError as error:
            raise ConfigError(f"generator: {error}") from None
    latents, latents_meta = target_latents(cfg, tokenizer, tokenizer_source, dit_preset, load=load_encoders)
    try:
        flow_shift = cfg.module.flow_shift if cfg.module.flow_shift is not None else dit_preset.sampler_flow_shift()
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"sampler: {error}") from None
    metadata = {
        "mllm": mllm.to_dict(),
        "dit": dit_preset.to_dict(),
        "tokenizer": {"source": tokenizer_source, "config": tokenizer.config.to_dict()},
        "latents": latents_meta,
        "sampler": {"flow_shift": flow_shift},
        "init_from": init_path,
    }
    return instantiate(
        cfg.module,
        generator=generator,
        conditioner=conditioner,
        latents=latents,
        flow_shift=flow_shift,
        metadata=metadata,
    )
