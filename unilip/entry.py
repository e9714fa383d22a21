"""What train.py and eval.py share around Hydra: a user's mistake is one line, and a refused run leaves
the disk as it found it.

Hydra creates the run directory, writes `.hydra/` and opens the job's log file before the task
starts, which would let a refused run (a bad config, a directory that already holds another run's
checkpoints) rewrite that run's `.hydra/config.yaml`, or leave an empty stub behind. So the configs
switch those off (`hydra.output_subdir: null`, console-only `hydra/job_logging`), and here:

- `RecordNewDirectories` (a Hydra callback) notes, before Hydra creates anything, which part of the
  run directory does not exist yet;
- `hydra_job` wraps the task: log lines are held in memory until `start_run`, and if the task fails
  with a user error, the directory this process created is removed again (unless it holds what a
  run computed: checkpoints);
- `start_run`, called by the task once every check has passed, writes `.hydra/` as Hydra would and
  opens the log file (with the lines held so far);
- user errors, Hydra's composition errors included, end the program as one `error: ...` line
  (`hydra_job`, `main_with_one_line_errors`; UNILIP_TRACEBACK=1 shows the traceback).
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from unilip.errors import USER_ERRORS, ConfigError
from unilip.logs import one_line_errors

HYDRA_OUTPUT_SUBDIR = ".hydra"

# Outermost directories the current Hydra run or sweep creates (absolute); filled by the callback.
_NEW_DIRECTORIES: list[Path] = []


def _outermost_missing(directory: Path) -> Path | None:
    missing = None
    for candidate in [directory, *directory.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


class RecordNewDirectories(Callback):
    """Hydra callback: remember which directories the run (or sweep) is about to create."""

    def _record(self, config: DictConfig, key: str) -> None:
        directory = OmegaConf.select(config, key)
        if directory is not None and (missing := _outermost_missing(Path(str(directory)).absolute())):
            _NEW_DIRECTORIES.append(missing)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._record(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._record(config, "hydra.sweep.dir")


@dataclass
class _Job:
    config: DictConfig  # the task's config as Hydra handed it over (what Hydra saves as .hydra/config.yaml)
    run_dir: Path
    buffer: logging.handlers.MemoryHandler
    log_file: logging.FileHandler | None = None  # opened by start_run


_job: _Job | None = None


@contextmanager
def hydra_job(cfg: DictConfig, precious: tuple[str, ...] = ()) -> Iterator[None]:
    """Run a Hydra task so that a refusal changes nothing on disk and reads as one line.

    Until the task calls `start_run`, log records are held in memory. A user error ends the
    program with one `error: ...` line (here, so that Hydra adds no report of its own), after
    removing the run directory if this process created it and it holds nothing under `precious`
    (sub-directories whose files are worth keeping, e.g. `checkpoints`).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    global _job
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(buffer)
    _job = _Job(copy.deepcopy(cfg), Path(HydraConfig.get().runtime.output_dir), buffer)
    try:
        with one_line_errors():
            try:
                yield
            except (*USER_ERRORS, MissingMandatoryValue, InstantiationException) as error:
                # a user error inside a config-built object (e.g. pretrained weights that do not fit) reaches
                # here wrapped by Hydra; anything else it wraps is a bug and keeps its traceback
                cause = error.__cause__ if isinstance(error, InstantiationException) else error
                if not isinstance(cause, (*USER_ERRORS, MissingMandatoryValue)):
                    raise
                _remove_stub(_job.run_dir, precious)
                if isinstance(cause, MissingMandatoryValue):
                    key = cause.full_key or "a required key"
                    raise ConfigError(f"{key} is required; pass {key}=<value> on the command line") from None
                if cause is not error:
                    raise cause from None
                raise
    finally:
        for handler in (buffer, _job.log_file):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
        _job = None


def start_run(run_dir: str | Path, rank: int = 0) -> None:
    """The run is accepted: write Hydra's `.hydra/` files and open the job's log file (rank 0).

    The other ranks log to the console only: Lightning restarts the script for them under the job name
    `train_ddp_process_<rank>`, whose log files would otherwise lie beside the run's. Does nothing outside
    `hydra_job` (a config composed in a test or a notebook).
    """
    if _job is None or _job.log_file is not None:
        return
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra = HydraConfig.instance().cfg
    root = logging.getLogger()
    if rank != 0:
        root.removeHandler(_job.buffer)  # what it held went to the console already
        return
    out = run_dir / HYDRA_OUTPUT_SUBDIR
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(_job.config), encoding="utf-8")
    (out / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra), encoding="utf-8")
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra.hydra.overrides.task), encoding="utf-8")
    console = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)), None)
    _job.log_file = logging.FileHandler(run_dir / f"{hydra.hydra.job.name}.log", encoding="utf-8")
    _job.log_file.setFormatter(console.formatter if console is not None else logging.Formatter())
    _job.buffer.setTarget(_job.log_file)
    _job.buffer.flush()  # the lines logged while the run was being checked
    root.removeHandler(_job.buffer)
    root.addHandler(_job.log_file)


def _remove_stub(run_dir: Path, precious: tuple[str, ...]) -> None:
    run_dir = run_dir.absolute()
    created = next((d for d in _NEW_DIRECTORIES if d == run_dir or d in run_dir.parents), None)
    if created is None or not run_dir.exists():
        return  # it existed before this run: never touched
    if any(path.is_file() for name in precious for path in (run_dir / name).rglob("*")):
        return  # a run that computed something keeps it
    if _job is not None and _job.log_file is not None:
        logging.getLogger().removeHandler(_job.log_file)
        _job.log_file.close()
        _job.log_file = None
    shutil.rmtree(run_dir)
    for parent in run_dir.parents:  # the parents this run created, while nothing else is in them
        if not (parent == created or created in parent.parents):
            break
        if any(path.name != "multirun.yaml" for path in parent.iterdir()):  # Hydra's sweep record aside
            break
        shutil.rmtree(parent)


def main_with_one_line_errors(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function with a config Hydra cannot compose (an unknown option, a bad override)
    as one `error: ...` line and exit code 1, like the task's own user errors (see `hydra_job`)."""
    from hydra.errors import HydraException

    # Hydra would print its own multi-line report and exit; this lets the exception reach us instead.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    with one_line_errors():
        try:
            main()
        except HydraException as error:
            message = str(error).split("Config search path")[0]  # Hydra's search path: noise for a typo
            raise ConfigError(message) from None
