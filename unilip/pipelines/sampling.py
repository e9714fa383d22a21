"""Sampling many prompts: sharded over processes, resumable, one seed per prompt, settings in a manifest.

The one machinery behind `python -m unilip.pipelines.generate prompts` and every benchmark of
`python -m unilip.benchmarks`:

- A `SampleJob` is one prompt (and, for an edit, its source image) and the files its samples go to.
- Jobs are split over processes by position (job i -> rank i % world size): every job on exactly one rank,
  with no coordination (`shard`). Under `torchrun` the ranks meet once at the end to record what each did.
- A sample whose file exists is not sampled again. Files appear atomically (written under a temporary
  name, then renamed), so a killed run leaves no partial image and a restart samples only what is missing.
- Sample k of a job starts from row k of `torch.randn((samples, C, h, w), generator=manual_seed(job.seed))`
  (h = w = ceil(size / 28); an edit that keeps its source's aspect ratio has its own (h, w), `aspect_grid`),
  so an image does not depend on the batch, rank or restart it is made in (and sample 0 of a one-sample
  job is what `UniLIPPipeline(..., seed=job.seed)` gives for that prompt alone).
- `manifest.json` records the sampler settings, the inputs' digest and the generator's lineage and weights
  digest; a run with other settings or inputs in the same output directory is refused before anything is
  written (its images would be mixed with these).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from unilip.models.latents import latent_grid
from unilip.pipelines.jobs import SampleJob, SamplerSettings
from unilip.pipelines.manifest import MANIFEST, TEMP_PREFIX, check_manifest, write_json

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ShardReport:
    """What one rank did: the outputs it wrote and the jobs it had to skip (with the reason)."""

    rank: int
    generated: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    already_done: int = 0
    pipeline: dict[str, Any] = field(default_factory=dict)  # what the loaded pipeline used (flow shift, ...)


# ---------------------------------------------------------------------------------------------- sharding
def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items rank, rank + world_size, rank + 2 world_size, ...: each item on exactly one of the ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} ranks")
    return list(items[rank::world_size])


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------------------------------------- files
def save_png(image: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 -> PNG at `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(TEMP_PREFIX + path.name)
    Image.fromarray(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def save_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(TEMP_PREFIX + path.name)
    temporary.write_text(text)
    os.replace(temporary, path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def tile(samples: list[np.ndarray]) -> np.ndarray:
    """Four (H, W, 3) samples -> a 2 x 2 grid, row-major (sample 1 top right, 2 bottom left)."""
    side = math.isqrt(len(samples))
    rows = [np.concatenate(samples[r * side : (r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


def load_source(path: str | Path, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file -> ((3, side, side) in [0, 1], its (width, height)): the whole image resized (no crop),
    as InternVL's processor feeds a 448 x 448 tile; the conditioner sees exactly this."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        original = image.size
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255, original


def aspect_grid(side: int, width: int, height: int) -> tuple[int, int]:
    """The latent grid (rows, columns) for an output of a `width` x `height` source's aspect ratio with at most
    side x side tokens, as many as possible: the short edge s is one of the two integers around
    sqrt(side^2 / ratio), the long one floor or ceil(s ratio), so it is within one cell of the source's shape.
    A square source gets (side, side). (GEdit-Bench's generate_image_example.py buckets the same way, to
    multiples of 32 px around 512 x 512.)"""
    ratio, tokens = max(width, height) / min(width, height), side * side
    best = (1, 1)
    for short in {max(1, math.floor(math.sqrt(tokens / ratio))), max(1, math.ceil(math.sqrt(tokens / ratio)))}:
        for long in {max(short, math.floor(short * ratio)), max(short, math.ceil(short * ratio))}:
            error, area = abs(long - short * ratio), short * long
            if area <= tokens and (area, -error) > (best[0] * best[1], -abs(best[1] - best[0] * ratio)):
                best = (short, long)
    short, long = best
    return (short, long) if width >= height else (long, short)


def pending_samples(job: SampleJob, out: Path) -> list[int]:
    """The sample indices of `job` still to make (all of them for a grid whose file is missing)."""
    if job.grid:
        return [] if (out / job.outputs[0]).exists() else list(range(job.samples))
    return [k for k, name in enumerate(job.outputs) if not (out / name).exists()]


def remove_partial_files(jobs: Sequence[SampleJob], out: Path) -> int:
    """Delete temporary files a killed run left next to these jobs' outputs; returns how many."""
    removed = 0
    for job in jobs:
        for name in (*job.outputs, *(path for path, _ in job.extra_files)):
            temporary = (out / name).with_name(TEMP_PREFIX + Path(name).name)
            if temporary.exists():
                temporary.unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- sampling
