"""Sampling from trained models: text-to-image and editing (`UniLIPPipeline`, `python -m unilip.pipelines.generate`),
the sharded resumable prompt sampler and its manifest, and the SDE sampler with log-probabilities (Flow-GRPO).

May import `unilip.training` (a generator's lineage), `unilip.pretrained`, `unilip.models` and the foundation;
not the tasks (whose validation samples through it) nor `unilip.evaluation`.
"""

from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline, make_scheduler

__all__ = ["SCHEDULERS", "UniLIPPipeline", "make_scheduler"]
