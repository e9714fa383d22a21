"""The training loader of two checkouts on the same JPEG shards, interleaved: images/s before and after a change.

    git archive c48b3b3 | tar -x -C /tmp/before        # a checkout of the commit before the change
    python perf/loader_before_after.py --before /tmp/before [--after .] [--sizes 224 448] [--workers 0 1 2] \\
        [--rounds 7] [--batches 40] [--json docs/measurements/loader_uint8_before_after.json]

Writes the benchmark's JPEG shards once (`unilip.data.bench`: crops of the bundled photos, alternately 512x512
and 640x480, quality 90), then runs each checkout's own `python -m unilip.data.bench --urls <those shards>` in
a fresh process, alternating: in every round, for every size, both checkouts, the order swapped from one
round to the next (before, after; after, before; ...), so that drift of a shared machine hits both. Reported
per size and worker count: both rates of every round, the ratio after / before of each round, and their
median, minimum and maximum (a speed-up is the median ratio with its range); the load average before each
round is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(repo: Path, pattern: str, size: int, args, out: Path) -> dict[int, float]:
    """{workers: images/s} of `repo`'s loader benchmark on the shards `pattern`, in a fresh process."""
    command = [sys.executable, "-m", "unilip.data.bench", "--urls", pattern, "--sizes", str(size), "--json", str(out)]
    command += ["--workers", *map(str, args.workers), "--batches", str(args.batches)]
    command += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode:
        raise SystemExit(f"the loader benchmark of {repo} failed:\n{result.stderr[-3000:]}")
    return {row["workers"]: row["images_per_s"] for row in json.loads(out.read_text())["rows"]}


def summary(before: list[float], after: list[float]) -> dict:
    ratios = [a / b for a, b in zip(after, before, strict=True)]
    return {
        "before": before,
        "after": after,
        "ratios": ratios,
        "median_before": statistics.median(before),
        "median_after": statistics.median(after),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the checkout before the change")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="default: this one")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="JPEGs in the benchmark's shards")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark process may take")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from unilip.data.bench import machine, write_bench_shards

    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    rates: dict[str, dict[str, list[float]]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_shards(Path(tmp) / "shards", args.images)
        pattern = str(Path(tmp) / "shards" / "*.tar")
        for round_ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = list(versions) if round_ % 2 == 0 else list(versions)[::-1]
            for size in args.sizes:
                for name in order:
                    measured = bench(versions[name], pattern, size, args, Path(tmp) / "bench.json")
                    for workers, rate in measured.items():
                        rates.setdefault(f"{size}/{workers}", {}).setdefault(name, []).append(rate)
            print(f"round {round_ + 1}/{args.rounds} done (load average {loads[-1]:.1f})", flush=True)
    result = {
        "machine": machine(),
        "before": str(versions["before"]),
        "after": str(versions["after"]),
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "images": args.images,
        "load_average_1min_per_round": loads,
        "settings": {key: summary(r["before"], r["after"]) for key, r in rates.items()},
    }
    print(f"{'size/workers':>12} {'before img/s':>13} {'after img/s':>12} {'after/before: median':>21} {'range':>12}")
    for key, s in result["settings"].items():
        print(
            f"{key:>12} {s['median_before']:>13.0f} {s['median_after']:>12.0f} {s['median_ratio']:>21.2f} "
            f"{s['min_ratio']:>5.2f}-{s['max_ratio']:<5.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
