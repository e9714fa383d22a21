"""A generation stage's cached targets: the fingerprint they must match, and what the stage then loads.

`python -m unilip.tasks.generation.cache_latents` stores, for every source of a stage, the DiT's targets x0 and the
edits' source features (`unilip.data.latent_cache`); training reads them in place of the images when
`data.latent_cache` names the cache (or the sources' urls point at cached shards). The fingerprint of
a cache is the one this module computes from the run's config, the same function for writing and for
checking: everything that changes a cached tensor. That is the tokenizer's weights (a digest of their
files) and every field of its config (its normalisation `image_mean` / `image_std` is the encoder's
preprocessing), the DC-AE of stage 1 (weights and config), latent space, image size, resize mode, latent
scale, the edits' source size, and the compute and storage dtypes. A run whose fingerprint differs is
refused before anything is built, in one line naming the first field that differs.

With every training source cached, the step never runs an encoder. When validation is off as well
(`data.val_urls=null`), nothing needs the tokenizer or the DC-AE, and they are not loaded: a stand-in
carries the tokenizer's config (what the conditioner reads: feature width, input multiple).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from unilip.data.latent_cache import DTYPES, FORMAT, MANIFEST, VERSION, expand_sources, refusal, with_cache
from unilip.data.latent_cache import source_caches as read_source_caches
from unilip.models.generator import DiTPreset, diffusers_files
from unilip.models.hub import read_json, resolve_pretrained
from unilip.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, TokenizerConfig
from unilip.training.checkpoints import locate, read_checkpoint
from unilip.training.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": "bfloat16", "16-mixed": "float16"}


# ------------------------------------------------------------------ identities of the encoders
def files_digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to `root`) and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(source: str | Path) -> str:
    """A digest of the weights file(s) a tokenizer source resolves to (a saved tokenizer's model.safetensors,
    a checkpoint, a released .pth, an FSDP checkpoint directory): the weights' identity, read without
    building the tokenizer. Its config.json is left out: the fingerprint holds the config field by field
    (`tokenizer_fields`), so that a refusal names the field, and a re-indented file or a latent scale
    written there later (the scale in use is a fingerprint field of its own) changes nothing."""
    located = locate(source, "tokenizer")  # a run directory's result or last checkpoint; a file as it is
    if located.is_file():
        return files_digest([located])
    if (located / WEIGHTS_NAME).is_file():
        return files_digest([located / WEIGHTS_NAME])
    files = sorted(p for p in located.rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"tokenizer {source}: no weight files at {located}")
    return files_digest(files, located)


def tokenizer_config(source: str | Path, preset: TokenizerConfig) -> TokenizerConfig:
    """The config of the tokenizer `source` holds, read without its weights (a released .pth: `preset`)."""
    located = locate(source, "tokenizer")
    if located.suffix in (".pth", ".pt"):
        return preset
    if (located / CONFIG_NAME).exists():
        return TokenizerConfig(**read_json(located / CONFIG_NAME, what="tokenizer config")["config"])
    checkpoint = read_checkpoint(located, "tokenizer")
    if checkpoint is None:
        raise ConfigError(f"tokenizer_from={source} is not a tokenizer run directory, checkpoint or saved tokenizer")
    return TokenizerConfig(**checkpoint["unilip"]["tokenizer_config"])


def dcae_identity(preset: DiTPreset) -> dict[str, Any]:
    """The DC-AE of stage 1 as the fingerprint records it: a digest of its weights, or the seed and config of
    a random one; and its scaling factor (the latent scale of that space)."""
    if preset.dcae_weights is None:
        config = dict(preset.dcae or {})
        return {"random_seed": preset.seed + 1, "config": config, "scaling_factor": config.get("scaling_factor", 1.0)}
    path = resolve_pretrained(
        preset.dcae_weights, what="DC-AE weights", option="dit.dcae_weights", allow_patterns=diffusers_files("vae")
    )
    if (path / "vae").is_dir():
        path = path / "vae"
    config = read_json(path / "config.json", what="DC-AE config")
    files = sorted(path.glob("*.safetensors"))  # one folder: each file by its name
    return {
        "weights_sha256": files_digest(files),
        "scaling_factor": float(config.get("scaling_factor", 1.0)),
        # diffusers' own bookkeeping (`_class_name`, `_diffusers_version`, `_name_or_path`) changes no latent
        "config": {key: value for key, value in config.items() if not key.startswith("_")},
    }


def tokenizer_fields(weights_digest: str, config: TokenizerConfig) -> dict[str, Any]:
    """The tokenizer as the fingerprint records it: its weights' digest and every field of its config (defaults
    resolved: a config without image_mean and one that spells out the encoder's own are the same tokenizer),
    less `latent_scale`, whose value in use is the fingerprint's `latent_scale` (an override may replace it)."""
    fields = {key: value for key, value in config.to_dict().items() if key != "latent_scale"}
    return {"weights_sha256": weights_digest, **fields}