def sample_jobs(
    pipe,
    jobs: Sequence[SampleJob],
    out: Path,
    settings: SamplerSettings,
    batch_size: int = 8,
    rank: int = 0,
    on_write: Callable[[str], None] | None = None,
) -> ShardReport:
    """Make every missing sample of `jobs` with `pipe` (a `UniLIPPipeline`) into `out`.

    Rows (job, sample) are batched `batch_size` at a time in job order; a job whose source image cannot be
    read is skipped and reported, the rest of the run goes on. Returns what was written and skipped.
    """
    out = Path(out)
    report = ShardReport(rank)
    if removed := remove_partial_files(jobs, out):
        log.info("rank %d: removed %d partial files left by an interrupted run", rank, removed)
    rows = [(job, k) for job in jobs for k in pending_samples(job, out)]
    report.already_done = sum(job.samples for job in jobs) - len(rows)
    if report.already_done:
        log.info("rank %d: %d samples already exist and are kept", rank, report.already_done)
    log.info("rank %d: %d samples of %d prompts to make", rank, len(rows), len({job.key for job, _ in rows}))
    grid_parts: dict[str, dict[int, np.ndarray]] = {}
    side = latent_grid(settings.size)
    channels = pipe.latents.channels
    source_side = pipe.conditioner.source_size
    skipped: set[str] = set()
    started, done = time.monotonic(), 0
    for start in range(0, len(rows), batch_size):
        groups: dict[tuple[int, int], list[tuple[SampleJob, int, torch.Tensor | None]]] = {}
        for job, k in rows[start : start + batch_size]:
            if job.key in skipped:
                continue
            source, grid = None, (side, side)
            if job.source is not None:
                try:
                    source, (width, height) = load_source(job.source, source_side)
                except OSError as error:  # missing or undecodable: skip this prompt, keep the run
                    skipped.add(job.key)
                    report.skipped.append({"key": job.key, "reason": f"source image {job.source}: {error}"})
                    log.warning(
                        "rank %d: skipping %s: source image %s unreadable (%s)", rank, job.key, job.source, error
                    )
                    continue
                if job.keep_aspect:
                    grid = aspect_grid(side, width, height)
            groups.setdefault(grid, []).append((job, k, source))
        for grid, batch in groups.items():  # one forward pass per latent shape; square-only: the whole batch
            images = _sample(pipe, batch, settings, grid, channels, source_side)
            for (job, k, _), pixels in zip(batch, to_uint8(images), strict=True):
                written = _write(job, k, pixels, out, grid_parts)
                if written is None:
                    continue
                report.generated.append(written)
                if on_write is not None:
                    on_write(written)
            done += len(batch)
        if done:
            elapsed = time.monotonic() - started
            log.info("rank %d: %d / %d samples (%.2f s per sample)", rank, done, len(rows), elapsed / done)
    return report


def _sample(pipe, batch, settings: SamplerSettings, grid: tuple[int, int], channels: int, source_side: int):
    """One forward pass: rows (job, sample index, source or None) of one latent shape -> (B, 3, H, W) images."""
    noise = torch.stack([_noise(job, channels, grid)[k] for job, k, _ in batch])
    has_source = torch.tensor([source is not None for _, _, source in batch])
    source_images = None
    if has_source.any():
        blank = torch.zeros(3, source_side, source_side)
        source_images = torch.stack([blank if source is None else source for _, _, source in batch])
    side = latent_grid(settings.size)  # a cell stands for size / side pixels (28 at 448 px)
    size = (
        settings.size
        if grid == (side, side)
        else (round(grid[0] * settings.size / side), round(grid[1] * settings.size / side))
    )
    return pipe(
        [job.prompt for job, _, _ in batch],
        source_images,
        has_source,
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.steps,
        size=size,
        scheduler=settings.scheduler,
        noise=noise,
    )


