"""Run shard jobs over processes, resumably: a killed run, started again, redoes only unfinished shards.

A job makes one file `out_dir/<name>` (a shard, or a link to a verified one) and returns its result
`{"shard": name, "samples": n, "skipped": [...], ...}`. The run's books are `<prefix>-progress.jsonl`:
its first line is the run's identity (the tool, the input, the options), written before any job starts;
then each job appends its result as one line *before* it renames its file into place (jobs write under
a temporary name, `<name>.<pid>.tmp`). So a file under its name always has its line: a run started
again with the same identity skips every job whose file exists, redoes the others, and removes the
temporary files a killed run left. A different identity (another dataset, input or option) is refused:
its shards would mix with these. At the end the shards' sample counts go to `index.json`
(`unilip.data.index`) and the whole account (samples, shards, every skipped item with its reason) to
`<prefix>-report.json`. A run in which no job wrote anything removes its books: the disk is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unilip.data.index import write_index
from unilip.errors import ConfigError

log = logging.getLogger(__name__)


class Job(Protocol):
    name: str

    @property
    def size(self) -> int: ...  # units of work, for the progress bar

    def run(self, commit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Do the work; call `commit(result)` before the file appears under its name; return the result."""
        ...


def append_result(path: Path, result: dict[str, Any]) -> None:
    """One result line, in one write: jobs of several processes append to the same progress file."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(result) + "\n")


def temporary(path: Path) -> Path:
    """Where `path` is written before it is renamed into place; the process id keeps two writers apart
    (a restarted run and a worker its killed predecessor left behind)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def progress_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}-progress.jsonl"


def report_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}-report.json"


def read_progress(out_dir: Path, prefix: str) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(identity, {shard name: result}) of an earlier run in `out_dir`; (None, {}) if there was none.

    A line cut short (the run was killed while writing it) is ignored: its shard, never renamed, is redone.
    """
    path = progress_path(out_dir, prefix)
    if not path.exists():
        return None, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    identity = json.loads(lines[0])["identity"] if lines else None
    results = {}
    for line in lines[1:]:
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        results[result["shard"]] = result
    return identity, results


def check_output(out_dir: Path, prefix: str, identity: dict[str, Any] | None, exclusive: bool = False) -> Run:
    """The books of a run into `out_dir`: resuming an earlier run of the same identity, or a new one.

    Refuses a folder that holds another run's output, and `<prefix>-*.tar` shards without a run's books.
    With `exclusive`, also any non-empty folder that holds no run of this identity. `identity=None`
    (records given in Python: nothing tells two runs apart) never resumes.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a folder for the shards")
    earlier, results = read_progress(out_dir, prefix) if identity is not None else (None, {})
    if earlier is not None and earlier.get("tool") != identity.get("tool"):
        source = earlier.get("download", earlier.get("input"))
        raise ConfigError(
            f"{out_dir} holds the output of `{earlier.get('tool')}` (from {source}), not of `{identity.get('tool')}`; "
            "give each dataset a folder of its own"
        )
    if earlier is not None and earlier != identity:
        changed = [key for key in identity.keys() | earlier.keys() if identity.get(key) != earlier.get(key)]
        what = ", ".join(f"{key}: {earlier.get(key)!r} there, {identity.get(key)!r} now" for key in sorted(changed))
        raise ConfigError(
            f"{out_dir} holds the output of another run ({what}); give an empty folder, or the same input and "
            "options to resume that run"
        )
    if earlier is None:
        if exclusive and out_dir.exists() and any(out_dir.iterdir()):
            tool = (identity or {}).get("tool", "this command")
            raise ConfigError(f"{out_dir} is not empty and holds no output of `{tool}`; give an empty or new folder")
        existing = sorted(out_dir.glob(f"{prefix}-*.tar")) if out_dir.exists() else []
        if existing:
            raise ConfigError(
                f"{out_dir} already holds {len(existing)} {prefix}-*.tar shards; a new set would mix with them: "
                "choose an empty directory or another --prefix"
            )
    # A job that wrote nothing (every image bad, a shard that breaks off) is tried again: the files may be fixed.
    done = {name: r for name, r in results.items() if os.path.lexists(out_dir / name)}
    return Run(out_dir, prefix, identity, done, resumed=earlier is not None)


