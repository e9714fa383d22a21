"""rFID's reference statistics, computed once per reference set and reused.

The reference side of rFID (Inception-V3 pool features of the center-cropped evaluation images: their sum,
the sum of their outer products and their count, as torchmetrics accumulates them) depends only on the
images, the crop size and the Inception weights. The first evaluation stores it in `cache_dir` under a key
made of exactly those (every shard's path, size and modification time, the image size, the weights'
SHA-256); a later evaluation of the same set loads it and feeds only the reconstructions through Inception.
The value is the same as without the cache (the statistics are the same numbers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def weights_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def reference_key(urls: list[str], image_size: int, inception_sha256: str, quantize: str = "trunc") -> str:
    """A digest of what the reference statistics depend on (local shards by path, size and mtime; under
    `quantize=reference` the inputs' own 8-bit conversion, `unilip.evaluation.quantize`)."""
    shards = []
    for url in urls:
        path = Path(url)
        stat = path.stat() if path.is_file() else None
        shards.append(
            [str(path.resolve()) if stat else url, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
        )
    material = {"shards": shards, "image_size": image_size, "crop": "center", "inception_sha256": inception_sha256}
    if quantize == "reference":  # trunc and round feed the inputs' own levels: the key (and the caches) they share
        material["real_levels"] = "reference"
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


class ReferenceStatistics:
    """The cached reference statistics of one evaluation set, in `cache_dir/fid_reference_<key>.safetensors`.

    Args:
        cache_dir: where the statistics live.
        urls: the evaluation shards (list, glob or brace pattern), expanded when first needed (after the
            data module has prepared them).
        image_size: the evaluation crop size.
        inception_weights: the Inception weights file rFID uses.
        quantize: the evaluation's `quantize` (`reference` changes the inputs' 8-bit images).
    """

    def __init__(
        self, cache_dir: str | Path, urls: Any, image_size: int, inception_weights: str | Path, quantize: str = "trunc"
    ):
        self.cache_dir, self.urls, self.image_size, self.quantize = Path(cache_dir), urls, image_size, quantize
        self.inception_weights = Path(inception_weights)
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            from unilip.data.shards import expand_urls

            urls = expand_urls(self.urls, "data.val_urls")
            key = reference_key(urls, self.image_size, weights_digest(self.inception_weights), self.quantize)
            self._path = self.cache_dir / f"fid_reference_{key}.safetensors"
        return self._path

    def load_into(self, fid: nn.Module, rank: int = 0) -> bool:
        """Put the cached statistics into `fid` (on rank 0 only: torchmetrics sums the states over ranks).
        Returns whether they were found: then the reference images need not be fed."""
        if not self.path.exists():
            return False
        if rank == 0:
            tensors = load_file(str(self.path))
            for name in REAL_STATES:
                state = getattr(fid, name)
                setattr(fid, name, tensors[name].to(device=state.device, dtype=state.dtype))
        log.info("rFID reference statistics read from %s", self.path)
        return True

    def count(self) -> int:
        return int(load_file(str(self.path))["real_features_num_samples"])

    def save_from(self, fid: nn.Module, rank: int = 0) -> None:
        """Store `fid`'s reference statistics, reduced over all ranks (call on every rank)."""
        with fid.sync_context(should_sync=True, should_unsync=True):
            tensors = {name: getattr(fid, name).detach().cpu().contiguous() for name in REAL_STATES}
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(".tmp-" + self.path.name)
        description = {"urls": str(self.urls), "image_size": self.image_size, "inception": str(self.inception_weights)}
        save_file(tensors, str(temporary), metadata={"description": json.dumps(description)})
        os.replace(temporary, self.path)
        log.info("rFID reference statistics of %d images saved to %s", int(tensors[REAL_STATES[2]]), self.path)
