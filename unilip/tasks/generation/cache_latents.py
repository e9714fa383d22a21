"""Cache a generation stage's targets: every image of the stage's data encoded once, for all its epochs.

    python -m unilip.tasks.generation.cache_latents experiment=generate/unilip_1b stage=2 \
        latent_cache.dir=data/latents/1b-s2
    torchrun --nproc-per-node 8 -m unilip.tasks.generation.cache_latents ...       # the shards split over 8 GPUs
    python train.py task=generate experiment=generate/unilip_1b stage=2 latent_cache.dir=data/latents/1b-s2

The overrides are train.py's (task=generate is implied), so the cache holds what the run's steps would
compute: the stage's sources, image size and resize, latent space (UniLIP, or the DC-AE in stage 1),
tokenizer, latent scale, the edits' source size, the frozen encoders' dtype and precision. For each
source, `<dir>/<source>/` receives one shard per input shard (same file name) holding each sample's
target latent x0 and, for an edit, its source image's encoder features (`unilip.data.latent_cache`;
`latent_cache.dtype`, bfloat16 by default), next to its caption; then the sample counts (index.json)
and cache.json with the fingerprint. A shard is written under a temporary name and renamed once
complete, so a run started again skips the shards that exist: an interrupted run resumes without
duplicates or gaps. Undecodable images are skipped and counted, as in training. The run ends with a
summary line (samples, skipped, bytes, time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from unilip.data.index import shard_counts, write_index
from unilip.data.latent_cache import (
    DTYPES,
    FORMAT,
    MEMBER,
    STATS_MEMBER,
    expand_sources,
    pack,
    read_manifest,
    refusal,
    source_caches,
    write_manifest,
)
from unilip.data.samples import ensure_photo_shards
from unilip.data.shards import DataError, SkipCounter, read_shard
from unilip.data.streams import _batches, _worker
from unilip.data.transforms import SampleTransform, to_float
from unilip.errors import ConfigError
from unilip.logs import cli_logging, output

log = logging.getLogger(__name__)

PARTIAL = ".partial"  # a shard being written; renamed to its name once complete


@dataclass(frozen=True)
class Job:
    """One input shard of a source and the cached shard it becomes."""

    source: str
    url: str
    out: Path


def plan(sources: dict[str, Sequence[str]], out_dir: Path) -> list[Job]:
    """Every input shard of every source, in order, with its output `<out_dir>/<source>/<shard name>`."""
    jobs = []
    for name, urls in sources.items():
        seen: dict[str, str] = {}
        for url in urls:
            shard = Path(url.split()[-1].split("?")[0]).name  # a path, a remote url or the last word of a pipe:
            shard = shard if shard.endswith(".tar") else f"{shard}.tar"
            if shard in seen:
                raise ConfigError(
                    f"data source {name!r} has two shards named {shard} ({seen[shard]}, {url}); the cache names its "
                    "shards after the input's, so they must differ within a source"
                )
            seen[shard] = url
            jobs.append(Job(name, url, out_dir / name / shard))
    return jobs


class CacheStream(IterableDataset):
    """What each DataLoader worker reads: worker w of W takes jobs w, w + W, ...; per job, uint8 batches
    (`job` set), then one item `{"job", "end": True, "skipped", "broke_off"}` with what it skipped."""

    def __init__(self, jobs: Sequence[Job], transform: SampleTransform, batch_size: int, max_failures: int):
        super().__init__()
        self.jobs, self.transform, self.batch_size, self.max_failures = tuple(jobs), transform, batch_size, max_failures

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        for index in range(worker, len(self.jobs), workers):
            counter = SkipCounter()
            samples = enumerate(read_shard(self.jobs[index].url, counter))
            try:
                for batch, _ in _batches(
                    samples, self.transform, self.batch_size, counter, self.max_failures, None, drop_last=False
                ):
                    yield {"job": index, **batch}
            except DataError as error:
                yield {"job": index, "error": f"{self.jobs[index].url}: {error}"}
                return
            yield {"job": index, "end": True, "skipped": counter.samples, "broke_off": bool(counter.shards)}


class ShardWriter:
    """Writes one cached shard under a temporary name; `finish` adds its record and renames it."""

    def __init__(self, job: Job):
        job.out.parent.mkdir(parents=True, exist_ok=True)
        self.job, self.partial = job, job.out.with_name(job.out.name + PARTIAL)
        self.writer = wds.TarWriter(str(self.partial), encoder=False, mtime=0)  # the same input, the same bytes
        self.samples = self.bytes = 0

    def write(self, key: str, caption: str, latents: bytes) -> None:
        self.writer.write({"__key__": key, MEMBER: latents, "txt": caption.encode("utf-8")})
        self.samples += 1

    def finish(self, skipped: int, broke_off: bool) -> dict[str, Any]:
        record = {"input": self.job.url, "samples": self.samples, "skipped": skipped, "input_broke_off": broke_off}
        self.writer.write({"__key__": STATS_MEMBER.split(".")[0], "json": json.dumps(record).encode()})
        self.writer.close()
        os.replace(self.partial, self.job.out)
        self.bytes = self.job.out.stat().st_size  # on disk: tar headers and padding included
        return record


def shard_record(path: Path) -> dict[str, Any]:
    """The record a cached shard ends with (read from the tar headers and that one member)."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name == STATS_MEMBER:
                return json.loads(tar.extractfile(member).read())
    raise DataError(f"{path} has no {STATS_MEMBER}: not a shard written by the latent cache; delete it")


