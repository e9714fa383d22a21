"""Cached generation targets: shards whose samples hold latents instead of images.

The frozen encoders' output never changes between epochs (the reference trains 5 per stage), so
`python -m unilip.tasks.generation.cache_latents` computes it once. A cached sample has two members:

    <key>.latents.safetensors   "latent": (C, h, w), the DiT's target x0 (latents x the latent scale);
                                "source_features": (N, D), an edit's source-image encoder features
    <key>.txt                   the caption, or the edit instruction

(safetensors: tensors and a JSON header, nothing is unpickled). Each source's directory holds its shards,
their sample counts (`index.json`, `unilip.data.index`) and `cache.json`:

    {"format": "unilip-latent-cache", "fingerprint": {...}, "complete": bool, "shards": {name: {...}}}

The fingerprint says how the latents were made (the tokenizer's weights and every field of its config,
normalisation included; the DC-AE of stage 1; latent space, image size, resize, scale, the edits' source
size, dtypes); training compares it with how it would make them and refuses a cache made otherwise in one
line naming the first field that differs (`refusal`). What the code itself does to a pixel (uint8 -> [0, 1],
the resize kernel, padding) is pinned by `VERSION`, raised whenever that code changes a cached tensor; a
cache of another version is refused, since it cannot show that it holds this run's latents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils.data import default_collate

from unilip.data.shards import DataError, _local_path, expand_urls

MEMBER = "latents.safetensors"
MANIFEST = "cache.json"
FORMAT = "unilip-latent-cache"
# 2: the tokenizer's config joined the fingerprint (version 1 recorded only its weights, so a copy with another
# image_mean was accepted); nothing in a version-1 cache records the normalisation that made it.
VERSION = 2
STATS_MEMBER = "__cache__.json"  # last member of each cached shard (its input, counts); `__` names are not samples
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------ one sample
def pack(latent: torch.Tensor, source_features: torch.Tensor | None, dtype: torch.dtype) -> bytes:
    """(C, h, w) latent and optional (N, D) source features -> the bytes of `<key>.latents.safetensors`."""
    tensors = {"latent": latent.detach().to("cpu", dtype).contiguous()}
    if source_features is not None:
        tensors["source_features"] = source_features.detach().to("cpu", dtype).contiguous()
    return save_tensors(tensors)


def unpack(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bytes of a cached sample -> (latent (C, h, w), source features (N, D) or None).

    Raises ValueError for anything that is not a well-formed cached sample (the loader then skips and
    counts it, like an undecodable image): unparsable, other tensors, wrong ranks, non-finite values.
    """
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors' own parse errors
        raise ValueError(f"cached latents do not parse ({type(error).__name__}: {error})") from None
    if set(tensors) - {"latent", "source_features"} or "latent" not in tensors:
        raise ValueError(f"cached sample holds {sorted(tensors)}, expected latent [+ source_features]")
    latent, source = tensors["latent"], tensors.get("source_features")
    if latent.ndim != 3 or not latent.is_floating_point():
        raise ValueError(f"cached latent of shape {tuple(latent.shape)} and {latent.dtype}; expected (C, h, w) float")
    if source is not None and (source.ndim != 2 or not source.is_floating_point()):
        raise ValueError(f"cached source features of shape {tuple(source.shape)}; expected (N, D) float")
    if not bool(torch.isfinite(latent).all()) or (source is not None and not bool(torch.isfinite(source).all())):
        raise ValueError("cached sample holds non-finite values")
    return latent, source


def cached_example(raw: Mapping[str, Any]) -> dict:
    """A raw cached sample -> example {"latent", "source_features" (None: text-to-image), "caption", "key"}."""
    latent, source = unpack(raw[MEMBER])
    caption = raw["txt"].decode("utf-8").strip() if raw.get("txt") is not None else ""
    return {"latent": latent, "source_features": source, "caption": caption, "key": raw["__key__"]}


