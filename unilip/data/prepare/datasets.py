"""The recipe's datasets, what each download is, and `prepare`: one download folder in, one shard folder out."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unilip.data.prepare import gpt_image_edit, imagenet, in_place, sharegpt4o
from unilip.data.prepare.runner import check_output, finish, run_jobs
from unilip.data.prepare.writer import DEFAULT_MAX_SIZE, Conversion, write_shards
from unilip.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """One source of the recipe. `plan` reads a download into records to convert; None: the download is
    webdataset shards already, verified and indexed in place (`unilip.data.prepare.in_place`)."""

    name: str
    hub: str  # where it is published
    plan: Callable[[Path], Conversion] | None
    samples_per_shard: int = 1000  # ~0.5-1 GB shards at the dataset's image sizes
    prefix: str = "shard"


SHAREGPT4O = "FreedomIntelligence/ShareGPT-4o-Image"
DATASETS = {
    d.name: d
    for d in (
        Dataset("blip3o-pretrain", "BLIP3o/BLIP3o-Pretrain-Long-Caption, BLIP3o/BLIP3o-Pretrain-Short-Caption", None),
        Dataset("journeydb", "BLIP3o/BLIP3o-Pretrain-JourneyDB", None),
        Dataset("blip3o-60k", "BLIP3o/BLIP3o-60k", None),
        Dataset("gpt-image-edit", "UCSC-VLAA/GPT-Image-Edit-1.5M", gpt_image_edit.plan, samples_per_shard=250),
        Dataset("sharegpt4o-t2i", SHAREGPT4O, sharegpt4o.plan_t2i, samples_per_shard=500),
        Dataset("sharegpt4o-edit", SHAREGPT4O, sharegpt4o.plan_edit, samples_per_shard=250),
        Dataset("imagenet", "ILSVRC/imagenet-1k (or image-net.org ILSVRC2012)", imagenet.plan, prefix="val"),
    )
}


def prepare(
    name: str,
    download: str | Path,
    out: str | Path,
    workers: int = 0,
    samples_per_shard: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> dict[str, Any]:
    """Turn the download of dataset `name` into shards under `out` (see the package docstring); return the
    report written to `out/<prefix>-report.json`. Resumes an unfinished run of the same arguments."""
    if name not in DATASETS:
        raise ConfigError(f"no dataset {name!r}; choose one of {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    download, out = Path(download), Path(out)
    if not download.is_dir():
        raise FileNotFoundError(f"{download}: no such folder (the {name} download, from {dataset.hub})")
    if out.resolve() == download.resolve() or download.resolve() in out.resolve().parents:
        raise ConfigError(f"{out} is inside the download {download}; give a folder of its own for the shards")
    per_shard = samples_per_shard or dataset.samples_per_shard
    if per_shard < 1 or max_size < 0:
        raise ConfigError("--samples-per-shard must be >= 1 and --max-size >= 0")
    identity: dict[str, Any] = {"tool": f"prepare {name}", "download": str(download.resolve())}
    if dataset.plan is None:
        return _in_place(dataset, download, out, identity, workers)
    conversion = dataset.plan(download)  # reads the whole layout before anything is written
    if not conversion.total:
        raise ConfigError(f"{download}: the authors' selection leaves no sample to write ({_reasons(conversion)})")
    identity |= {"samples_per_shard": per_shard, "max_size": max_size}
    extra = {
        "not_selected": dict(sorted(Counter(reason for _, reason in conversion.not_selected).items())),
        "not_selected_items": [f"{item}: {reason}" for item, reason in conversion.not_selected],
    }
    report = write_shards(
        conversion.records(),
        out,
        dataset.prefix,
        per_shard,
        max_size or None,
        workers,
        identity,
        total=conversion.total,
        desc=name,
        exclusive=True,
        extra=extra,
    )
    _summary(name, out, dataset.prefix, report, f"{conversion.total} samples")
    return report


def _in_place(dataset: Dataset, download: Path, out: Path, identity: dict[str, Any], workers: int) -> dict[str, Any]:
    shards = in_place.find_shards(download, dataset.name)
    run = check_output(out, dataset.prefix, identity, exclusive=True)
    jobs = (in_place.VerifyShard(in_place.link_name(s, download), s, out) for s in shards)
    run_jobs(jobs, run, workers, total=len(shards), unit="shard", desc=dataset.name)
    report = finish(run, {"not_selected": {}, "not_selected_items": []})
    _summary(dataset.name, out, dataset.prefix, report, f"{len(shards)} shards")
    return report


def _reasons(conversion: Conversion) -> str:
    counts = Counter(reason for _, reason in conversion.not_selected)
    return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(3)) or "the download holds no records"


def _summary(name: str, out: Path, prefix: str, report: dict[str, Any], planned: str) -> None:
    """Log what was written; a run in which nothing could be read is the user's data's fault: one error."""
    if not report["samples"]:
        raise ConfigError(
            f"none of the {planned} of {name} could be read "
            f"(first: {report['skipped'][0] if report['skipped'] else '?'}); nothing was written"
        )
    for line in report["skipped"][:10]:
        log.warning("skipped %s", line)
    left_out = ", ".join(f"{n} {reason}" for reason, n in report["not_selected"].items())
    log.info(
        "%s: %d samples in %d shards under %s; %d skipped (unreadable, named in %s)%s",
        *(name, report["samples"], len(report["shards"]), out, len(report["skipped"]), f"{prefix}-report.json"),
        f"; left out by the authors' selection: {left_out}" if left_out else "",
    )


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
