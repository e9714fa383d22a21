"""What each DataLoader worker runs: batches made from shards, for training and for evaluation.

Batches are assembled inside the worker (the DataLoader runs with `batch_size=None`), so that a
worker's batches depend only on its own stream. Each batch carries a `__meta__` dict for the
main process (`unilip.data.loaders`), which strips it before the batch reaches the model.

Training: worker w of rank r plays "virtual worker" v = (w + rotation) % W and reads an endless
stream that is a pure function of (seed, epoch, rank, v): shards drawn with replacement by a
seeded RNG per source, a seeded shuffle buffer over raw (undecoded) samples, sources mixed by a
seeded weighted draw, and each sample's augmentation drawn from an RNG keyed by its raw index.
So a worker can resume at raw position p by reading and discarding p raw samples without
decoding them, and get exactly the batches it would have produced.

Evaluation: one finite pass in which every sample is seen once across all ranks and workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from unilip.data.shards import DataError, SkipCounter, read_shard
from unilip.data.transforms import SampleTransform, collate


@dataclass(frozen=True)
class TrainSource:
    """One training data source: its shard urls (already expanded) and its sampling weight."""

    name: str
    urls: tuple[str, ...]
    weight: float


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _batches(
    samples: Iterator[tuple[int, dict]],
    transform: SampleTransform,
    batch_size: int,
    counter: SkipCounter,
    max_failures: int,
    rng_tag: str | None,
    drop_last: bool,
) -> Iterator[tuple[dict, int]]:
    """Decode (index, raw sample) pairs into collated batches; yield (batch, raw index after it).

    Undecodable samples are counted and skipped; `max_failures` of them in a row is a DataError.
    With `rng_tag`, sample i is augmented with an RNG seeded by f"{rng_tag}/{i}" (training).
    """
    examples: list[dict] = []
    failures = 0
    index = -1
    for index, raw in samples:
        rng = random.Random(f"{rng_tag}/{index}") if rng_tag is not None else None
        try:
            examples.append(transform(raw, rng))
        except Exception as error:  # any undecodable sample is skipped, never fatal on its own
            counter.sample_failed(raw.get("__key__", "?"), raw.get("__url__", "?"), error)
            failures += 1
            if failures >= max_failures:
                raise DataError(f"{failures} samples in a row failed to decode (last: {counter.last_error})") from None
            continue
        failures = 0
        if len(examples) == batch_size:
            yield collate(examples, transform.with_source), index + 1
            examples = []
    if examples and not drop_last:
        yield collate(examples, transform.with_source), index + 1


class TrainStream(IterableDataset):
    """Endless training batches of one rank for one epoch; see the module docstring.

    Args:
        sources: the training sources, mixed by weight.
        transform: raw sample -> example (a training transform).
        batch_size: samples per batch.
        seed, epoch, rank: with the virtual worker index, they fix the stream.
        num_workers: DataLoader workers (0 counts as 1 virtual worker, run in the main process).
        rotation: physical worker w plays virtual worker (w + rotation) % num_workers, so that a
            resumed DataLoader continues the round robin where the previous one stopped.
        positions: per virtual worker, the raw samples it consumed before this run (resume).
        shuffle_buffer: raw samples held per source and worker for shuffling (memory: this many
            encoded samples).
        max_consecutive_failures: this many failed samples, or shard reads with no sample, in a
            row stop the run with a DataError.
    """

    def __init__(
        self,
        sources: Sequence[TrainSource],
        transform: SampleTransform,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        num_workers: int,
        rotation: int,
        positions: Sequence[int],
        shuffle_buffer: int,
        max_consecutive_failures: int,
    ) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.transform = transform
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.num_vworkers = max(1, num_workers)
        self.rotation = rotation
        self.positions = tuple(positions)
        self.shuffle_buffer = shuffle_buffer
        self.max_failures = max_consecutive_failures

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(*_worker())

    def iterate(self, worker: int, num_workers: int) -> Iterator[dict]:
        """What DataLoader worker `worker` of `num_workers` yields (`__iter__` runs this in each worker)."""
        if num_workers != self.num_vworkers:
            raise RuntimeError(f"TrainStream built for {self.num_vworkers} workers runs in {num_workers}")
        vworker = (worker + self.rotation) % num_workers
        counter = SkipCounter(verbose=self.rank == 0)
        tag = f"{self.seed}/{self.epoch}/{self.rank}/{vworker}"
        try:
            samples = self._raw_samples(tag, counter)
            start = self.positions[vworker]
            counter.active = False  # these were delivered (and their skips counted) before the resume
            for _ in range(start):
                next(samples)
            counter.active = True
            indexed = enumerate(samples, start=start)
            for batch, position in _batches(
                indexed, self.transform, self.batch_size, counter, self.max_failures, tag, drop_last=True
            ):
                batch["__meta__"] = {"vworker": vworker, "position": position, "skipped": counter.as_list()}
                yield batch
        except DataError as error:
            yield {"__meta__": {"error": str(error)}}

    def _raw_samples(self, tag: str, counter: SkipCounter) -> Iterator[dict]:
        streams = [self._source_samples(i, tag, counter) for i in range(len(self.sources))]
        mix = random.Random(f"mix/{tag}")
        choices = range(len(streams))
        weights = [source.weight for source in self.sources]
        while True:
            yield next(streams[mix.choices(choices, weights)[0]])

    def _source_samples(self, index: int, tag: str, counter: SkipCounter) -> Iterator[dict]:
        source = self.sources[index]
        shard_rng = random.Random(f"shards/{tag}/{index}")
        shuffle_rng = random.Random(f"shuffle/{tag}/{index}")
        buffer: list[dict] = []
        empty_reads = 0
        while True:
            # Shards drawn with replacement: every rank and worker has an endless stream, with no
            # coordination and no shard-count constraint (webdataset's `resampled=True`).
            url = shard_rng.choice(source.urls)
            empty_reads += 1  # until this read gives a sample
            for sample in read_shard(url, counter):
                empty_reads = 0
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    pick = shuffle_rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    yield buffer.pop()
            if empty_reads >= self.max_failures:
                raise DataError(
                    f"training source {source.name!r}: {empty_reads} shard reads in a row gave no sample"
                    f" (last: {counter.last_error or url}); check its urls"
                )


def eval_shards(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """The shards one evaluation worker reads: shard i goes to rank i % world_size and, within that
    rank, to worker (i // world_size) % num_workers.

    Every shard is read exactly once in total, whatever the number of ranks and workers, and the
    ranks' shard counts differ by at most one. With fewer shards than ranks, some ranks get none
    (validation and eval.py reduce over all ranks, so they need no data); splitting a shard's
    samples between ranks instead would make every rank read it, i.e. the data read many times.
    """
    return [i for i in range(rank, num_shards, world_size) if (i // world_size) % num_workers == worker]


class EvalStream(IterableDataset):
    """One deterministic pass over `urls` for one rank: each sample once across ranks and workers.

    Worker w of rank r reads the shards `eval_shards` gives it, in order; the last batch of a
    worker may be short. `slot` = r * W + w identifies the worker in the skip accounting.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: SampleTransform,
        batch_size: int,
        rank: int,
        world_size: int,
        max_consecutive_failures: int,
    ) -> None:
        super().__init__()
        self.urls = tuple(urls)
        self.transform = transform
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.max_failures = max_consecutive_failures

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(*_worker())

    def iterate(self, worker: int, num_workers: int) -> Iterator[dict]:
        """What DataLoader worker `worker` of `num_workers` yields (`__iter__` runs this in each worker)."""
        slot = self.rank * num_workers + worker
        reads = SkipCounter(verbose=self.rank == 0)
        decodes = SkipCounter(verbose=self.rank == 0)

        def meta(**extra) -> dict:
            last = decodes.last_error or reads.last_error
            skipped = [decodes.samples, reads.shards]
            return {"slot": slot, "skipped": skipped, "opened": reads.opened, "last_error": last, **extra}

        try:
            shards = eval_shards(len(self.urls), self.rank, self.world_size, worker, num_workers)
            samples = enumerate(sample for i in shards for sample in read_shard(self.urls[i], reads))
            for batch, _ in _batches(samples, self.transform, self.batch_size, decodes, self.max_failures, None, False):
                batch["__meta__"] = meta()
                yield batch
        except DataError as error:
            yield {"__meta__": {"error": f"validation: {error}"}}
            return
        # A last, image-less item reports skips that came after the last batch (or with no batch).
        yield {"__meta__": meta(end=True)}
