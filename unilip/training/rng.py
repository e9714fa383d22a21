"""Random-number-generator state in checkpoints, so a resumed run draws the same noise, timesteps and dropout."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def gather_rng_states(extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rank's torch / CUDA / numpy / Python RNG state (and `extra`, e.g. a module's own generator
    state), as plain tensors and numbers (checkpoints are read with `weights_only=True`)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    rng = {
        **(extra or {}),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": random.getstate(),
    }
    if dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng)
        return states
    return [rng]


def restore_rng_states(states: list[dict[str, Any]] | None, rank: int) -> dict[str, Any]:
    """Restore this rank's state from `gather_rng_states()` output (rank 0's if the run had fewer ranks);
    returns this rank's entry (with its `extra` keys)."""
    if not states:
        return {}
    rng = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, position, has_gauss, cached_gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(rng["python"])
    return rng
