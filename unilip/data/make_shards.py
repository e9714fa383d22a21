"""Make webdataset shards from an image folder, a class-folder tree or a JSONL file.

    unilip-make-shards INPUT OUT_DIR [--format folder|classes|jsonl] [--prefix shard]
                       [--samples-per-shard 1000] [--max-bytes 1e9] [--max-size 1024] [--workers 0]

- folder:  every image under INPUT (recursively); caption from a sidecar `<name>.txt` if present.
  Other files are ignored (and counted in the report).
- classes: ImageNet layout INPUT/<class name>/<image>; writes `cls` (class index, classes sorted
  by name) and `json` {"label": index, "class_name": name}.
- jsonl:   one record per line, paths relative to the JSONL file: {"image", "caption"} for
  image-caption samples, {"source", "instruction", "target"} for editing samples.

Output: OUT_DIR/<prefix>-000000.tar, ... in the layout `unilip.data.transforms` reads
(`jpg`/`png`/`webp` + `txt`; `source.<ext>`, `target.<ext>`, `instruction.txt`). Every image is
decoded once to verify it; the bad ones are skipped and reported by file name. Encoded bytes are kept
as they are (no re-encoding, no quality loss) unless the image is larger than `--max-size` or in a
format the loader does not read (BMP, GIF, TIFF, ...). Those are converted as the loader would
(upright, 8-bit RGB: `unilip.data.transforms.as_rgb`), downscaled so that the shorter side is at most
`--max-size` (default 1024: above every training and evaluation size, 224 to 512 px, while a large
photo no longer costs a full-size decode on every read; 0 keeps every size), and stored as JPEG
(quality 95) if they were JPEG, else PNG.

OUT_DIR must not already hold `<prefix>-*.tar` shards (a second run would mix with the first).
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

from PIL import Image, UnidentifiedImageError

from unilip.data.shards import ShardSink
from unilip.data.transforms import as_rgb
from unilip.errors import ConfigError, UnreadableFileError
from unilip.logs import one_line_errors

log = logging.getLogger(__name__)

READABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_MAX_SIZE = 1024  # shorter side, px; see the module docstring


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
    resized: int = 0


def encode_image(path: Path, max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[str, bytes, bool]:
    """Return (extension, bytes, converted) of a verified image; raise if it does not decode.

    The original bytes are kept when the loader can read the format and the shorter side is at most
    `max_size` (None or 0: any size); otherwise the image is converted (see the module docstring).
    """
    data = path.read_bytes()
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


def _encode(args: tuple[Record, int | None]) -> tuple[dict, int] | str:
    """Record -> (webdataset sample dict, images converted), or an error line naming the bad file."""
    record, max_size = args
    sample: dict = {"__key__": record.key}
    converted = 0
    for prefix, path in record.images.items():
        try:
            ext, data, was_converted = encode_image(path, max_size)
        except FileNotFoundError:
            return f"{path}: no such file"
        except Exception as error:  # a bad image is reported and skipped, never fatal
            return f"{path}: {type(error).__name__}: {error}"
        sample[prefix + ext] = data
        converted += was_converted
    sample.update({ext: text.encode("utf-8") for ext, text in record.texts.items()})
    return sample, converted


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


def ignored_files(root: Path) -> dict[str, int]:
    """Files under a folder input that are neither images nor the caption sidecar of one, per suffix."""
    images = _images_under(root)
    captions = {path.with_suffix(".txt") for path in images}
    counts: dict[str, int] = {}
    for path in root.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if path.is_file() and not hidden and path not in captions and path.suffix.lower() not in IMAGE_SUFFIXES:
            suffix = path.suffix.lower() or "(no suffix)"
            counts[suffix] = counts.get(suffix, 0) + 1
    return counts


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
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UnreadableFileError(f"{path}: not a UTF-8 text file ({error})") from None
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}, line {number + 1}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnreadableFileError(f"{where}: not valid JSON ({error})") from None
        key = f"{number:08d}"
        if not isinstance(item, dict) or not ({"image"} <= item.keys() or {"source", "target"} <= item.keys()):
            raise ConfigError(
                f'{where}: expected {{"image": path, "caption": text}} or '
                f'{{"source": path, "instruction": text, "target": path}}, got {line.strip()[:120]}'
            )
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
    max_size: int | None = DEFAULT_MAX_SIZE,
    workers: int = 0,
) -> ShardReport:
    """Verify, encode and write `records` in order; return what was written and what was bad.

    `max_size`: images whose shorter side is larger are downscaled to it (None or 0: keep every size).
    """
    from tqdm import tqdm

    _check_output_folder(Path(out_dir))
    existing = sorted(Path(out_dir).glob(f"{prefix}-*.tar"))
    if existing:
        raise ConfigError(
            f"{out_dir} already holds {len(existing)} {prefix}-*.tar shards; a new set would mix with them: "
            "choose an empty directory or another --prefix"
        )
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
                sample, converted = result
                sink.write(sample)
                report.written += 1
                report.resized += converted
        finally:
            if pool:
                pool.terminate()
        report.shards = list(sink.shards)
    return report


def _check_output_folder(out_dir: Path) -> None:
    """Refuse, before anything is read or written, an output path that is (or lies under) an existing file."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out_dir else f"lies under {path}, which is"
                raise ConfigError(f"out_dir {out_dir} {where} a file, not a folder; give a new or empty folder")
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="image folder, class-folder tree, or .jsonl file")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--format", choices=["folder", "classes", "jsonl"], help="default: guessed from INPUT")
    parser.add_argument("--prefix", default="shard", help="shard file names: <prefix>-000000.tar (default: shard)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-bytes", type=float, default=1e9, help="start a new shard past this size")
    parser.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        help=f"downscale images whose shorter side exceeds this many pixels (default {DEFAULT_MAX_SIZE}; 0: never)",
    )
    parser.add_argument("--workers", type=int, default=0, help="processes that verify/encode images (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_errors():
        report = make_shards(args)
    log.info(
        "%d samples in %d shards under %s; %d images downscaled or converted; %d bad images skipped",
        *(report.written, len(report.shards), args.out_dir, report.resized, len(report.bad)),
    )
    return 0


def make_shards(args: argparse.Namespace) -> ShardReport:
    """What the command line asks for; a user error (a wrong path, nothing readable) raises with the fix."""
    if args.samples_per_shard < 1 or args.max_size < 0:
        raise ConfigError("--samples-per-shard must be >= 1 and --max-size >= 0")
    fmt = args.format or _guess_format(args.input)
    if fmt == "jsonl" and not args.input.is_file():
        raise FileNotFoundError(f"{args.input}: no such JSONL file")
    if fmt != "jsonl" and not args.input.is_dir():
        raise FileNotFoundError(f"{args.input}: no such directory (--format {fmt} reads a folder)")
    reader = {"folder": folder_records, "classes": class_records, "jsonl": jsonl_records}[fmt]
    records = reader(args.input)
    ignored = ignored_files(args.input) if fmt != "jsonl" else {}
    if ignored:
        listing = ", ".join(f"{count} {suffix}" for suffix, count in sorted(ignored.items()))
        log.info("ignored %d files that are not images (%s)", sum(ignored.values()), listing)
    if not records:
        raise ConfigError(f"{args.input}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    report = write_shards(
        records, args.out_dir, args.prefix, args.samples_per_shard, args.max_bytes, args.max_size, args.workers
    )
    if not report.written:
        raise UnreadableFileError(
            f"none of the {len(records)} samples could be read (first: {report.bad[0]}); no shard was written"
        )
    return report


def _guess_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory or a .jsonl file")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return "classes" if entries and all(p.is_dir() for p in entries) else "folder"


if __name__ == "__main__":
    raise SystemExit(main())
