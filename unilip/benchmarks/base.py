"""What every benchmark provides to the harness: its jobs, its official scorer's commands, its scores."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        produces: files it writes; when they all exist the step is done and is not run again.
        env: environment variables it needs; without them it is not run (its command is printed instead).
    """

    argv: tuple[str, ...]
    cwd: str
    produces: tuple[str, ...]
    env: tuple[str, ...] = ()

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


class Benchmark:
    """A benchmark: prompts from its own files, images in its scorer's layout, scores from its scorer.

    Subclasses set `name`, `format_source` (repository and files defining the layout) and the judge, and
    implement `jobs`, `score_steps` and `collect`.
    """

    name = ""
    format_source = ""
    judge = ""

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
