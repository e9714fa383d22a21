"""Make webdataset shards from an image folder, a class-folder tree or a JSONL file.

    unilip-make-shards INPUT OUT_DIR [--format folder|classes|jsonl] [--prefix shard]
                       [--samples-per-shard 1000] [--max-size 1024] [--workers 0]

- folder:  every image under INPUT (recursively); caption from a sidecar `<name>.txt` if present.
  Other files are ignored (and counted in the report).
- classes: ImageNet layout INPUT/<class name>/<image>; writes `cls` (class index, classes sorted
  by name) and `json` {"label": index, "class_name": name}.
- jsonl:   one record per line, paths relative to the JSONL file: {"image", "caption"} for
  image-caption samples, {"source", "instruction", "target"} for editing samples.

Output: OUT_DIR/<prefix>-000000.tar, ... (`--samples-per-shard` inputs each) in the layout
`unilip.data.transforms` reads (`jpg`/`png`/`webp` + `txt`; `source.<ext>`, `target.<ext>`,
`instruction.txt`), their sample counts in OUT_DIR/index.json and what was skipped, by file name, in
OUT_DIR/<prefix>-report.json. The writer is the one `python -m unilip.data.prepare` uses
(`unilip.data.prepare.writer`): every image decoded once to verify it, bytes kept unless an image is
larger than `--max-size` (default 1024; 0 keeps every size) or in a format the loader does not read
(BMP, GIF, TIFF, ...), shards written by `--workers` processes under a temporary name and renamed
when complete. A run that was killed, started again with the same arguments, redoes only the shards
it had not finished; OUT_DIR must not hold other `<prefix>-*.tar` shards (they would mix).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unilip.data.prepare import writer
from unilip.data.prepare.writer import DEFAULT_MAX_SIZE, Record
from unilip.errors import ConfigError, UnreadableFileError
from unilip.logs import cli_logging, one_line_errors

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
__all__ = ["Record", "ShardReport", "class_records", "folder_records", "jsonl_records", "main", "write_shards"]


@dataclass
class ShardReport:
    written: int = 0
    bad: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    resized: int = 0


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
    records: Iterable[Record],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_size: int | None = DEFAULT_MAX_SIZE,
    workers: int = 0,
    identity: dict | None = None,
) -> ShardReport:
    """Verify, encode and write `records` in order (`unilip.data.prepare.writer.write_shards`); return what
    was written and what was bad. `max_size`: images whose shorter side is larger are downscaled to it
    (None or 0: keep every size). `identity` (the input and options) makes the run resumable."""
    _check_output_folder(Path(out_dir))
    report = writer.write_shards(
        records, out_dir, prefix, samples_per_shard, max_size, workers, identity, desc=f"shards {prefix}"
    )
    shards = [str(Path(out_dir) / name) for name in report["shards"]]
    for line in report["skipped"]:
        log.warning("skipped bad image %s", line)
    return ShardReport(report["samples"], report["skipped"], shards, report["converted"])


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
    parser.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        help=f"downscale images whose shorter side exceeds this many pixels (default {DEFAULT_MAX_SIZE}; 0: never)",
    )
    parser.add_argument("--workers", type=int, default=0, help="processes that verify/encode images (default 0)")
    args = parser.parse_args(argv)
    cli_logging()
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
    identity = {
        "tool": "unilip-make-shards",
        "input": str(args.input.resolve()),
        "format": fmt,
        "samples_per_shard": args.samples_per_shard,
        "max_size": args.max_size,
    }
    report = write_shards(
        records, args.out_dir, args.prefix, args.samples_per_shard, args.max_size, args.workers, identity
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
