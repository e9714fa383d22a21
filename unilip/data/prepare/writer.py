"""One shard writer for every tool that turns images into shards (`unilip-make-shards`, `prepare`).

A `Record` is one sample to write: its images (files, members of an uncompressed tar, or bytes read
from a stream) under their extension prefix ("" for an image-caption sample, "source."/"target." for
an edit) and its texts. Records are cut into shards of `samples_per_shard` consecutive records; shard
i is `<prefix>-%06d.tar`, so the same records give the same shards whatever the number of processes,
and a run that was killed can redo only the shards it had not finished (`unilip.data.prepare.runner`).

Each shard is written by one process under a temporary name beside its target and renamed when
complete (`os.replace`, atomic): no reader, and no restarted run, ever sees half a shard. Every image
is decoded once to verify it; a record with an image that does not decode (or a file that is missing)
is skipped and named, never fatal. Encoded bytes are kept as they are unless the image is larger than
`max_size` or in a format the loader does not read; see `encode_image`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from unilip.data.prepare.runner import check_output, finish, run_jobs, temporary
from unilip.data.transforms import as_rgb
from unilip.errors import UnreadableFileError

READABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_MAX_SIZE = 1024  # shorter side, px: above every training and evaluation size (224 to 512 px)


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar archive, read by seeking to its data (no extraction needed)."""

    archive: str
    offset: int  # of the member's data (tarfile's `offset_data`)
    size: int
    name: str  # the member's name, for messages

    def read(self) -> bytes:
        with open(self.archive, "rb") as file:
            file.seek(self.offset)
            data = file.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self.archive} breaks off inside {self.name} (a truncated download?)")
        return data

    def __str__(self) -> str:
        return f"{self.archive}:{self.name}"


@dataclass(frozen=True)
class Inline:
    """Image bytes already read (from a compressed archive that can only be read in order)."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name


ImageRef = Path | TarMember | Inline


@dataclass
class Record:
    """One sample to write. `images` maps an extension prefix ("", "source.", "target.") to its image;
    `texts` maps a full extension ("txt", "instruction.txt", "cls", "json") to its text."""

    key: str
    images: dict[str, ImageRef]
    texts: dict[str, str] = field(default_factory=dict)


@dataclass
class Conversion:
    """What a converted dataset's `plan` found in its download: its records (a fresh iterator per call, the
    same every time: a resumed run must cut the same shards), how many, and the items the authors'
    selection leaves out, as (item, reason)."""

    records: Callable[[], Iterator[Record]]
    total: int
    not_selected: list[tuple[str, str]] = field(default_factory=list)


def load_json_list(path: Path) -> list:
    """A dataset's annotation file: a JSON list of records (anything else is one clear error)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFileError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(items, list):
        raise UnreadableFileError(f"{path}: expected a JSON list of records, got a {type(items).__name__}")
    return items


def read_image(ref: ImageRef) -> bytes:
    if isinstance(ref, Inline):
        return ref.data
    if isinstance(ref, TarMember):
        return ref.read()
    return ref.read_bytes()


def encode_image(data: bytes, max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[str, bytes, bool]:
    """Return (extension, bytes, converted) of verified image bytes; raise if they do not decode.

    The original bytes are kept when the loader can read the format (JPEG, PNG, WebP) and the shorter
    side is at most `max_size` (None or 0: any size). Otherwise the image is converted as the loader
    would (upright, 8-bit RGB: `unilip.data.transforms.as_rgb`), downscaled so that its shorter side is
    `max_size` (a large photo then no longer costs a full-size decode on every read), and stored as JPEG
    (quality 95) if it was JPEG, else PNG.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (unknown format or corrupt header)") from None
    with image:
        image.load()  # a full decode: `verify()` misses truncated image data
        ext = READABLE.get(image.format or "")
        too_big = bool(max_size) and min(image.size) > max_size
        if ext is not None and not too_big:
            return ext, data, False
        rgb = as_rgb(image)
    if too_big:
        scale = max_size / min(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if ext == "jpg":
        rgb.save(out, "JPEG", quality=95)
        return "jpg", out.getvalue(), True
    rgb.save(out, "PNG")
    return "png", out.getvalue(), True


def encode_record(record: Record, max_size: int | None) -> tuple[dict, int] | str:
    """Record -> (webdataset sample dict, images converted), or one line naming the bad image and why."""
    sample: dict[str, Any] = {"__key__": record.key}
    converted = 0
    for prefix, ref in record.images.items():
        try:
            ext, data, was_converted = encode_image(read_image(ref), max_size)
        except FileNotFoundError:
            return f"{ref}: no such file"
        except Exception as error:  # a bad image is reported and skipped, never fatal
            return f"{ref}: {type(error).__name__}: {error}"
        sample[prefix + ext] = data
        converted += was_converted
    sample.update({ext: text.encode("utf-8") for ext, text in record.texts.items()})
    return sample, converted


@dataclass
class WriteShard:
    """Job: verify and encode `records`, write them as `out_dir/name` (nothing if none is readable)."""

    name: str
    records: list[Record]
    out_dir: Path
    max_size: int | None = DEFAULT_MAX_SIZE

    @property
    def size(self) -> int:
        return len(self.records)

    def run(self, commit: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
        samples, skipped, converted = [], [], 0
        for record in self.records:
            result = encode_record(record, self.max_size)
            if isinstance(result, str):
                skipped.append(result)
                continue
            samples.append(result[0])
            converted += result[1]
        result = {"shard": self.name, "samples": len(samples), "skipped": skipped, "converted": converted}
        if not samples:
            commit(result)
            return result
        target = self.out_dir / self.name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = temporary(target)
        try:
            with open(partial, "wb") as file:
                writer = wds.TarWriter(file, encoder=False, mtime=0)  # mtime=0: same input, same bytes
                for sample in samples:
                    writer.write(sample)
                writer.close()
                file.flush()
                os.fsync(file.fileno())
        except BaseException:  # a full disk, an interrupt: no partial file stays behind
            partial.unlink(missing_ok=True)
            raise
        commit(result)  # the books first: a shard under its name is always a recorded one
        os.replace(partial, target)
        return result


def shard_jobs(
    records: Iterable[Record], out_dir: Path, prefix: str, samples_per_shard: int, max_size: int | None
) -> Iterator[WriteShard]:
    """Consecutive `samples_per_shard` records per job; job i writes `<prefix>-%06d.tar`."""
    chunk: list[Record] = []
    index = 0
    for record in records:
        chunk.append(record)
        if len(chunk) == samples_per_shard:
            yield WriteShard(f"{prefix}-{index:06d}.tar", chunk, out_dir, max_size)
            chunk, index = [], index + 1
    if chunk:
        yield WriteShard(f"{prefix}-{index:06d}.tar", chunk, out_dir, max_size)


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_size: int | None = DEFAULT_MAX_SIZE,
    workers: int = 0,
    identity: dict[str, Any] | None = None,
    total: int | None = None,
    desc: str = "",
    exclusive: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify, encode and write `records` as shards; return the report (`unilip.data.prepare.runner.finish`).

    With `identity` (what produced the records: tool, input, options) the run is resumable: run again with
    the same identity on the same folder, it redoes only unfinished shards. Without one, a folder that
    already holds `<prefix>-*.tar` shards is refused. `exclusive`: refuse any non-empty folder not written
    by a run of this identity.
    """
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    run = check_output(out_dir, prefix, identity, exclusive)
    jobs = shard_jobs(records, out_dir, prefix, samples_per_shard, max_size)
    run_jobs(jobs, run, workers, total=total, unit="sample", desc=desc or f"shards {prefix}")
    return finish(run, extra)
