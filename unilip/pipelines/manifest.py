"""The manifest of a sampling run: what decides its images, checked before a run adds to an output folder.

`identity` (sampler settings, inputs digest, generator weights digest and latent space) must match for a
run to resume in a folder; the rest of `manifest.json` (the generator's lineage, the seed rule, each run's
ranks and the files they wrote or skipped) records what happened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unilip.pipelines.jobs import SampleJob, SamplerSettings

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"  # no scorer's file pattern matches it (GenEval: r"\d+\.png"; others: exact names)


class SamplingError(ValueError):
    """A user's mistake found before sampling: bad inputs, or an output directory made with other settings."""


def file_digest(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def jobs_digest(jobs: Sequence[SampleJob]) -> str:
    """A digest of the prompts, seeds, output names and source file names: what "the same inputs" means on
    resume (source folders may move between runs; their file names and the prompts may not change)."""
    records = []
    for job in jobs:
        record = dataclasses.asdict(job)
        record["source"] = Path(job.source).name if job.source is not None else None
        if not job.keep_aspect:
            del record["keep_aspect"]  # absent from the digest when off: folders made before it existed resume
        records.append(record)
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def identity(settings: SamplerSettings, jobs: Sequence[SampleJob], model: dict[str, Any], **extra: Any) -> dict:
    """What must match for a run to add images to an existing output directory."""
    return {"sampler": settings.to_dict(), "inputs": jobs_digest(jobs), "model": model, **extra}


def generator_record(
    directory: str | Path, tokenizer: str | None = None, mllm_weights: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, lineage) of a saved generator: the weights digest and latent space decide the images;
    the lineage (stage, what it was trained from, the tokenizer and MLLM it uses) is recorded beside them."""
    from unilip.models.generator import WEIGHTS_NAME, read_meta

    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise SamplingError(f"generator={directory} has no {WEIGHTS_NAME}; give a saved generator (<run>/generator)")
    model = {"weights_sha256": file_digest(weights), "latents": meta.get("latents")}
    lineage = {
        "generator": str(directory.resolve()),
        "stage": meta.get("stage"),
        "init_from": meta.get("init_from"),
        "tokenizer": tokenizer or (meta.get("tokenizer") or {}).get("source"),
        "mllm_weights": mllm_weights or (meta.get("mllm") or {}).get("weights"),
        "dit_weights": (meta.get("dit") or {}).get("weights"),
        "tokenizer_overridden": tokenizer is not None,
        "mllm_weights_overridden": mllm_weights is not None,
    }
    return model, lineage


def check_manifest(out: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest of `out` (None if there is none); refuses one made with other settings."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SamplingError(f"{path} is not valid JSON ({error}); move it away or use another out=") from None
    differs = _differences(manifest.get("identity", {}), expected)
    if differs:
        raise SamplingError(
            f"{out} holds images made with other settings ({'; '.join(differs[:4])}); "
            "use another output directory, or delete it to start over"
        )
    return manifest


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return found
    return [] if old == new else [f"{where}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(TEMP_PREFIX + path.name)
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)
