"""Validation metrics averaged over every sample of every rank, safe when a rank saw no sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


class EpochMeans:
    """Per-sample values summed over a validation epoch, then averaged over all ranks' samples.

    Lightning's `self.log(..., sync_dist=True)` reduces a metric at epoch end only on the ranks
    that logged it: a rank that got no validation sample (more ranks than samples, or a short
    last shard) skips the collective and the job hangs. Here every rank calls `compute()` once
    (one all-reduce of a fixed-size tensor, whatever it saw), so the numbers are those of one
    process over the same samples: the mean over samples, not over batches or ranks.

    Args:
        names: the metrics, the same on every rank (e.g. "val/psnr", "val/ssim").
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)

    def add(self, name: str, values: torch.Tensor) -> None:
        """Add per-sample values (B,) (kept on their device; no host sync)."""
        if name not in self.counts:
            raise KeyError(f"{name!r} is not one of {self.names}")
        total = values.detach().double().sum()
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] += values.numel()

    def compute(self, device: torch.device) -> dict[str, float]:
        """Means over all ranks' samples; a metric no rank saw is left out. A collective: call on every rank."""
        sums = torch.stack([self.sums.get(n, torch.zeros((), dtype=torch.float64)).to(device) for n in self.names])
        counts = torch.tensor([float(self.counts[n]) for n in self.names], dtype=torch.float64, device=device)
        totals = torch.cat([sums, counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        sums, counts = totals.tolist()[: len(self.names)], totals.tolist()[len(self.names) :]
        self.reset()
        return {name: s / c for name, s, c in zip(self.names, sums, counts, strict=True) if c > 0}


def log_epoch_means(module: Any, means: dict[str, float]) -> None:
    """Log `EpochMeans.compute()`'s means from a LightningModule. They are already the same on every rank, so
    Lightning's sync (which it asks for in a warning per metric otherwise) takes their max: the values unchanged."""
    module.log_dict(means, on_epoch=True, sync_dist=True, reduce_fx="max")
