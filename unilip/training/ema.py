"""Exponential moving average of weights, kept as buffers so checkpoints, DDP and FSDP carry it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """EMA of named parameters: shadow <- decay * shadow + (1 - decay) * param after every step.

    The shadows start as copies of the parameters (the DiT convention: the first average is
    the synced initial weights). With `warmup`, the decay ramps as min(decay, (1 + n) / (10 + n))
    so early averages are not dominated by the initial weights. Build it after any FSDP
    sharding, from the sharded parameters: each rank then averages its own shard.
    """

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self._params = list(named_parameters.values())
        self._names = [name.replace(".", "__") for name in named_parameters]
        for name, param in zip(self._names, self._params, strict=True):
            self.register_buffer(name, param.detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._names]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        torch._foreach_lerp_(self.shadows(), [p.detach() for p in self._params], 1.0 - decay)
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside the block the model's parameters hold the EMA weights; they are restored after."""
        backup = [p.detach().clone() for p in self._params]
        for param, shadow in zip(self._params, self.shadows(), strict=True):
            param.copy_(shadow)
        try:
            yield
        finally:
            for param, saved in zip(self._params, backup, strict=True):
                param.copy_(saved)


class ValidatesWithEMA:
    """LightningModule mixin: validation runs on the EMA weights (`self.ema`, an `EMA` or None).

    `ema_weights()` is the same swap as a context manager, e.g. for saving the result.
    """

    ema: EMA | None

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        if self.ema is None:
            yield
        else:
            with self.ema.swapped():
                yield

    def on_validation_epoch_start(self) -> None:
        self._ema_context = self.ema_weights()
        self._ema_context.__enter__()

    def on_validation_epoch_end(self) -> None:
        self._ema_context.__exit__(None, None, None)