def _write(job: SampleJob, k: int, pixels: np.ndarray, out: Path, grid_parts: dict) -> str | None:
    """Save sample k of `job` (its grid once all four samples are in); returns the file written, if any."""
    for name, text in job.extra_files:
        if not (out / name).exists():
            save_text(text, out / name)
    if job.grid:
        parts = grid_parts.setdefault(job.key, {})
        parts[k] = pixels
        if len(parts) < job.samples:
            return None
        save_png(tile([parts[i] for i in range(job.samples)]), out / job.outputs[0])
        del grid_parts[job.key]
        return job.outputs[0]
    save_png(pixels, out / job.outputs[k])
    return job.outputs[k]


def _noise(job: SampleJob, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """The starting noise of all of a job's samples: (samples, C, rows, columns) from the job's seed."""
    return torch.randn((job.samples, channels, *grid), generator=torch.Generator().manual_seed(job.seed))


# ---------------------------------------------------------------------------------------------- a whole run
@dataclass
class RunResult:
    """What a sampling run did over all ranks (rank 0 only; other ranks get `reports=None`)."""

    manifest: dict[str, Any] | None
    reports: list[ShardReport] | None


def run_sampling(
    load_pipe: Callable[[torch.device], Any],
    jobs: Sequence[SampleJob],
    out: str | Path,
    settings: SamplerSettings,
    run_identity: dict[str, Any],
    description: dict[str, Any] | None = None,
    batch_size: int = 8,
    device: str | None = None,
    timeout_s: float = 86400,
    prepare: Callable[[Sequence[SampleJob]], None] | None = None,
) -> RunResult:
    """Sample `jobs` into `out` on this rank's shard, then record the run in `out/manifest.json`.

    Under torchrun (WORLD_SIZE > 1) the ranks form a gloo group whose only use is to gather the reports at
    the end (it waits up to `timeout_s` for the slowest rank). The manifest check runs first on every rank
    and a refusal changes nothing on disk. `load_pipe(device)` builds the pipeline; `prepare(shard)` writes
    what the shard's jobs need before sampling (e.g. extracted source images).
    """
    out = Path(out)
    rank, world_size, local_rank = distributed_env()
    existing = check_manifest(out, run_identity)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    group = _process_group(world_size, timeout_s)
    try:
        manifest = existing or {
            "identity": run_identity,
            **(description or {}),
            "jobs": len(jobs),
            "outputs": sum(len(job.outputs) for job in jobs),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": [],
        }
        if rank == 0 and existing is None:
            write_json(out / MANIFEST, manifest)
        mine = shard(jobs, rank, world_size)
        if prepare is not None:
            prepare(mine)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        needed = any(pending_samples(job, out) for job in mine)
        report = ShardReport(rank)
        if needed:
            pipe = load_pipe(torch.device(device))
            report = sample_jobs(pipe, mine, out, settings, batch_size, rank)
            report.pipeline = {"flow_shift": getattr(pipe, "flow_shift", None), "device": str(pipe.device)}
        else:
            report.already_done = sum(job.samples for job in mine)
            log.info("rank %d: all %d samples of this shard exist", rank, report.already_done)
        reports = _gather(report, world_size)
        if rank != 0:
            return RunResult(None, None)
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["runs"].append(
            {
                "started": started,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "world_size": world_size,
                "batch_size": batch_size,
                "device": str(device),
                "ranks": [dataclasses.asdict(r) for r in reports],
            }
        )
        missing = [name for job in jobs if pending_samples(job, out) for name in job.outputs]
        manifest["complete"] = not missing
        write_json(out / MANIFEST, manifest)
        skipped = sum(len(r.skipped) for r in reports)
        log.info(
            "wrote %d files this run (%d ranks), %d prompts skipped, %d outputs still missing",
            sum(len(r.generated) for r in reports),
            world_size,
            skipped,
            len(missing),
        )
        return RunResult(manifest, reports)
    finally:
        if group:
            torch.distributed.destroy_process_group()


def _process_group(world_size: int, timeout_s: float) -> bool:
    if world_size <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        return True
    return False


def _gather(report: ShardReport, world_size: int) -> list[ShardReport]:
    if world_size <= 1 or not torch.distributed.is_initialized():
        return [report]
    gathered: list[ShardReport | None] = [None] * world_size
    torch.distributed.all_gather_object(gathered, report)
    return [r for r in gathered if r is not None]
