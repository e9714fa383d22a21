"""A generation stage's cached targets: the fingerprint they must match, and what the stage then loads.

`python -m unilip.tasks.generation.cache_latents` stores, for every source of a stage, the DiT's targets x0 and the
edits' source features (`unilip.data.latent_cache`); training reads them in place of the images when
`data.latent_cache` names the cache (or the sources' urls point at cached shards). The fingerprint of
a cache is the one this module computes from the run's config, the same function for writing and for
checking: encoder weights (a digest of their files), latent space, image size, resize mode, latent
scale, the edits' source size, and the compute and storage dtypes. A run whose fingerprint differs is
refused before anything is built, with the fields that differ.

With every training source cached, the step never runs an encoder. When validation is off as well
(`data.val_urls=null`), nothing needs the tokenizer or the DC-AE, and they are not loaded: a stand-in
carries the tokenizer's config (what the conditioner reads: feature width, input multiple).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from unilip.data.latent_cache import DTYPES, FORMAT, MANIFEST, VERSION, differences, expand_sources, with_cache
from unilip.data.latent_cache import source_caches as read_source_caches
from unilip.models.generator import DiTPreset
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


def _weights_location(source: str | Path) -> Path:
    path = Path(source)
    return path if path.suffix in (".pth", ".pt") else locate(path, "tokenizer")


def tokenizer_digest(source: str | Path) -> str:
    """A digest of the weights file(s) a tokenizer source resolves to (a saved tokenizer's model.safetensors,
    a checkpoint, a released .pth, an FSDP checkpoint directory): the weights' identity, read without
    building the tokenizer. Its config.json is left out: a latent scale written there later changes
    nothing the cache holds (the scale is a fingerprint field of its own)."""
    located = _weights_location(source)
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
    located = _weights_location(source)
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
    patterns = ("vae/*.json", "vae/*.safetensors", "*.json", "*.safetensors")
    path = resolve_pretrained(
        preset.dcae_weights, what="DC-AE weights", option="dit.dcae_weights", allow_patterns=patterns
    )
    if (path / "vae").is_dir():
        path = path / "vae"
    config = read_json(path / "config.json", what="DC-AE config")
    files = sorted(path.glob("*.safetensors"))
    return {"weights_sha256": files_digest(files, path), "scaling_factor": float(config.get("scaling_factor", 1.0))}


# ------------------------------------------------------------------ the fingerprint
def compute_dtype(cfg: DictConfig) -> dict[str, Any]:
    """How the frozen encoders compute in this run (their weights' dtype, the autocast of the precision)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: cached targets support {sorted(PRECISIONS)}")
    return {"weights": cfg.module.frozen_dtype or "float32", "autocast": PRECISIONS[precision]}


def fingerprint(cfg: DictConfig, weights_digest: str, scale: float, dcae: dict[str, Any] | None) -> dict[str, Any]:
    """What decides the tensors a cache of this stage holds (`weights_digest`: the tokenizer's; `dcae`: the
    DC-AE identity in stage 1; `scale`: the latent scale the latents are multiplied by)."""
    recipe = cfg.recipe
    dtype = cfg.latent_cache.dtype
    if dtype not in DTYPES:
        raise ConfigError(f"latent_cache.dtype={dtype}; use one of {sorted(DTYPES)}")
    target = {"tokenizer_sha256": weights_digest} if recipe.latent_space == "unilip" else dict(dcae or {})
    return {
        "version": VERSION,
        "latent_space": recipe.latent_space,
        "image_size": recipe.image_size,
        "resize": cfg.data.resize,
        "latent_scale": scale,
        "target_encoder": target,
        "source_encoder": {"tokenizer_sha256": weights_digest, "source_size": cfg.mllm.source_size},
        "compute": compute_dtype(cfg),
        "dtype": dtype,
    }


def stage_caches(cfg: DictConfig) -> dict[str, dict[str, Any]] | None:
    """{source: cache manifest} when the stage's training sources are cached latents, None when they are images."""
    sources = with_cache(cfg.data.train_sources or [], cfg.data.get("latent_cache"))
    return read_source_caches(expand_sources(sources))


def check_caches(caches: dict[str, dict[str, Any]], expected: dict[str, Any]) -> None:
    """Refuse caches made otherwise than this run would make them, naming the fields that differ."""
    for name, manifest in caches.items():
        found = manifest.get("fingerprint", {})
        if manifest.get("format") != FORMAT or (diffs := differences(expected, found)):
            raise ConfigError(
                f"the cached latents of source {name!r} were made differently from this run ("
                + "; ".join(diffs[:4])
                + "); cache them again with this run's overrides (python -m unilip.tasks.generation.cache_latents ...) "
                f"into another latent_cache.dir, or run with the settings in their {MANIFEST}"
            )


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
