"""Reading and writing webdataset shards: url expansion, raw samples, exact accounting of skips.

A shard is a tar file in webdataset layout: members `<key>.<ext>` with the members of one sample
next to each other (`000123.jpg`, `000123.txt`). A raw sample is the dict
`{"__key__": key, "__url__": url, ext: bytes, ...}` with lower-case extensions, the same
convention as `webdataset` (the key is everything before the first dot of the file name).

Bad data never raises out of `read_shard`: a shard that cannot be opened or that breaks off in
the middle (a truncated download) counts as one skipped shard, and reading goes on with the next.
"""

from __future__ import annotations

import glob
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import webdataset as wds
from webdataset.gopen import gopen

from unilip.data.members import KEY_EXT
from unilip.errors import UserError

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]+):")  # pipe:, s3:, https: ... (two letters at least: not C:)
# At most this many skips are logged one by one per worker; the rest only count.
_LOG_FIRST = 10


class DataError(UserError, RuntimeError):
    """The data cannot produce a single good sample; the message says which data and why."""


def expand_urls(urls: str | Sequence[str], what: str = "urls") -> list[str]:
    """Expand brace patterns (`shard-{000..099}.tar`) and globs (`dir/*.tar`) into a list of urls.

    Brace patterns and plain paths are kept even when the file does not exist (it is skipped,
    and counted, when read); a glob that matches nothing, local paths none of which exists, or a
    directory given as a shard is an error, because it almost always means a wrong data directory.
    `pipe:` and remote urls are passed through untouched.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for spec in specs:
        for url in braceexpand.braceexpand(str(spec)):
            if url.startswith("pipe:") or not _GLOB_CHARS.search(url):
                if str(spec) == url:
                    _not_a_directory(url, what)  # a plain path: a folder here is a common slip
                out.append(url)
                continue
            matches = sorted(glob.glob(url))
            if not matches:
                raise DataError(f"{what}: no shard matches {url!r}; check the path (and the data directory)")
            for match in matches:
                _not_a_directory(match, what)
            out.extend(matches)
    if not out:
        raise DataError(f"{what}: no urls given; set {what} to shard paths, a glob or a brace pattern")
    local = [_local_path(url) for url in out]
    if all(path is not None for path in local) and not any(path.exists() for path in local):
        raise DataError(
            f"{what}: none of the {len(out)} shard files exists (first: {out[0]}); check the path (and the data "
            "directory)"
        )
    return out


def _local_path(url: str) -> Path | None:
    """The file a url names, or None for a pipe or a remote url (which only reading can check)."""
    scheme = _SCHEME.match(url)
    if scheme is not None and scheme.group(1) != "file":
        return None
    return Path(url.removeprefix("file://").removeprefix("file:"))


def _not_a_directory(url: str, what: str) -> None:
    path = _local_path(url)
    if path is not None and path.is_dir():
        raise DataError(f"{what}: {url} is a directory, not a shard; give the shards in it ({path / '*.tar'})")


@dataclass
class SkipCounter:
    """Counts what one worker skipped: undecodable samples and unreadable shards (and the shards it opened).

    `active=False` while a resumed worker fast-forwards over samples it already delivered before
    the checkpoint (those skips were counted then), so counts stay exact across a resume.
    """

    samples: int = 0
    shards: int = 0
    opened: int = 0  # shard reads started (good or bad): what a pass costs in I/O
    active: bool = True
    verbose: bool = True
    last_error: str = ""

    def shard_failed(self, url: str, error: BaseException) -> None:
        if not self.active:
            return
        self.shards += 1
        self.last_error = f"{url}: {type(error).__name__}: {error}"
        self._log("skipped shard %s", self.last_error)

    def sample_failed(self, key: str, url: str, error: BaseException) -> None:
        if not self.active:
            return
        self.samples += 1
        self.last_error = f"{key} in {url}: {type(error).__name__}: {error}"
        self._log("skipped sample %s", self.last_error)

    def _log(self, fmt: str, message: str) -> None:
        if self.verbose and self.samples + self.shards <= _LOG_FIRST:
            log.warning(fmt, message)

    def as_list(self) -> list[int]:
        return [self.samples, self.shards]


def read_shard(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Yield the raw samples of one shard, in file order.

    A shard that fails to open, or breaks off, adds 1 to `counter.shards`; the sample being read
    when it broke off is dropped (it may be incomplete), the complete ones before it are kept.
    A tar cut exactly at a member boundary reads as a shorter shard: tarfile cannot tell.
    """
    counter.opened += 1
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # a missing file, a failing pipe: skip the shard, never the run
        counter.shard_failed(url, error)
        return
    current: dict | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = KEY_EXT.match(member.name)
                if match is None or member.name.split("/")[-1].startswith("__"):
                    continue  # not a sample member (webdataset skips these too)
                key, ext = match.group(1), match.group(2).lower()
                if current is not None and current["__key__"] != key:
                    yield current  # complete: the next sample has begun
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current
    except Exception as error:  # truncated or corrupt tar (or a pipe that died): keep what was complete
        counter.shard_failed(url, error)


class ShardSink:
    """Write sample dicts to `<out_dir>/<prefix>-%06d.tar`, starting a new shard at a count or size limit.

    Leaving the `with` block adds the shards' sample counts to `<out_dir>/index.json` (`unilip.data.index`).
    """

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int = 1000, max_bytes: float = 1e9):
        self.out_dir = Path(out_dir)  # created with the first shard: writing nothing leaves nothing behind
        self.pattern = str(self.out_dir / f"{prefix}-%06d.tar")
        self.samples_per_shard, self.max_bytes = samples_per_shard, max_bytes
        self.shards: list[str] = []
        self.counts: dict[str, int] = {}
        self._writer: wds.TarWriter | None = None
        self._count = self._bytes = 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._count >= self.samples_per_shard or self._bytes >= self.max_bytes:
            self.close()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.shards.append(self.pattern % len(self.shards))
            # mtime=0: the same input gives byte-identical shards
            self._writer = wds.TarWriter(self.shards[-1], encoder=False, mtime=0)
            self._count = self._bytes = 0
        self._bytes += self._writer.write(sample)
        self._count += 1
        self.counts[self.shards[-1]] = self._count

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.counts:
            from unilip.data.index import write_index

            write_index(Path(self.pattern).parent, self.counts)