def collate_cached(examples: list[dict]) -> dict:
    """Cached examples -> {"latent": (B, C, h, w), "source_features": (E, N, D) of the E edit rows in batch
    order (absent without edits), "has_source": (B,) bool, "caption", "key"}."""
    shapes = {tuple(e["latent"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"cached latents of different shapes {sorted(shapes)} in one batch; the caches differ")
    sources = [e["source_features"] for e in examples if e["source_features"] is not None]
    batch = {
        "latent": default_collate([e["latent"] for e in examples]),
        "caption": [e["caption"] for e in examples],
        "key": [e["key"] for e in examples],
        "has_source": torch.tensor([e["source_features"] is not None for e in examples], dtype=torch.bool),
    }
    if sources:
        batch["source_features"] = default_collate(sources)
    return batch


# ------------------------------------------------------------------ a cache directory
def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """A directory's `cache.json`, or None if it has none (a directory of image shards)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not readable ({error}); delete it and cache this source again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a latent cache manifest (format={manifest.get('format')!r})")
    return manifest


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write `cache.json` atomically (a reader never sees half a file)."""
    path = Path(directory) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{MANIFEST}.partial")
    temporary.write_text(json.dumps(dict(manifest), indent=1) + "\n")
    os.replace(temporary, path)
    return path


def differences(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The fingerprint fields in which `found` (a cache's) differs from `expected` (this run's), in name order:
    (dotted name, the cache's value, this run's value)."""
    out = []
    for name in sorted(set(expected) | set(found)):
        mine, theirs = expected.get(name), found.get(name)
        if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
            out += differences(mine, theirs, f"{prefix}{name}.")
        elif mine != theirs:
            out.append((f"{prefix}{name}", theirs, mine))
    return out


def _shown(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value[:12] if name.endswith("sha256") else value  # 12 hex digits tell two digests apart
    return json.dumps(value)  # as one writes a config override: [0.5, 0.5, 0.5], null


def refusal(where: str | Path, expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """None when a cache's fingerprint `found` is this run's `expected`; else the start of the one-line error
    (the caller adds the fix), naming the first field that differs with both values, then the other fields."""
    if found.get("version") != expected.get("version"):
        return (
            f"the latent cache at {where} has a fingerprint of version {found.get('version')}, this unilip writes "
            f"version {expected.get('version')} (which also records the tokenizer's config, its normalisation "
            "included); nothing in it shows that its latents are this run's"
        )
    diffs = differences(expected, found)
    if not diffs:
        return None
    name, theirs, mine = diffs[0]
    others = f" (also differs: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
    made, this = _shown(name, theirs), _shown(name, mine)
    return f"the latent cache at {where} was made with {name}={made}; this run has {this}{others}"


def cache_urls(latent_cache: str | Path, name: str) -> str:
    """The shards of source `name` in a cache directory made by `python -m unilip.tasks.generation.cache_latents`."""
    return str(Path(latent_cache) / name / "*.tar")


def with_cache(sources: Sequence[Mapping[str, Any]], latent_cache: str | Path | None) -> list[dict[str, Any]]:
    """Training sources with their urls moved to `latent_cache/<name>/` (unchanged without a cache directory)."""
    if latent_cache is None:
        return [dict(s) for s in sources]
    missing = [s["name"] for s in sources if read_manifest(Path(latent_cache) / s["name"]) is None]
    if missing:
        raise DataError(
            f"data.latent_cache={latent_cache} holds no cache of source(s) {missing} (no {MANIFEST} in "
            f"{Path(latent_cache) / missing[0]}); make it with `python -m unilip.tasks.generation.cache_latents` and "
            "the overrides of this run"
        )
    return [{**s, "urls": cache_urls(latent_cache, s["name"])} for s in sources]


def source_caches(sources: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]] | None:
    """{source name: its cache manifest, with its "directory"} when every source's shards are cached latents,
    None when none is.

    `sources` maps names to expanded urls. A source is cached when its shards' directory holds a manifest.
    Mixing cached and image sources, a source spread over several caches, and an incomplete cache (an
    interrupted caching run) are errors: each would train on other data than the run asks for.
    """
    found: dict[str, dict[str, Any] | None] = {}
    for name, urls in sources.items():
        directories = {path.parent for url in urls if (path := _local_path(url)) is not None}
        manifests = {str(d): read_manifest(d) for d in sorted(directories)}
        cached = [d for d, m in manifests.items() if m is not None]
        if cached and len(manifests) > 1:
            raise DataError(f"data source {name!r} mixes cached latents ({cached[0]}) with shards of other directories")
        if cached and any(_local_path(url) is None for url in urls):
            raise DataError(f"data source {name!r} mixes cached latents ({cached[0]}) with remote shards")
        found[name] = {**manifests[cached[0]], "directory": cached[0]} if cached else None  # type: ignore[dict-item]
        if cached and not found[name].get("complete"):
            done, total = len(found[name].get("shards", {})), found[name].get("inputs", "?")
            raise DataError(
                f"the latent cache {cached[0]} is incomplete ({done} of {total} shards); finish it by running the "
                "same `python -m unilip.tasks.generation.cache_latents` command again"
            )
    if not any(m is not None for m in found.values()):
        return None
    images = [name for name, m in found.items() if m is None]
    if images:
        raise DataError(
            f"data sources {images} are images while {sorted(set(found) - set(images))} are cached latents; "
            "cache every source of the stage (python -m unilip.tasks.generation.cache_latents) or none"
        )
    return found  # type: ignore[return-value]


def expand_sources(sources: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """{name: expanded urls} of training sources (`data.train_sources` entries)."""
    return {s["name"]: expand_urls(s["urls"], f"data.train_sources[{s['name']}].urls") for s in sources}
