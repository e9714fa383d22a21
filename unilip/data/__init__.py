"""Data: webdataset shards in, clean batches out, on any number of ranks and workers.

`ShardDataModule` is what the configs in `conf/data/` build; `build_photo_shards` writes the
bundled photo set; `make_shards` (also `unilip-make-shards`) turns folders and JSONL into shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unilip.data.loaders import EvalLoader, TrainLoader
from unilip.data.make_shards import make_shards
from unilip.data.samples import PHOTOS, build_photo_shards
from unilip.data.shards import DataError, expand_urls
from unilip.data.streams import TrainSource
from unilip.data.transforms import SampleTransform, collate

if TYPE_CHECKING:
    from unilip.data.datamodule import ShardDataModule


def __getattr__(name: str) -> Any:
    # ShardDataModule needs Lightning (seconds to import); the loaders and the shard tools do not.
    if name == "ShardDataModule":
        from unilip.data.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PHOTOS",
    "DataError",
    "EvalLoader",
    "SampleTransform",
    "ShardDataModule",
    "TrainLoader",
    "TrainSource",
    "build_photo_shards",
    "collate",
    "expand_urls",
    "make_shards",
]
