"""The run viewer's reading: a run's curves from `logs/metrics.csv` and its validation grids from `samples/`.

Both are read afresh on every refresh, while the run may be writing them: a row being written (a last line without
its line end) or a value that is not a number is skipped, never an error. Rows are Lightning's CSV logger's: one column
per metric, empty where a row does not log it, `step` the optimizer step (`unilip.training.loggers.CSVLogger`).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = Path("logs") / "metrics.csv"
NOT_METRICS = ("epoch", "step")
# Grids the training modules write: <kind>_step<step>.png (reconstruction, generation, ...), a caption .txt beside.
GRID_NAME = re.compile(r"^(?P<kind>.+)_step(?P<step>\d+)\.png$")
PREFERRED = ("loss/total", "loss/l2", "val/psnr")  # what the picker shows first, when the run logs it


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] in file order, for every metric column with at least one number."""
    try:
        text = (run / METRICS_FILE).read_text(errors="replace")
    except FileNotFoundError:
        return {}
    complete = text[: text.rfind("\n") + 1]  # a row being written has no line end yet
    rows = list(csv.DictReader(io.StringIO(complete, newline="")))
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        try:
            step = int(float(row.get("step") or ""))
        except ValueError:
            continue  # a partial line
        for name, text in row.items():
            if name is None or name in NOT_METRICS or not text:
                continue
            try:
                curves.setdefault(name, []).append((step, float(text)))
            except (TypeError, ValueError):
                continue
    return curves


def default_metric(names: list[str]) -> str | None:
    for name in PREFERRED:
        if name in names:
            return name
    return names[0] if names else None


@dataclass
class Grid:
    step: int
    path: Path
    caption: str  # the prompts written beside a generation grid, if any


def read_grids(run: Path) -> dict[str, list[Grid]]:
    """kind (reconstruction, generation, ...) -> its grids by step."""
    grids: dict[str, list[Grid]] = {}
    folder = run / "samples"
    if not folder.is_dir():
        return grids
    for path in folder.iterdir():
        match = GRID_NAME.match(path.name)
        if match is None:
            continue
        text = path.with_suffix(".txt")
        caption = text.read_text(errors="replace").strip().replace("\n", " | ") if text.is_file() else ""
        grids.setdefault(match["kind"], []).append(Grid(int(match["step"]), path, caption))
    for series in grids.values():
        series.sort(key=lambda grid: grid.step)
    return grids