# ------------------------------------------------------------------ the fingerprint
def compute_dtype(cfg: DictConfig) -> dict[str, Any]:
    """How the frozen encoders compute in this run (their weights' dtype, the autocast of the precision)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: cached targets support {sorted(PRECISIONS)}")
    return {"weights": cfg.module.frozen_dtype or "float32", "autocast": PRECISIONS[precision]}


def fingerprint(
    cfg: DictConfig, tokenizer: dict[str, Any], scale: float, dcae: dict[str, Any] | None
) -> dict[str, Any]:
    """What decides the tensors a cache of this stage holds (`tokenizer`: its `tokenizer_fields`, the target
    encoder in UniLIP latent space and the edits' source encoder in every stage; `dcae`: the DC-AE identity,
    the target encoder in stage 1; `scale`: the latent scale the latents are multiplied by), as JSON values
    (what cache.json holds, so that the two compare equal)."""
    recipe = cfg.recipe
    dtype = cfg.latent_cache.dtype
    if dtype not in DTYPES:
        raise ConfigError(f"latent_cache.dtype={dtype}; use one of {sorted(DTYPES)}")
    record = {
        "version": VERSION,
        "latent_space": recipe.latent_space,
        "image_size": recipe.image_size,
        "resize": cfg.data.resize,
        "latent_scale": scale,
        "tokenizer": tokenizer,
        "dcae": dict(dcae or {}) if recipe.latent_space == "dcae" else None,
        "source_size": cfg.mllm.source_size,
        "compute": compute_dtype(cfg),
        "dtype": dtype,
    }
    return json.loads(json.dumps(record))  # tuples -> lists, as read back from cache.json


def stage_caches(cfg: DictConfig) -> dict[str, dict[str, Any]] | None:
    """{source: cache manifest} when the stage's training sources are cached latents, None when they are images."""
    sources = with_cache(cfg.data.train_sources or [], cfg.data.get("latent_cache"))
    return read_source_caches(expand_sources(sources))


REBUILD = (
    "rebuild it for this run (python -m unilip.tasks.generation.cache_latents <this run's overrides> "
    "latent_cache.dir=<a new directory>), or run with the settings its {manifest} records"
)


def check_caches(caches: dict[str, dict[str, Any]], expected: dict[str, Any]) -> None:
    """Refuse caches made otherwise than this run would make them, in one line naming what differs (`caches`:
    `stage_caches`, each manifest with the directory it was read from)."""
    for manifest in caches.values():
        where = manifest["directory"]
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{where} is not a latent cache (format={manifest.get('format')!r})")
        if problem := refusal(where, expected, manifest.get("fingerprint", {})):
            raise ConfigError(f"{problem}; {REBUILD.format(manifest=MANIFEST)}")


def validates(cfg: DictConfig) -> bool:
    """Whether the run validates (validation encodes its images and decodes samples: it needs the encoders)."""
    return bool(cfg.data.get("val_urls")) and cfg.trainer.get("limit_val_batches", 1.0) not in (0, 0.0)


class TokenizerNotLoaded(nn.Module):
    """The tokenizer's config in place of a tokenizer nothing runs (every target and edit source is cached,
    and the run does not validate): the conditioner reads its sizes; encoding with it is a bug."""

    def __init__(self, config: TokenizerConfig, source: str):
        super().__init__()
        self.config, self.source = config, source

    def _refuse(self, *args: Any, **kwargs: Any):
        raise RuntimeError(
            f"the tokenizer {self.source} was not loaded (every training target is cached and the run does not "
            "validate), yet something asked it to encode or decode"
        )

    features = encode = decode = forward = _refuse
