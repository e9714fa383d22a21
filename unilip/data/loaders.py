"""Main-process side of the data pipeline: the resumable training loader and the evaluation loader.

Both wrap a fresh `torch.utils.data.DataLoader` per pass over a stream from `unilip.data.streams`,
strip the per-batch `__meta__` the workers attach, and keep the skip counts they report.

`TrainLoader` is a cursor over an endless stream cut into epochs of `batches_per_epoch` batches.
The DataLoader hands out batch i from worker i % W, so after b batches the next one is due from
virtual worker b % W; a new DataLoader rotates the worker roles by b and starts each virtual
worker at the raw position recorded from its last delivered batch. `state_dict()` holds exactly
that, so Lightning (which saves and restores any train loader with `state_dict`/`load_state_dict`)
resumes a run onto the very batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from unilip.data.shards import DataError
from unilip.data.streams import EvalStream, TrainSource, TrainStream
from unilip.data.transforms import SampleTransform, collate

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _dataloader(stream: Any, num_workers: int, pin_memory: bool, prefetch_factor: int | None) -> DataLoader:
    # persistent_workers stays off: each pass needs workers built with that pass's plan (epoch, rotation).
    # A private generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG,
    # which would shift the model's random stream (noise, dropout) differently in a resumed run.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )


def _shutdown(iterator: Any) -> None:
    # Stop the workers as soon as the pass is over, not when the iterator is garbage collected.
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class TrainLoader:
    """Endless, mixed, shuffled training batches of one rank, `batches_per_epoch` per epoch; resumable.

    Yields the batch contract of `unilip.data.transforms.collate`. `len()` is `batches_per_epoch`.
    Each `iter()` continues from the current position: the rest of the epoch, or a new epoch
    (re-seeded) when the last one was finished.

    Args:
        sources: training sources with expanded urls and weights.
        transform: a training `SampleTransform`.
        batch_size: samples per batch (per rank).
        batches_per_epoch: batches per epoch, per rank.
        num_workers: DataLoader worker processes (resuming with another number continues in another order).
        seed: base seed of every stream.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        shuffle_buffer, max_consecutive_failures: see `TrainStream`.
        pin_memory: pin batches when CUDA is available.
        prefetch_factor: batches prepared ahead per worker.
    """

    def __init__(
        self,
        sources: Sequence[TrainSource],
        transform: SampleTransform,
        batch_size: int,
        batches_per_epoch: int,
        num_workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 100,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
    ) -> None:
        if not sources:
            raise ValueError("TrainLoader: no training sources")
        self.sources = tuple(sources)
        self.transform = transform
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_failures = max_consecutive_failures
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._vworkers = max(1, num_workers)
        self.epoch = 0
        self.delivered = 0  # batches of this epoch already handed out
        self.positions = [0] * self._vworkers  # raw samples consumed per virtual worker this epoch
        self.vworker_skips = [[0, 0] for _ in range(self._vworkers)]  # [samples, shards] this epoch
        self.skipped_before = [0, 0]  # [samples, shards] in earlier epochs
        # Weak: the iterator references the loader, and a cycle would leave worker shutdown to the
        # garbage collector, which can tear down the worker queues first (a 5 s join timeout per worker).
        self._active: weakref.ref[_TrainIterator] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped on this rank in the batches delivered so far (all epochs)."""
        samples = self.skipped_before[0] + sum(s[0] for s in self.vworker_skips)
        shards = self.skipped_before[1] + sum(s[1] for s in self.vworker_skips)
        return {"samples": samples, "shards": shards}

    def __iter__(self) -> Iterator[dict]:
        if self._active is not None and (previous := self._active()) is not None:
            previous.close()  # one pass at a time: both would advance the same position
        if self.delivered >= self.batches_per_epoch:
            self._start_next_epoch()
        stream = TrainStream(
            self.sources,
            self.transform,
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            num_workers=self.num_workers,
            rotation=self.delivered % self._vworkers,
            positions=self.positions,
            shuffle_buffer=self.shuffle_buffer,
            max_consecutive_failures=self.max_consecutive_failures,
        )
        iterator = _TrainIterator(self, _dataloader(stream, self.num_workers, self.pin_memory, self.prefetch_factor))
        self._active = weakref.ref(iterator)
        return iterator

    def _start_next_epoch(self) -> None:
        skipped = self.skipped
        self.skipped_before = [skipped["samples"], skipped["shards"]]
        self.epoch += 1
        self.delivered = 0
        self.positions = [0] * self._vworkers
        self.vworker_skips = [[0, 0] for _ in range(self._vworkers)]

    def _end_of_epoch(self) -> None:
        skipped = self.skipped
        if self.rank == 0 and (skipped["samples"] or skipped["shards"]):
            log.warning(
                "data: after epoch %d, skipped %d undecodable samples and %d unreadable shards on rank 0",
                self.epoch,
                skipped["samples"],
                skipped["shards"],
            )

    def _fingerprint(self) -> dict[str, Any]:
        # What must not change between save and resume for the stream to be the same.
        return {"seed": self.seed, "sources": [[s.name, s.weight] for s in self.sources]}

    def _layout(self) -> dict[str, int]:
        # What may change (other hardware): every rank's and virtual worker's stream is drawn on its own
        # (shards with replacement, seeded by rank and worker), so the streams that existed continue where
        # they were, new ones start, dropped ones end: the same data distribution, another order.
        return {"num_workers": self._vworkers, "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        """Position of this loader, and of every rank's loader when torch.distributed is running.

        Format: {"version": 1, "seed", "num_workers", "world_size", "sources": [[name, weight]],
        "batches_per_epoch", "num_shards": [int per source], "ranks": {rank: {"epoch", "delivered",
        "positions": [int] * W, "vworker_skips": [[samples, shards]] * W, "skipped_before": [samples, shards]}}}.
        Lightning writes the checkpoint from rank 0 only, so under DDP this gathers all ranks
        (a collective: every rank calls it, as Lightning's checkpointing does).
        """
        own = {
            "epoch": self.epoch,
            "delivered": self.delivered,
            "positions": list(self.positions),
            "vworker_skips": [list(s) for s in self.vworker_skips],
            "skipped_before": list(self.skipped_before),
        }
        ranks = {self.rank: own}
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, own))
            ranks = dict(gathered)
        return {
            "version": STATE_VERSION,
            **self._fingerprint(),
            **self._layout(),
            "batches_per_epoch": self.batches_per_epoch,
            "num_shards": [len(s.urls) for s in self.sources],
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the configuration must match (checked)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"train loader state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        for name, value in self._fingerprint().items():
            if state[name] != value:
                raise ValueError(
                    f"train loader state: {name}={state[name]!r} in the checkpoint but {value!r} now;"
                    f" resume with the same {name} (the data stream depends on it)"
                )
        if state["batches_per_epoch"] != self.batches_per_epoch:
            log.warning("train loader: batches_per_epoch changed %s -> %s", state["batches_per_epoch"], len(self))
        if state["num_shards"] != (now := [len(s.urls) for s in self.sources]):
            # Allowed (a dataset may grow), but the stream then differs from the saved run's.
            log.warning(
                "train loader: shards per source changed %s -> %s; the data order is not resumed exactly",
                state["num_shards"],
                now,
            )
        saved = {name: state[name] for name in self._layout()}
        if saved != self._layout():
            log.warning(
                "train loader: saved with %s, resumed with %s; every stream continues (or starts), but the data "
                "order is not the uninterrupted run's",
                saved,
                self._layout(),
            )
        own = state["ranks"].get(self.rank)
        if own is None:  # a rank the saved run did not have: its stream starts, in step with the others
            first = next(iter(state["ranks"].values()))
            own = {"epoch": first["epoch"], "delivered": first["delivered"], "positions": [], "vworker_skips": []}
            own["skipped_before"] = [0, 0]
        self.epoch, self.delivered = own["epoch"], own["delivered"]
        kept = min(self._vworkers, len(own["positions"]))
        self.positions = list(own["positions"][:kept]) + [0] * (self._vworkers - kept)
        self.vworker_skips = [list(s) for s in own["vworker_skips"][:kept]]
        self.vworker_skips += [[0, 0] for _ in range(self._vworkers - kept)]
        dropped = [sum(s[i] for s in own["vworker_skips"][kept:]) for i in (0, 1)]  # their skips stay counted
        self.skipped_before = [before + extra for before, extra in zip(own["skipped_before"], dropped, strict=True)]


class _TrainIterator:
    """One pass of a `TrainLoader`: records each delivered batch's worker position and skips."""

    def __init__(self, loader: TrainLoader, dataloader: DataLoader) -> None:
        self.loader = loader
        self.base = [list(s) for s in loader.vworker_skips]  # workers report counts since they started
        self.iterator: Any = iter(dataloader)

    def __iter__(self) -> _TrainIterator:
        return self

    def __next__(self) -> dict:
        loader = self.loader
        if self.iterator is None or loader.delivered >= loader.batches_per_epoch:
            self.close()
            raise StopIteration
        batch = next(self.iterator)
        meta = batch.pop("__meta__")
        if "error" in meta:
            self.close()
            raise DataError(meta["error"])
        vworker = meta["vworker"]
        loader.positions[vworker] = meta["position"]
        loader.vworker_skips[vworker] = [b + s for b, s in zip(self.base[vworker], meta["skipped"], strict=True)]
        loader.delivered += 1
        if loader.delivered == loader.batches_per_epoch:
            self.close()
            loader._end_of_epoch()
        return batch

    def close(self) -> None:
        if self.iterator is not None:
            _shutdown(self.iterator)
            self.iterator = None


class _OtherRanks:
    """Per batch, whether any rank still has a batch (a scalar all-reduce; every rank calls it equally often)."""

    def __init__(self, device: torch.device):
        self.device = device

    @classmethod
    def of_this_process(cls, world_size: int) -> _OtherRanks | None:
        if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        nccl = torch.distributed.get_backend() == "nccl"
        return cls(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))

    def any_left(self, mine: bool) -> bool:
        count = torch.tensor([float(mine)], device=self.device)
        torch.distributed.all_reduce(count)
        return bool(count.item())


class EvalLoader:
    """One deterministic pass over evaluation shards per `iter()`; each sample once across ranks.

    Yields the batch contract of `unilip.data.transforms.collate` (last batch of each worker may be
    short). Ranks hold different numbers of samples, or none. Under torch.distributed every rank
    still yields the same number of batches: a rank whose data is done yields padding batches
    (`batch["padding"]` True: one blank image, no key) while any other rank has data, so that
    collective forward passes (FSDP gathers parameters in every forward) meet on every rank. The
    ranks agree on this with one scalar all-reduce per batch. Skip padding batches in metrics, and
    reduce metrics once at epoch end on every rank (`unilip.training.validation.EpochMeans`), not
    with `self.log(..., sync_dist=True)`, which only the ranks that logged would join.

    Args:
        urls: expanded shard urls, in the order to read them.
        transform: an evaluation `SampleTransform` (centre crop, no flip).
        batch_size, num_workers, rank, world_size, pin_memory: as in `TrainLoader`.
        max_consecutive_failures: this many undecodable samples in a row stop with a DataError.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: SampleTransform,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_consecutive_failures: int = 100,
        pin_memory: bool = False,
    ) -> None:
        self.urls = tuple(urls)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self.max_consecutive_failures = max_consecutive_failures
        self.pin_memory = pin_memory
        self.skipped = {"samples": 0, "shards": 0}  # of the latest (or current) pass, this rank

    def __iter__(self) -> Iterator[dict]:
        others = _OtherRanks.of_this_process(self.world_size)
        for batch in self._batches():
            if others is not None:
                others.any_left(True)
            yield batch
        while others is not None and others.any_left(False):
            yield self.padding_batch()

    def padding_batch(self) -> dict:
        """One blank image without a key (`padding` True), for a rank whose data is done."""
        size = self.transform.image_size
        blank = {"image": np.zeros((size, size, 3), dtype=np.uint8), "caption": "", "key": "", "source": None}
        return collate([blank], self.transform.with_source) | {"padding": True}

    def _batches(self) -> Iterator[dict]:
        stream = EvalStream(
            self.urls,
            self.transform,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            max_consecutive_failures=self.max_consecutive_failures,
        )
        per_slot: dict[int, list[int]] = {}
        good, last_error = 0, ""
        for item in _dataloader(stream, self.num_workers, self.pin_memory, 2):
            meta = item.pop("__meta__")
            if "error" in meta:
                raise DataError(meta["error"])
            per_slot[meta["slot"]] = meta["skipped"]
            last_error = meta["last_error"] or last_error
            self.skipped = {
                "samples": sum(s[0] for s in per_slot.values()),
                "shards": sum(s[1] for s in per_slot.values()),
            }
            if meta.get("end"):
                continue
            good += len(item["key"])
            yield item
        skipped = self.skipped["samples"] + self.skipped["shards"]
        if good == 0 and skipped:
            message = f"validation: not one sample of {len(self.urls)} shards could be read (last: {last_error})"
            if self.world_size == 1:
                raise DataError(message)
            # Other ranks may have read theirs: raising here alone would leave them waiting in the
            # epoch-end reduction. The training modules raise on every rank if no rank read a sample.
            log.warning("rank %d: %s", self.rank, message)
        if skipped and self.rank == 0:
            log.warning(
                "data: validation pass skipped %(samples)d samples and %(shards)d shards on rank 0", self.skipped
            )