@dataclass
class Report:
    """What one rank did."""

    rank: int
    shards: int = 0  # written by this run
    already: int = 0  # found complete from an earlier run
    samples: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


class Encoders:
    """The frozen encoders of a stage as its training step runs them: targets x0 and edit-source features."""

    def __init__(self, cfg, device: torch.device):
        from hydra.utils import instantiate

        from unilip.models.generator import DiTPreset
        from unilip.tasks.generation.setup import _load_tokenizer, run_tokenizer_source, target_latents
        from unilip.tasks.generation.target_cache import compute_dtype

        dit_preset: DiTPreset = instantiate(cfg.dit)
        self.tokenizer_source = run_tokenizer_source(cfg)
        self.tokenizer = _load_tokenizer(self.tokenizer_source, instantiate(cfg.model.config))
        self.latents, self.record = target_latents(cfg, self.tokenizer, self.tokenizer_source, dit_preset, load=True)
        compute = compute_dtype(cfg)
        weights = None if compute["weights"] == "float32" else DTYPES[compute["weights"]]
        self.tokenizer.requires_grad_(False).eval().to(device=device, dtype=weights)
        self.latents.requires_grad_(False).eval().to(device=device, dtype=weights)
        self.autocast = compute["autocast"]
        self.device, self.source_size, self.dit_preset = device, cfg.mllm.source_size, dit_preset

    @torch.inference_mode()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A uint8 batch -> (x0 (B, C, h, w), features (E, N, D) of its E edit rows, or None)."""
        from unilip.models.mllm import source_image_features

        autocast = (
            torch.autocast(self.device.type, dtype=DTYPES[self.autocast]) if self.autocast else contextlib.nullcontext()
        )
        with autocast:
            x0 = self.latents.encode(to_float(batch["image"].to(self.device, non_blocking=True)))
            edits = batch["has_source"].nonzero().squeeze(1)
            features = None
            if len(edits):
                sources = to_float(batch["source_image"].index_select(0, edits).to(self.device, non_blocking=True))
                features = source_image_features(self.tokenizer, sources, self.source_size)
        return x0, features


def cache_stage(cfg) -> dict[str, Any] | None:
    """Cache the targets of `cfg`'s stage (a composed train config, task=generate) into `latent_cache.dir`.

    Returns the summary on rank 0 (None on the others).
    """
    from unilip.pipelines.sampling import distributed_env
    from unilip.tasks.generation.setup import cache_fingerprint, check_generation_config
    from unilip.training.config import check_train_config

    check_train_config(cfg)
    if cfg.task != "generate":
        raise ConfigError(f"task={cfg.task}: cached targets are for generation (task=generate)")
    check_generation_config(cfg)
    if cfg.latent_cache.dir is None:
        raise ConfigError("latent_cache.dir=<directory> is required: where the cached shards are written")
    if cfg.data.resize != "square":
        raise ConfigError(
            f"data.resize={cfg.data.resize}: a cache fixes each image once, so it needs the whole image (square), "
            "not a random crop"
        )
    out_dir = Path(cfg.latent_cache.dir)
    rank, world_size, local_rank = distributed_env()
    if cfg.data.get("build_photos"):  # the bundled photos, built once per machine before their globs are expanded
        ensure_photo_shards(cfg.data.photos_dir, builder=local_rank == 0)
    sources = expand_sources(cfg.data.train_sources or [])
    if not sources:
        raise ConfigError(f"stage {cfg.stage} has no training sources to cache (data.train_sources)")
    if source_caches(sources) is not None:
        raise ConfigError("the stage's sources are cached latents already; point them at the image shards")
    jobs = plan(sources, out_dir)
    device = torch.device(cfg.latent_cache.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    encoders = Encoders(cfg, device)
    expected = cache_fingerprint(cfg, encoders.tokenizer_source, encoders.tokenizer, encoders.dit_preset)
    for name in sources:  # before anything is written: a cache made otherwise is never added to
        existing = read_manifest(out_dir / name)
        if existing is not None and (problem := refusal(out_dir / name, expected, existing.get("fingerprint", {}))):
            raise ConfigError(f"{problem}; choose another latent_cache.dir, or delete this one to cache it again")
    group = _process_group(world_size)
    try:
        if rank == 0:
            for name in sources:
                if read_manifest(out_dir / name) is None:
                    write_manifest(out_dir / name, _manifest(expected, jobs, name, {}, encoders))
        _barrier(group)
        report = _encode(jobs[rank::world_size], encoders, cfg, rank)
        reports = _gather(report, world_size)
        _barrier(group)
        if rank != 0:
            return None
        return _finish(out_dir, jobs, sources, expected, encoders, reports, world_size)
    finally:
        if group:
            torch.distributed.destroy_process_group()


def _encode(jobs: list[Job], encoders: Encoders, cfg, rank: int) -> Report:
    from tqdm import tqdm

    report = Report(rank)
    todo = [job for job in jobs if not job.out.exists()]
    report.already = len(jobs) - len(todo)
    start = time.perf_counter()
    if not todo:
        return report
    counts = shard_counts(job.url for job in todo).values()
    total = None if any(n is None for n in counts) else sum(counts)
    transform = SampleTransform(cfg.data.image_size, train=False, with_source=True, resize=cfg.data.resize)
    stream = CacheStream(todo, transform, cfg.data.batch_size, cfg.data.max_consecutive_failures)
    workers = min(cfg.data.num_workers, len(todo))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=encoders.device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    dtype = DTYPES[cfg.latent_cache.dtype]
    writers: dict[int, ShardWriter] = {}
    bar = tqdm(total=total, unit="sample", desc=f"caching ({len(todo)} shards)", disable=rank != 0)
    for item in loader:
        index = item.pop("job")
        if "error" in item:
            raise DataError(item["error"])
        writer = writers.get(index) or writers.setdefault(index, ShardWriter(todo[index]))
        if item.get("end"):
            record = writers.pop(index).finish(item["skipped"], item["broke_off"])
            report.records[str(todo[index].out)] = record
            report.shards += 1
            report.skipped += item["skipped"]
            report.bytes += writer.bytes
            bar.set_postfix(shards=report.shards)
            continue
        x0, features = encoders(item)
        x0 = x0.cpu()
        features = features.cpu() if features is not None else None
        edit = 0
        for row, (key, caption) in enumerate(zip(item["key"], item["caption"], strict=True)):
            source = None
            if item["has_source"][row]:
                source, edit = features[edit], edit + 1
            writer.write(key, caption, pack(x0[row], source, dtype))
        report.samples += len(item["key"])
        bar.update(len(item["key"]))
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _manifest(expected, jobs, name, shards, encoders: Encoders) -> dict[str, Any]:
    inputs = [job for job in jobs if job.source == name]
    return {
        "format": FORMAT,
        "fingerprint": expected,
        "complete": len(shards) == len(inputs),
        "inputs": len(inputs),
        "tokenizer": encoders.tokenizer_source,
        "latents": encoders.record,
        "samples": sum(r["samples"] for r in shards.values()),
        "skipped": sum(r["skipped"] for r in shards.values()),
        "shards": shards,
    }


def _finish(out_dir, jobs, sources, expected, encoders, reports, world_size) -> dict[str, Any]:
    """Rank 0, after every rank is done: per source, the counts (index.json) and the manifest; the summary."""
    for name in sources:
        done = {job.out.name: shard_record(job.out) for job in jobs if job.source == name and job.out.exists()}
        if done:
            write_index(out_dir / name, {shard: record["samples"] for shard, record in done.items()})
        write_manifest(out_dir / name, _manifest(expected, jobs, name, done, encoders))
    summary = {
        key: sum(getattr(r, key) for r in reports) for key in ("shards", "already", "samples", "skipped", "bytes")
    }
    seconds = max(r.seconds for r in reports)
    summary |= {"seconds": seconds, "processes": world_size, "out": str(out_dir)}
    per_sample = summary["bytes"] / max(1, summary["samples"])
    line = (
        f"cached {summary['samples']} samples ({summary['skipped']} skipped) into {summary['shards']} shards "
        f"({summary['already']} were cached already) under {out_dir}: {summary['bytes'] / 1e6:.1f} MB "
        f"({per_sample / 1e3:.1f} kB per sample), {seconds:.1f} s "
        f"({summary['samples'] / max(seconds, 1e-9):.1f} samples/s, {world_size} process(es))"
    )
    output(__name__).info(line)
    return summary


def _process_group(world_size: int) -> bool:
    # Under torchrun the ranks only meet to agree on the start and to gather the reports: gloo suffices.
    if world_size <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", timeout=timedelta(days=1))
    return True


def _barrier(group: bool) -> None:
    if group:
        torch.distributed.barrier()


def _gather(report: Report, world_size: int) -> list[Report]:
    if world_size <= 1 or not torch.distributed.is_initialized():
        return [report]
    gathered: list[dict | None] = [None] * world_size
    torch.distributed.all_gather_object(gathered, asdict(report))
    return [Report(**r) for r in gathered if r is not None]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        output(__name__).info(__doc__)
        return None
    cli_logging()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from unilip.logs import one_line_errors, quiet_third_party_noise
    from unilip.models.presets import compose_config

    quiet_third_party_noise()
    with one_line_errors(HydraException, OmegaConfBaseException):
        cfg = compose_config("train", ["task=generate", *argv, "run_dir=."])
        return cache_stage(cfg)


if __name__ == "__main__":
    main()
