"""What `python -m unilip.benchmarks <name>` does: read the benchmark's prompts, sample them (sharded,
resumable), then score with the official scorer or print its commands, and write the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unilip.benchmarks.base import Benchmark
from unilip.benchmarks.scoring import check_scorer, score_and_report
from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline
from unilip.pipelines.manifest import SamplingError, generator_record, identity
from unilip.pipelines.sampling import SamplerSettings, run_sampling

log = logging.getLogger(__name__)

SEED_RULE = (
    "prompt i (0-based, in the benchmark's own order) uses seed + i; its sample k starts from row k of "
    "torch.randn((samples per prompt, C, h, w), generator=torch.Generator().manual_seed(seed + i))"
)


def check_config(cfg: DictConfig) -> None:
    """One clear error for each required key left empty or a setting out of range."""
    for key, hint in (
        ("generator", "a saved generator (<run>/generator)"),
        ("out", "the output folder"),
        ("prompts", "the benchmark's prompt file or folder"),
    ):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise SamplingError(f"{key}= is required: {hint}")
    if cfg.sampler.scheduler not in SCHEDULERS:
        raise SamplingError(f"sampler.scheduler={cfg.sampler.scheduler!r}: use one of {SCHEDULERS}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise SamplingError(f"dtype={cfg.dtype!r}: use float32 or bfloat16")
    if cfg.batch_size < 1 or cfg.sampler.steps < 1:
        raise SamplingError("batch_size and sampler.steps must be 1 or more")


def run_benchmark(cfg: DictConfig) -> dict[str, Any] | None:
    """Sample and score `cfg.benchmark`; returns the results on rank 0 (None on the other ranks)."""
    check_config(cfg)
    benchmark: Benchmark = instantiate(cfg.benchmark)
    out = Path(cfg.out).expanduser().resolve()
    settings = SamplerSettings(dtype=cfg.dtype, **OmegaConf.to_container(cfg.sampler))
    check_scorer(benchmark, out, cfg.scorer, cfg.scorer_python, settings.size)  # before anything is generated
    jobs = benchmark.jobs(out, settings.seed)
    model, lineage = generator_record(cfg.generator, cfg.tokenizer, cfg.mllm_weights)
    run_identity = identity(settings, jobs, model, benchmark=benchmark.name)
    description = {
        "benchmark": benchmark.name,
        "format": benchmark.format_source,
        "inputs": benchmark.inputs(),
        "seed_rule": SEED_RULE,
        "scorer": benchmark.pin.record() if benchmark.pin is not None else None,
        "generator": lineage,
    }
    log.info(
        "%s: %d prompts, %d output files, into %s", benchmark.name, len(jobs), sum(len(j.outputs) for j in jobs), out
    )

    def load(device: torch.device) -> UniLIPPipeline:
        return UniLIPPipeline.from_pretrained(
            cfg.generator,
            device=device,
            dtype=getattr(torch, cfg.dtype),
            tokenizer=cfg.tokenizer,
            mllm_weights=cfg.mllm_weights,
            scheduler=settings.scheduler,
        )

    result = run_sampling(
        load,
        jobs,
        out,
        settings,
        run_identity,
        description,
        batch_size=cfg.batch_size,
        device=cfg.device,
        timeout_s=cfg.timeout_s,
        prepare=lambda shard: benchmark.prepare(out, shard),
    )
    if result.manifest is None:
        return None
    return score_and_report(benchmark, out, cfg.scorer, cfg.scorer_python, settings.size, result.manifest)
