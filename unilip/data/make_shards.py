"""Make webdataset shards from an image folder, a class-folder tree or a JSONL file.

    unilip-make-shards INPUT OUT_DIR [--format folder|classes|jsonl] [--prefix train]
                       [--samples-per-shard 1000] [--max-bytes 1e9] [--max-size 1024] [--workers 4]

- folder:  every image under INPUT (recursively); caption from a sidecar `<name>.txt` if present.
- classes: ImageNet layout INPUT/<class name>/<image>; writes `cls` (class index, classes sorted
  by name) and `json` {"label": index, "class_name": name}.
- jsonl:   one record per line, paths relative to the JSONL file: {"image", "caption"} for
  image-caption samples, {"source", "instruction", "target"} for editing samples.

Output: OUT_DIR/<prefix>-000000.tar, ... in the layout `unilip.data.transforms` reads
(`jpg`/`png`/`webp` + `txt`; `source.<ext>`, `target.<ext>`, `instruction.txt`). Every image is
decoded once to verify it; the bad ones are skipped and reported. Encoded bytes are kept as they
are (no re-encoding, no quality loss) unless `--max-size` asks for a resize or the format is not
one the loader reads (then PNG).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

from unilip.data.shards import ShardSink

log = logging.getLogger(__name__)

READABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Record:
    """One sample to write: `images` maps an extension prefix ("" or "source."/"target.") to a file."""

    key: str
    images: dict[str, Path]
    texts: dict[str, str] = field(default_factory=dict)


@dataclass
class ShardReport:
    written: int = 0
    bad: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def encode_image(path: Path, max_size: int | None) -> tuple[str, bytes]:
    """Return (extension, bytes) of a verified image; raise if it does not decode.

    The original bytes are kept when the loader can read the format and no resize is needed.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: `verify()` misses truncated image data
        ext = READABLE.get(image.format or "")
        too_big = max_size is not None and max(image.size) > max_size
        if ext is not None and not too_big:
            return ext, data
        if too_big:
            image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if ext == "jpg":
            image.convert("RGB").save(out, "JPEG", quality=95)
            return "jpg", out.getvalue()
        image.save(out, "PNG")
        return "png", out.getvalue()


def _encode(args: tuple[Record, int | None]) -> dict | str:
    """Record -> webdataset sample dict, or an error line naming the bad file."""
    record, max_size = args
    sample: dict = {"__key__": record.key}
    for prefix, path in record.images.items():
        try:
            ext, data = encode_image(path, max_size)
        except Exception as error:  # a bad image is reported and skipped, never fatal
            return f"{path}: {type(error).__name__}: {error}"
        sample[prefix + ext] = data
    sample.update({ext: text.encode("utf-8") for ext, text in record.texts.items()})
    return sample


def _keys(paths: Iterable[Path], root: Path) -> Iterator[tuple[str, Path]]:
    """Readable, unique webdataset keys from relative paths (no dots: they would split the key)."""
    seen: set[str] = set()
    for path in paths:
        key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(path.relative_to(root).with_suffix("")))
        base, n = key, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        yield key, path


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_records(root: Path) -> list[Record]:
    records = []
    for key, path in _keys(_images_under(root), root):
        caption = path.with_suffix(".txt")
        texts = {"txt": caption.read_text(encoding="utf-8").strip()} if caption.exists() else {}
        records.append(Record(key, {"": path}, texts))
    return records


def class_records(root: Path) -> list[Record]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    records = []
    for key, path in _keys(_images_under(root), root):
        name = path.relative_to(root).parts[0]
        label = classes.index(name)
        records.append(
            Record(key, {"": path}, {"cls": str(label), "json": json.dumps({"label": label, "class_name": name})})
        )
    return records


def jsonl_records(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        item = json.loads(line)
        key = f"{number:08d}"
        if "target" in item:
            images = {"source.": path.parent / item["source"], "target.": path.parent / item["target"]}
            records.append(Record(key, images, {"instruction.txt": item.get("instruction", "")}))
        else:
            texts = {"txt": item["caption"]} if item.get("caption") else {}
            records.append(Record(key, {"": path.parent / item["image"]}, texts))
    return records


def write_shards(
    records: list[Record],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_bytes: float = 1e9,
    max_size: int | None = None,
    workers: int = 0,
) -> ShardReport:
    """Verify, encode and write `records` in order; return what was written and what was bad."""
    from tqdm import tqdm

    report = ShardReport()
    jobs = ((record, max_size) for record in records)
    with ShardSink(out_dir, prefix, samples_per_shard, max_bytes) as sink:
        pool = Pool(workers) if workers > 0 else None
        try:
            results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
            for result in tqdm(results, total=len(records), desc=f"shards {prefix}", unit="sample"):
                if isinstance(result, str):
                    log.warning("skipped bad image %s", result)
                    report.bad.append(result)
                    continue
                sink.write(result)
                report.written += 1
        finally:
            if pool:
                pool.terminate()
        report.shards = list(sink.shards)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="image folder, class-folder tree, or .jsonl file")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--format", choices=["folder", "classes", "jsonl"], help="default: guessed from INPUT")
    parser.add_argument("--prefix", default="shard", help="shard file names: <prefix>-000000.tar")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-bytes", type=float, default=1e9, help="start a new shard past this size")
    parser.add_argument("--max-size", type=int, help="downscale images whose longer side exceeds this")
    parser.add_argument("--workers", type=int, default=0, help="processes that verify/encode images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fmt = args.format or _guess_format(args.input)
    reader = {"folder": folder_records, "classes": class_records, "jsonl": jsonl_records}[fmt]
    records = reader(args.input)
    report = write_shards(
        records, args.out_dir, args.prefix, args.samples_per_shard, args.max_bytes, args.max_size, args.workers
    )
    log.info(
        "%d samples in %d shards under %s; %d bad images skipped",
        *(report.written, len(report.shards), args.out_dir, len(report.bad)),
    )
    return 0


def _guess_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if not path.is_dir():
        raise SystemExit(f"{path}: not a directory or a .jsonl file")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return "classes" if entries and all(p.is_dir() for p in entries) else "folder"


if __name__ == "__main__":
    raise SystemExit(main())
