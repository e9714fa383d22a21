"""What the folders given to the demo hold, and the models read from them.

A folder is one or more of: a tokenizer (a saved tokenizer, a tokenizer run, a `.ckpt`, a released `.pth`),
a generator (a saved generator or a generation run), an InternVL checkpoint (`python -m unilip.export`), a run
(anything with `logs/metrics.csv` or `samples/`: the run viewer). A folder that is none of them but holds runs
(`runs/quickstart`) stands for the runs under it. Models load on first use, not at start-up, and a run that
writes a newer checkpoint is read again: the demo can stay open while the run trains.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unilip.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("tokenizer", "generator", "internvl", "run")
RUN_DEPTH = 3  # runs/<name>/<task>/stage<N>: how deep a folder of runs is searched


@dataclass
class Sources:
    """Label (what the page shows) -> path, per kind."""

    tokenizer: dict[str, Path] = field(default_factory=dict)
    generator: dict[str, Path] = field(default_factory=dict)
    internvl: dict[str, Path] = field(default_factory=dict)
    run: dict[str, Path] = field(default_factory=dict)

    def add(self, kind: str, label: str, path: Path) -> None:
        getattr(self, kind).setdefault(label, path)

    def summary(self) -> str:
        return "; ".join(f"{len(getattr(self, k))} {k}(s)" for k in KINDS)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_task(run: Path) -> str | None:
    """The `task` a run's resolved `config.yaml` records (tokenizer, generate, unified)."""
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.load(run / "config.yaml").get("task")
    except Exception:  # a config being written, or not ours: the folder is still a run to view
        return None
    return task if isinstance(task, str) else None


def _is_run(path: Path) -> bool:
    return (path / "logs" / "metrics.csv").is_file() or (path / "samples").is_dir() or (path / "config.yaml").is_file()


def kinds_of(path: Path) -> list[str]:
    """What one folder or file is, as far as the demo can use it (empty: nothing)."""
    if path.is_file():
        return ["tokenizer"] if path.suffix in (".ckpt", ".pth", ".pt") else []
    found = []
    config = _json(path / "config.json")
    if config.get("format") == "unilip-tokenizer":
        found.append("tokenizer")
    elif config.get("format") == "unilip-generator":
        found.append("generator")
    elif config.get("model_type") in ("internvl", "internvl_chat"):
        found.append("internvl")
    if _is_run(path):
        found.append("run")
        task = _run_task(path)
        if task == "tokenizer" or (task is None and (path / "tokenizer" / "config.json").is_file()):
            found.append("tokenizer")  # loaded from its tokenizer/ or its last checkpoint, whichever exists
        if task == "generate" or (task is None and (path / "generator" / "config.json").is_file()):
            found.append("generator")
    return found


def find_sources(paths: list[Path]) -> Sources:
    """Classify the folders given on the command line. A missing path or a folder with nothing the demo can
    show is a user error (ConfigError, one line from the CLI)."""
    found: list[tuple[str, Path]] = []
    for path in paths:
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist; give a run folder, a saved tokenizer or generator, or a checkpoint"
            )
        kinds = kinds_of(path)
        nested = [] if kinds else _runs_under(path)
        if not kinds and not nested:
            raise ConfigError(
                f"{path} is not a tokenizer, generator, InternVL checkpoint or run folder, and holds no runs; "
                "give e.g. runs/<name>/tokenizer/stage1, <run>/generator or an export of `python -m unilip.export`"
            )
        found += [(kind, path) for kind in kinds] + [(kind, run) for run in nested for kind in kinds_of(run)]
    labels = short_labels([path for _, path in found])
    sources = Sources()
    for kind, path in found:
        sources.add(kind, labels[path], path)
    return sources


def short_labels(paths: list[Path]) -> dict[Path, str]:
    """What the page calls each path: its last two components (`tokenizer/stage1`, `toy/generator`), or as many
    more as it takes to tell it from the others."""
    unique = list(dict.fromkeys(path.resolve() for path in paths))
    labels = {}
    for path in unique:
        depth = 2
        while depth < len(path.parts) and any(
            other != path and other.parts[-depth:] == path.parts[-depth:] for other in unique
        ):
            depth += 1
        labels[path] = "/".join(path.parts[-depth:])
    return {path: labels[path.resolve()] for path in paths}


def _runs_under(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found, frontier = [], [root]
    for _ in range(RUN_DEPTH):
        frontier = sorted(child for folder in frontier for child in folder.iterdir() if child.is_dir())
        found += [folder for folder in frontier if kinds_of(folder)]
        frontier = [folder for folder in frontier if not kinds_of(folder)]
    return sorted(found)


def weights_version(path: Path) -> tuple[str, float]:
    """What a model read from `path` would be read from now, and when that was written: a run's saved result
    or its last checkpoint (`unilip.training.checkpoints.locate`), so a newer checkpoint is seen."""
    from unilip.training.checkpoints import locate

    for result in ("tokenizer", "generator"):
        located = locate(path, result)
        if located != path:
            break
    weights = located / "model.safetensors" if located.is_dir() else located
    try:
        return str(located), weights.stat().st_mtime
    except OSError:
        return str(located), 0.0


class ModelCache:
    """Models by (kind, path, options), loaded once; reloaded when the weights they came from changed. One lock:
    two requests never load the same model twice at once (the page's events run in threads)."""

    def __init__(self):
        self._models: dict[tuple, tuple[tuple[str, float], Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, path: Path, load: Callable[[], Any]) -> Any:
        version = weights_version(path)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
            self._models.pop(key, None)  # free the old weights before the new ones load
            log.info("loading %s from %s", key[0], version[0])
            model = load()
            self._models[key] = (version, model)
            return model
