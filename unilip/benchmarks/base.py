"""What every benchmark provides to the harness: its jobs, its official scorer's commands, its scores."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unilip.benchmarks.scorers import Pin
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

IMAGES = "images"  # out/images: exactly the folder the official scorer reads
SCORES = "scores"  # out/scores: what the scorer writes


@dataclass(frozen=True)
class ScoreStep:
    """One command of a benchmark's official scorer.

    Attributes:
        argv: the command; `${NAME}` stands for the environment variable NAME (an API key), never stored.
        cwd: the folder it runs in (inside the scorer's checkout).
        produces: files it writes; when they all exist (and `check` finds nothing missing) the step is done and
            is not run again.
        env: environment variables it needs; without them it is not run (its command is printed instead).
        key_file: a file whose first line the scorer reads as its API key; while it is empty the step is not run.
        check: after the step, what its outputs lack (e.g. prompts the judge failed on, and how to retry them),
            or None when they are complete.
        label: the step's name in messages (default: its script).
    """

    argv: tuple[str, ...]
    cwd: str
    produces: tuple[str, ...]
    env: tuple[str, ...] = ()
    key_file: str | None = None
    check: Callable[[], str | None] | None = field(default=None, compare=False, repr=False)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or Path(self.argv[1]).name

    def shell(self) -> str:
        """The command as one shell line (environment variables left for the shell to expand)."""
        words = [f'"{word}"' if "${" in word else shlex.quote(word) for word in self.argv]
        return f"cd {shlex.quote(self.cwd)} && {' '.join(words)}"

    def resolved(self, environ: dict[str, str]) -> list[str]:
        out = []
        for word in self.argv:
            for name in self.env:
                word = word.replace("${" + name + "}", environ.get(name, ""))
            out.append(word)
        return out

    def unmet(self, environ: dict[str, str]) -> str | None:
        """What must be set before this step can run (None: nothing)."""
        unset = [name for name in self.env if not environ.get(name)]
        if unset:
            return f"set {', '.join(unset)}"
        if self.key_file is not None:
            try:
                first = Path(self.key_file).read_text(encoding="utf-8").partition("\n")[0].strip()
            except OSError:
                first = ""
            if not first:
                return f"put your API key on the first line of {self.key_file}"
        return None

    def done(self) -> bool:
        return all(Path(path).exists() for path in self.produces) and (self.check is None or self.check() is None)


class Benchmark:
    """A benchmark: prompts from its own files, images in its scorer's layout, scores from its scorer.

    Subclasses set `name`, `format_source` (repository and files defining the layout), the judge and `pin` (the
    official scorer at the commit its commands are written for; None when scoring runs here), and implement
    `jobs`, `score_steps` and `collect`.
    """

    name = ""
    format_source = ""
    judge = ""
    pin: Pin | None = None

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        """Every prompt of the benchmark as a job, in the benchmark's order; prompt i uses seed + i."""
        raise NotImplementedError

    def prepare(self, out: Path, jobs: Sequence[SampleJob]) -> None:
        """Write what this shard's jobs need before sampling (default: nothing)."""

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        """The official scorer's commands for images in `out`; `scorer` is its checkout (None: a placeholder)."""
        raise NotImplementedError

    def collect(self, out: Path) -> dict[str, Any] | None:
        """The scores from the scorer's outputs in `out`, or None if it has not run."""
        raise NotImplementedError

    def inputs(self) -> dict[str, str]:
        """The input files this benchmark read (for the manifest)."""
        return {}


def existing_file(path: str | None, option: str, hint: str) -> Path:
    """`path` as a Path, or one clear error naming the option and what to give."""
    if path is None:
        raise SamplingError(f"{option} is required: {hint}")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{option}={path} does not exist; give {hint}")
    return resolved.resolve()


def checkout(scorer: str | None, placeholder: str, *parts: str) -> str:
    """A folder inside the scorer's checkout, or a placeholder naming it when none was given."""
    root = str(Path(scorer).expanduser().resolve()) if scorer else f"<{placeholder}>"
    return str(Path(root, *parts)) if parts else root


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
