"""Sampling from trained models: text-to-image and editing (`UniLIPPipeline`, `python -m unilip.pipelines.generate`)."""

from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline, make_scheduler

__all__ = ["SCHEDULERS", "UniLIPPipeline", "make_scheduler"]