@dataclass
class Run:
    """The books of one run: earlier results, this run's, and the progress file.

    A new run writes the progress file (its identity) before any job can write a shard, so that a run
    killed at any moment is recognised as this run's when started again. A run that ends without any
    shard removes its books again (`abandon`): a run in which nothing is readable leaves no trace.
    """

    out_dir: Path
    prefix: str
    identity: dict[str, Any] | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: bool = False
    _created: list[Path] = field(default_factory=list)  # what `start` created, for `abandon`

    def start(self) -> None:
        if self.resumed:
            return
        missing = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = progress_path(self.out_dir, self.prefix)
        path.write_text(json.dumps({"identity": self.identity}) + "\n", encoding="utf-8")
        self._created = [path, *missing]
        self.resumed = True  # from here on, lines are appended

    def record(self, result: dict[str, Any]) -> None:
        self.results[result["shard"]] = result  # its line is in the progress file already (the job's commit)

    def abandon(self) -> None:
        """Remove what `start` created (when no job wrote anything)."""
        for path in self._created:
            if path.is_dir():
                with contextlib.suppress(OSError):  # not empty: someone else's files are there too
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)


def remove_partials(out_dir: Path) -> None:
    """Temporary files a killed run left behind (`<name>.<pid>.tmp`)."""
    if out_dir.is_dir():
        for path in out_dir.glob("*.tmp"):
            if path.name.count(".") >= 2 and path.name.split(".")[-2].isdigit():
                path.unlink(missing_ok=True)


def run_jobs(
    jobs: Iterable[Job],
    run: Run,
    workers: int,
    total: int | None = None,
    unit: str = "sample",
    desc: str = "",
    done: Callable[[str], bool] | None = None,
) -> None:
    """Run every job whose name `run.results` does not hold yet, on `workers` processes (0: in this one).

    At most 2 x `workers` jobs are in flight, so a job carrying image bytes (a stream that can only be
    read in order) costs bounded memory. Results are recorded as jobs finish.
    """
    from tqdm import tqdm

    finished = done or (lambda name: name in run.results)
    remove_partials(run.out_dir)
    run.start()
    commit = functools.partial(append_result, progress_path(run.out_dir, run.prefix))
    with tqdm(total=total, unit=unit, desc=desc, mininterval=1.0, dynamic_ncols=True) as bar:
        if workers <= 0:
            for job in _pending(jobs, finished, bar):
                run.record(job.run(commit))
                bar.update(job.size)
            return
        sizes: dict[Future, int] = {}
        with ProcessPoolExecutor(max_workers=workers) as pool:
            try:
                for job in _pending(jobs, finished, bar):
                    sizes[pool.submit(job.run, commit)] = job.size
                    if len(sizes) >= 2 * workers:
                        _collect(sizes, run, bar, FIRST_COMPLETED)
                while sizes:
                    _collect(sizes, run, bar, FIRST_COMPLETED)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _pending(jobs: Iterable[Job], finished: Callable[[str], bool], bar) -> Iterator[Job]:
    for job in jobs:
        if finished(job.name):
            bar.update(job.size)
            continue
        yield job


def _collect(sizes: dict[Future, int], run: Run, bar, when: str) -> None:
    completed, _ = wait(sizes, return_when=when)
    for future in sorted(completed, key=lambda f: f.result()["shard"]):
        run.record(future.result())  # a job's exception is a bug: it propagates with its traceback
        bar.update(sizes.pop(future))


def finish(run: Run, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `index.json` and `<prefix>-report.json`; return the report.

    The report lists every skipped item (`"<item>: <reason>"`) in shard order, so that the same input
    gives the same report whatever the number of processes or restarts.
    """
    results = [run.results[name] for name in sorted(run.results)]
    counts = {r["shard"]: r["samples"] for r in results if r["samples"]}
    if not counts:
        run.abandon()
    else:
        write_index(run.out_dir, counts)
    report = {
        "identity": run.identity,
        "samples": sum(counts.values()),
        "shards": counts,
        "skipped": [item for r in results for item in r["skipped"]],
        "converted": sum(r.get("converted", 0) for r in results),
        **(extra or {}),
    }
    if counts:
        path = report_path(run.out_dir, run.prefix)
        partial = temporary(path)
        partial.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)
    return report
