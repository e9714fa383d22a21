"""Sources published as webdataset shards (BLIP3o-Pretrain, its JourneyDB part, BLIP3o-60k): verified and
indexed where they lie, never copied (BLIP3o-Pretrain alone is terabytes).

Each downloaded `.tar` is read through once by a worker: every sample must hold an image the loader reads
(`jpg`, `jpeg`, `png` or `webp`) that decodes completely; its caption is `txt`. The authors' training code
reads exactly these two members (nnnth/UniLIP `unilip/train/train_stage2.py`: `rename_column("jpg", ...)`,
`rename_column("txt", ...)`). The out folder then gets a symbolic link to each shard that reads to its
end, under the shard's file name, and `index.json` with each shard's count of good samples, so that the
data presets (`${paths.data_dir}/blip3o/short_caption/*.tar`, ...) find them by the same glob as shards
that `prepare` wrote. Links are absolute: move the download and run `prepare` again into a new folder.

A sample with no image or an image that does not decode is named in the report; it stays in the shard
(copying the shard to drop it would cost what in place saves), and the loader skips it at training time
as it skips any undecodable sample. A shard that breaks off (a truncated download) is not linked and is
named: download it again and run the same command, which links it and leaves the rest as it was.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from unilip.data.prepare.runner import temporary
from unilip.data.shards import SkipCounter, read_shard
from unilip.data.transforms import IMAGE_EXTS
from unilip.errors import ConfigError


def find_shards(download: Path, dataset: str) -> list[Path]:
    """Every `.tar` under `download` (sorted); a folder without any, or whose first sample is not an
    image-caption pair, is not this dataset's download."""
    shards = sorted(p for p in download.rglob("*.tar") if p.is_file())
    if not shards:
        raise ConfigError(f"{download} holds no .tar shards; is it the {dataset} download (a folder of *.tar)?")
    first = _first_sample(shards[0])
    if first is not None and not (any(ext in first for ext in IMAGE_EXTS) and "txt" in first):
        members = ", ".join(sorted(k for k in first if not k.startswith("__")))
        raise ConfigError(
            f"{shards[0]}: its samples hold {members}; a {dataset} shard holds an image (jpg) and its caption "
            f"(txt): is {download} the {dataset} download?"
        )
    return shards


def _first_sample(path: Path) -> dict | None:
    counter = SkipCounter(verbose=False)
    return next(iter(read_shard(str(path), counter)), None)


def link_name(shard: Path, download: Path) -> str:
    """The link's file name: the shard's path under the download, flattened (`part1/000.tar` -> `part1-000.tar`)."""
    return "-".join(shard.relative_to(download).parts)


@dataclass
class VerifyShard:
    """Job: check every sample of `source`, then link it as `out_dir/name` if it reads to its end."""

    name: str
    source: Path
    out_dir: Path

    @property
    def size(self) -> int:
        return 1

    def run(self, commit: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
        counter = SkipCounter(verbose=False)
        good, skipped = 0, []
        for sample in read_shard(str(self.source), counter):
            problem = _problem(sample)
            if problem:
                skipped.append(f"{self.source}:{sample['__key__']}: {problem}")
            else:
                good += 1
        if counter.shards:  # the tar broke off: its complete samples are not worth a shard that fails
            good, skipped = 0, [f"{counter.last_error} (not linked)"]
        result = {"shard": self.name, "samples": good, "skipped": skipped}
        if not good:
            commit(result)
            return result
        link = self.out_dir / self.name
        link.parent.mkdir(parents=True, exist_ok=True)
        partial = temporary(link)
        os.symlink(self.source.resolve(), partial)
        commit(result)  # the books first: a link under its name is always a recorded one
        os.replace(partial, link)
        return result


def _problem(sample: dict) -> str:
    """Why the loader could not use this sample, or "" if it can."""
    ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if ext is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        return f"no image member (has {members})"
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.load()
    except UnidentifiedImageError:
        return f"{ext} does not decode (not an image PIL can read: unknown format or corrupt header)"
    except Exception as error:  # any undecodable image is named, never fatal
        return f"{ext} does not decode ({type(error).__name__}: {error})"
    return ""
