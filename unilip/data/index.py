"""Sample counts of shards, so that a stage can be given in epochs (the reference trains 5 per stage).

Each shard directory gets a small `index.json`, {"format": "unilip-shard-index", "shards": {file name:
samples}}. The shard maker writes it; shards made elsewhere (the BLIP3o and GPT-Image-Edit downloads)
are counted once with

    python -m unilip.data.index DIR [DIR ...]      # every *.tar in each DIR

which reads only the tar headers (a sample is a run of members with one key, as `read_shard` groups them).
"""

from __future__ import annotations

import argparse
import json
import logging
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from unilip.data.members import KEY_EXT

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "unilip-shard-index"


def count_samples(path: str | Path) -> int:
    """Samples in one tar shard: runs of members with the same key (the loader's grouping)."""
    count, last = 0, None
    with tarfile.open(path, "r:*") as tar:  # a seekable file: headers only, contents are skipped
        for member in tar:
            match = KEY_EXT.match(member.name)
            if not member.isfile() or match is None or member.name.split("/")[-1].startswith("__"):
                continue
            if match.group(1) != last:
                count, last = count + 1, match.group(1)
    return count


def read_index(directory: str | Path) -> dict[str, int]:
    """{shard file name: samples} of a directory's index (empty if it has none)."""
    path = Path(directory) / INDEX_NAME
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a shard index (format={data.get('format')!r})")
    return {str(name): int(n) for name, n in data["shards"].items()}


def write_index(directory: str | Path, counts: Mapping[str, int]) -> Path:
    """Add `counts` ({shard file name: samples}) to the directory's index (entries of other shards stay)."""
    path = Path(directory) / INDEX_NAME
    shards = read_index(directory) | {Path(name).name: int(n) for name, n in counts.items()}
    path.write_text(json.dumps({"format": FORMAT, "shards": dict(sorted(shards.items()))}, indent=1) + "\n")
    return path


def shard_counts(urls: Iterable[str]) -> dict[str, int | None]:
    """{url: samples, or None when its directory's index does not list it (or it is not a local file)}."""
    indexes: dict[Path, dict[str, int]] = {}
    out: dict[str, int | None] = {}
    for url in urls:
        path = Path(url)
        if url.startswith("pipe:"):
            out[url] = None
            continue
        if path.parent not in indexes:
            indexes[path.parent] = read_index(path.parent)
        out[url] = indexes[path.parent].get(path.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="directories of .tar shards")
    args = parser.parse_args(argv)
    from unilip.logs import cli_logging, one_line_errors

    cli_logging()
    with one_line_errors(OSError, ValueError, tarfile.TarError):
        for directory in args.directories:
            shards = sorted(directory.glob("*.tar"))
            if not shards:
                raise FileNotFoundError(f"{directory}: no .tar shards there")
            counts = {shard.name: count_samples(shard) for shard in shards}
            path = write_index(directory, counts)
            log.info("%s: %d samples in %d shards (%s)", directory, sum(counts.values()), len(counts), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
