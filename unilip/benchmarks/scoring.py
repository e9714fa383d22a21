"""Run a benchmark's official scorer (or print its commands), then write results.json and summary.md."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import SCORES, Benchmark, ScoreStep
from unilip.benchmarks.scorers import ScorerError, check_checkout, checkout_commit
from unilip.pipelines.manifest import write_json

log = logging.getLogger(__name__)


def run_steps(steps: list[ScoreStep], out: Path, notes: list[str]) -> ScorerError | None:
    """Run each step not yet done, in order; returns the first failure (exit status, a file not written, or
    outputs its check finds incomplete), naming the step and its log. A step that needs an unset key is left
    for the user (a note) and ends the run of steps."""
    logs = out / SCORES / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(steps):
        if step.done():
            log.info("scorer step %d (%s) already done: %s", index + 1, step.name, step.produces[0])
            continue
        unmet = step.unmet(dict(os.environ))
        if unmet:
            notes.append(f"not run ({unmet}): {step.shell()}")
            log.warning(notes[-1])
            return None
        log_path = logs / f"step{index}.log"
        log.info("running scorer step %d (%s), log %s: %s", index + 1, step.name, log_path, step.shell())
        with open(log_path, "w") as handle:
            code = subprocess.run(
                step.resolved(dict(os.environ)), cwd=step.cwd, stdout=handle, stderr=subprocess.STDOUT, check=False
            ).returncode
        unwritten = [path for path in step.produces if not Path(path).exists()]
        if code != 0:
            problem = f"it exited with status {code}"
        elif unwritten:
            problem = f"it did not write {unwritten[0]}"
        else:
            problem = step.check() if step.check is not None else None
        if problem:
            failure = f"scorer step {index + 1} of {len(steps)} ({step.name}) failed: {problem}; its log: {log_path}"
            notes.append(failure)
            return ScorerError(failure)
    return None


def check_scorer(benchmark: Benchmark, out: Path, scorer: str | None, python: str, size: int) -> str | None:
    """Before anything is generated: refuse a `scorer=` that is not the benchmark's pinned scorer (one line);
    returns the checkout's commit."""
    if not scorer or benchmark.pin is None:
        return None
    return check_checkout(benchmark.pin, scorer, benchmark.score_steps(out, scorer, python, size), python)


def score_and_report(
    benchmark: Benchmark,
    out: Path,
    scorer: str | None,
    python: str,
    size: int,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Score the images in `out` (running the scorer when `scorer` is its checkout) and write the report.

    Without a scorer the folders its printed commands write into are made, so they run as printed. A scorer
    step that fails raises ScorerError after the report (with what was scored) is written.
    """
    steps = benchmark.score_steps(out, scorer, python, size)
    for step in steps:
        for path in step.produces:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    missing = not manifest.get("complete", False)
    if missing:
        notes.append("some outputs are missing (see manifest.json runs[].ranks[].skipped); scores cover the rest")
    failure = run_steps(steps, out, notes) if scorer else None
    scores = benchmark.collect(out)
    if scores is None:
        log.info("%s: not scored yet; the scorer's commands are in %s", benchmark.name, out / "summary.md")
    pin = benchmark.pin.record() if benchmark.pin is not None else None
    results = {
        "benchmark": benchmark.name,
        "format": benchmark.format_source,
        "scores": scores,
        "judge": {"name": benchmark.judge, "scorer": scorer, "scorer_commit": checkout_commit(scorer), "pinned": pin},
        "score_commands": [step.shell() for step in steps],
        "sampler": manifest["identity"]["sampler"],
        "generator": manifest.get("generator"),
        "images_complete": not missing,
        "skipped": [s for run in manifest.get("runs", []) for r in run["ranks"] for s in r["skipped"]],
        "notes": notes,
    }
    write_json(out / "results.json", results)
    (out / "summary.md").write_text(summary_markdown(results))
    if failure is not None:
        raise failure
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    scores, sampler, judge = results["scores"], results["sampler"], results["judge"]
    pinned = judge.get("pinned")
    lines = [
        f"# {results['benchmark']}",
        "",
        f"Sampler: {sampler['steps']} steps, CFG {sampler['guidance_scale']}, {sampler['scheduler']}, "
        f"{sampler['size']} px, seed {sampler['seed']} + prompt index, {sampler['dtype']}.",
        f"Judge: {judge['name']}"
        + (f" (scorer {judge['scorer']} at {judge['scorer_commit']})" if judge["scorer"] else ""),
    ]
    if pinned:
        lines.append(f"Official scorer: {pinned['repository']} at {pinned['commit']} (`{pinned['clone']}`).")
    lines.append("")
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
