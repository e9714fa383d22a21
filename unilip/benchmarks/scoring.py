"""Run a benchmark's official scorer (or print its commands), then write results.json and summary.md."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import SCORES, Benchmark, ScoreStep
from unilip.pipelines.manifest import write_json

log = logging.getLogger(__name__)


def scorer_version(scorer: str | None) -> str | None:
    """The git commit of the scorer's checkout, if it is one."""
    if not scorer:
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(scorer), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def run_steps(steps: list[ScoreStep], out: Path, notes: list[str]) -> None:
    """Run each step whose outputs are missing; a step that needs an unset variable is left for the user."""
    logs = out / SCORES / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(steps):
        if all(Path(path).exists() for path in step.produces):
            log.info("scorer step %d already done: %s", index, step.produces[0])
            continue
        unset = [name for name in step.env if not os.environ.get(name)]
        if unset:
            notes.append(f"not run (set {', '.join(unset)}): {step.shell()}")
            log.warning(notes[-1])
            return
        log.info("running: %s", step.shell())
        with open(logs / f"step{index}.log", "w") as handle:
            code = subprocess.run(
                step.resolved(dict(os.environ)), cwd=step.cwd, stdout=handle, stderr=subprocess.STDOUT, check=False
            ).returncode
        if code != 0 or not all(Path(path).exists() for path in step.produces):
            notes.append(f"scorer step failed (exit {code}; log {logs / f'step{index}.log'}): {step.shell()}")
            log.error(notes[-1])
            return


def score_and_report(
    benchmark: Benchmark,
    out: Path,
    scorer: str | None,
    python: str,
    size: int,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Score the images in `out` (running the scorer when `scorer` is its checkout) and write the report."""
    steps = benchmark.score_steps(out, scorer, python, size)
    notes: list[str] = []
    missing = not manifest.get("complete", False)
    if missing:
        notes.append("some outputs are missing (see manifest.json runs[].ranks[].skipped); scores cover the rest")
    if scorer:
        run_steps(steps, out, notes)
    scores = benchmark.collect(out)
    if scores is None:
        log.info("%s: not scored yet; the scorer's commands are in %s", benchmark.name, out / "summary.md")
    results = {
        "benchmark": benchmark.name,
        "format": benchmark.format_source,
        "scores": scores,
        "judge": {"name": benchmark.judge, "scorer": scorer, "scorer_commit": scorer_version(scorer)},
        "score_commands": [step.shell() for step in steps],
        "sampler": manifest["identity"]["sampler"],
        "generator": manifest.get("generator"),
        "images_complete": not missing,
        "skipped": [s for run in manifest.get("runs", []) for r in run["ranks"] for s in r["skipped"]],
        "notes": notes,
    }
    write_json(out / "results.json", results)
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    scores, sampler = results["scores"], results["sampler"]
    lines = [
        f"# {results['benchmark']}",
        "",
        f"Sampler: {sampler['steps']} steps, CFG {sampler['guidance_scale']}, {sampler['scheduler']}, "
        f"{sampler['size']} px, seed {sampler['seed']} + prompt index, {sampler['dtype']}.",
        f"Judge: {results['judge']['name']}"
        + (
            f" (scorer {results['judge']['scorer']} at {results['judge']['scorer_commit']})"
            if results["judge"]["scorer"]
            else ""
        ),
        "",
    ]
    if scores is None:
        lines += ["Not scored yet. Run:", "", "```bash", *results["score_commands"], "```"]
    else:
        lines += ["| score | value |", "|---|---|"]
        lines += [f"| {name} | {_value(value)} |" for name, value in _flatten(scores)]
    if results["notes"]:
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"


def _flatten(scores: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for name, value in scores.items():
        if name == "rule":
            continue
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{name} / ")
        else:
            rows.append((prefix + name, value))
    return rows


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def read_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())
