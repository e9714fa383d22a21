"""Generation and editing benchmarks as the field scores them: `python -m unilip.benchmarks <name>`.

Each benchmark reads its own prompt / metadata files, writes images in exactly the layout its official
scorer reads (`out/images`), records the sampler settings in `out/manifest.json`, and is scored by that
scorer at its pinned upstream commit (`scorers.py`; run when its checkout is given, else its commands are
printed): `out/results.json`, `summary.md`.

A top layer: may import everything below it (`unilip.pipelines`, `unilip.evaluation`, `unilip.models`, ...) but
no task. The performance and parity scripts are elsewhere (`perf/`, `parity/` at the repository's top).
"""

BENCHMARKS = ("geneval", "dpg", "wise", "imgedit", "gedit", "unified")

__all__ = ["BENCHMARKS"]
