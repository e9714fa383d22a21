"""What a run on many ranks reads, simulated in one process before it is launched.

    python -m unilip.data.simulate --ranks 64 --workers 8 --val-urls 'imagenet/val-{000000..000049}.tar'
    python -m unilip.data.simulate --ranks 64 --workers 8 --synthetic 1000   # made-up shards

Runs the real stream code (`unilip.data.streams`) for every rank and worker in turn, without
decoding images, and reports:

- evaluation: shard reads in total (one per shard is the minimum), samples seen (each exactly
  once is required), and the fewest / most samples a rank gets (the slowest rank sets the pace);
- training: whether every (rank, worker) stream is a different sequence of samples.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unilip.data.shards import ShardSink, expand_urls
from unilip.data.streams import EvalStream, TrainSource, TrainStream
from unilip.logs import cli_logging

log = logging.getLogger(__name__)


class _KeysOnly:
    """A stand-in for `SampleTransform` that does not decode: a 1x1 image, the key kept."""

    with_source = False
    _pixel = np.zeros((1, 1, 3), dtype=np.uint8)

    def __call__(self, raw: dict, rng: Any) -> dict:
        return {"image": self._pixel, "caption": "", "key": raw["__key__"]}


def simulate_evaluation(urls: Sequence[str], world_size: int, num_workers: int) -> dict[str, Any]:
    """One evaluation pass over `urls` by `world_size` ranks x `num_workers` workers each."""
    seen: Counter[str] = Counter()
    per_rank, reads = [], 0
    for rank in range(world_size):
        stream = EvalStream(urls, _KeysOnly(), 256, rank, world_size, max_consecutive_failures=100)
        count = 0
        for worker in range(num_workers):
            for item in stream.iterate(worker, num_workers):
                meta = item.pop("__meta__")
                if meta.get("end"):
                    reads += meta["opened"]
                    continue
                seen.update(item["key"])
                count += len(item["key"])
        per_rank.append(count)
    return {
        "ranks x workers": f"{world_size} x {num_workers}",
        "shards": len(urls),
        "shard reads": reads,
        "samples seen": sum(seen.values()),
        "distinct samples": len(seen),
        "samples seen twice or more": sum(1 for n in seen.values() if n > 1),
        "fewest / most samples on a rank": f"{min(per_rank)} / {max(per_rank)}",
        "ranks with no sample": sum(1 for n in per_rank if n == 0),
    }


def simulate_training(
    sources: Sequence[TrainSource], world_size: int, num_workers: int, samples: int = 32, seed: int = 0
) -> dict[str, Any]:
    """The first `samples` training samples of every (rank, worker) stream of epoch 0."""
    streams = []
    for rank in range(world_size):
        for worker in range(num_workers):
            stream = TrainStream(
                sources, _KeysOnly(), 1, seed, 0, rank, num_workers, 0, [0] * num_workers, 100, 100
            ).iterate(worker, num_workers)
            streams.append(tuple(next(stream)["key"][0] for _ in range(samples)))
    first = Counter(keys[0] for keys in streams)
    return {
        "ranks x workers": f"{world_size} x {num_workers}",
        "streams": len(streams),
        "distinct streams": len(set(streams)),
        "samples compared per stream": samples,
        "streams starting with the most common first sample": max(first.values()),
    }


def synthetic_shards(root: Path, count: int, samples_per_shard: int) -> list[str]:
    """`count` tiny shards of `samples_per_shard` samples each (keys `s<shard>_<i>`), for simulations."""
    urls = []
    for shard in range(count):
        with ShardSink(root, f"syn{shard:05d}", samples_per_shard=samples_per_shard) as sink:
            for i in range(samples_per_shard):
                sink.write({"__key__": f"s{shard:05d}_{i:03d}", "txt": b"x"})
        urls += sink.shards
    return urls


def _table(title: str, rows: dict[str, Any]) -> str:
    lines = [f"{title}", *(f"  {name:<52} {value}" for name, value in rows.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=64, help="processes (GPUs) in the run")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    parser.add_argument("--val-urls", help="evaluation shards (list, glob or brace pattern)")
    parser.add_argument("--train-urls", help="training shards of one source")
    parser.add_argument("--synthetic", type=int, help="simulate on this many made-up shards instead")
    parser.add_argument("--samples-per-shard", type=int, default=4, help="samples per made-up shard")
    args = parser.parse_args(argv)
    cli_logging(fmt="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            urls = synthetic_shards(Path(tmp), args.synthetic, args.samples_per_shard)
            val_urls = train_urls = urls
        else:
            val_urls = expand_urls(args.val_urls, "--val-urls") if args.val_urls else None
            train_urls = expand_urls(args.train_urls, "--train-urls") if args.train_urls else None
        if val_urls:
            log.info(_table("evaluation pass", simulate_evaluation(val_urls, args.ranks, args.workers)))
        if train_urls:
            sources = [TrainSource("train", tuple(train_urls), 1.0)]
            log.info(_table("training streams", simulate_training(sources, args.ranks, args.workers)))


if __name__ == "__main__":
    main()
