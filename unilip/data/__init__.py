"""Data: webdataset shards in, clean batches out, on any number of ranks and workers.

`ShardDataModule` is what the configs in `conf/data/` build; `build_photo_shards` writes the
bundled photo set; `write_shards` (CLI: `unilip-make-shards`) turns folders and JSONL into shards.
Cached generation targets are read here (`latent_cache.py`); the generation task writes them.

May import the foundation (`unilip.errors`, `unilip.logs`) only: no networks, weights, training or tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unilip.data.loaders import EvalLoader, TrainLoader
from unilip.data.samples import PHOTOS, build_photo_shards
from unilip.data.shards import DataError, ShardSink, expand_urls
from unilip.data.streams import TrainSource
from unilip.data.transforms import SampleTransform, collate

if TYPE_CHECKING:
    from unilip.data.datamodule import ShardDataModule
    from unilip.data.make_shards import write_shards


def __getattr__(name: str) -> Any:
    # Imported on first use: ShardDataModule needs Lightning (seconds to import), and a module run
    # as `python -m unilip.data.make_shards` must not be imported already by its package.
    if name == "ShardDataModule":
        from unilip.data.datamodule import ShardDataModule

        return ShardDataModule
    if name == "write_shards":
        from unilip.data.make_shards import write_shards

        return write_shards
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PHOTOS",
    "DataError",
    "EvalLoader",
    "SampleTransform",
    "ShardDataModule",
    "ShardSink",
    "TrainLoader",
    "TrainSource",
    "build_photo_shards",
    "collate",
    "expand_urls",
    "write_shards",
]
