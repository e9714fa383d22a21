"""Mutation testing of the modules where a silent error ruins a run (docs/testing.md).

    pip install "mutmut>=3.8"
    python .ci/mutation.py                          # every target; incremental: reruns what changed
    python .ci/mutation.py losses nonfinite --max-children 2   # default: one worker
    python .ci/mutation.py --report                 # the table from the last results, no new runs
    python .ci/mutation.py flow --survivors         # after adding tests: run the survivors again
    python .ci/mutation.py losses --resume          # an interrupted run (or changed functions): the mutants
                                                    # without a result
    python .ci/mutation.py --repo /path/to/old/checkout --before --sample 30 --out /tmp/before

Each target is a set of functions and the fast tests that guard them. mutmut (3.x) runs in a scratch
copy of the repository per target (`--work`, default /tmp/unilip-mutation/<target>), so nothing is
written into the checkout; results accumulate there across runs. The per-target counts and every
surviving mutant's diff go to docs/measurements/mutation/<target>.json (the diffs alone also to
<target>.survivors.diff), with the date, the commit and the tests run; docs/testing.md explains the survivors.
The score is raw: killed over every mutant run, "no tests" (no selected test reaches the function) included.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# target -> files to mutate, mutant name patterns (mutmut names functions x_<name>, methods x<Class><name>),
# and the tests that guard them
TARGETS: dict[str, dict[str, list[str]]] = {
    "losses": {
        "files": ["unilip/losses/*"],
        "names": ["unilip.losses.*"],
        "tests": [
            "tests/test_losses.py",
            "tests/test_recipe.py::test_generator_and_discriminator_gradients_are_isolated",
        ],
    },
    "stages": {
        "files": ["unilip/tasks/tokenizer/stages.py"],
        "names": ["unilip.tasks.tokenizer.stages.*"],
        "tests": ["tests/test_recipe.py", "-k", "parameter_groups or isolated or does_not_have"],
    },
    "ema": {
        "files": ["unilip/training/ema.py"],
        "names": ["unilip.training.ema.*"],
        "tests": ["tests/test_losses.py"],
    },
    "nonfinite": {
        "files": ["unilip/training/nonfinite.py"],
        "names": ["unilip.training.nonfinite.*"],
        "tests": ["tests/test_nonfinite.py"],
    },
    # the guarded optimiser step the tokenizer and generation modules share (moved out of them)
    "steps": {
        "files": ["unilip/training/steps.py"],
        "names": ["unilip.training.steps.*"],
        "tests": [
            "tests/test_steps.py",
            "tests/test_training.py",
            "tests/test_generation_training.py",
            "-k",
            "test_steps or non_finite or sync_free",
        ],
    },
    "schedules": {
        "files": ["unilip/training/schedules.py"],
        "names": ["unilip.training.schedules.*"],
        "tests": ["tests/test_losses.py"],
    },
    "optimizer set-up (tasks/tokenizer/module.py)": {
        "files": ["unilip/tasks/tokenizer/module.py", "unilip/training/param_groups.py"],
        "names": [
            "unilip.training.param_groups.x_decay_groups*",
            "unilip.tasks.tokenizer.module.x*configure_optimizers*",
        ],
        "tests": ["tests/test_recipe.py", "-k", "parameter_groups or learning_rate_schedule"],
    },
    "flow objective and CFG dropout (tasks/generation/module.py)": {
        "files": ["unilip/tasks/generation/module.py"],
        "names": [
            "unilip.tasks.generation.module.x*flow_loss*",
            "unilip.tasks.generation.module.x*inputs*",
            "unilip.tasks.generation.module.x*sample_timesteps*",
        ],
        "tests": ["tests/test_generation_objective.py"],
    },
    "metrics": {
        "files": ["unilip/evaluation/metrics.py"],
        "names": ["unilip.evaluation.metrics.*"],
        "tests": ["tests/test_evaluation.py", "-k", "not process and not end_to_end and not skipped"],
    },
    "split logic (data/streams.py)": {
        "files": ["unilip/data/streams.py"],
        "names": [
            "unilip.data.streams.x_eval_shards*",
            "unilip.data.streams.x*EvalStream*",
            "unilip.data.streams.x*TrainStream*",
        ],
        "tests": ["tests/test_scale.py", "tests/test_data_loader.py"],
    },
    # added in issue 26: the modules that arrived after the first run
    "grpo": {
        "files": ["unilip/tasks/unified/grpo.py"],
        "names": ["unilip.tasks.unified.grpo.*"],
        "tests": ["tests/test_unified_grpo.py"],
    },
    "rollouts": {
        "files": ["unilip/tasks/unified/rollouts.py"],
        "names": ["unilip.tasks.unified.rollouts.*"],
        "tests": [
            "tests/test_unified_rollout_parts.py",
            "tests/test_unified_flow_grpo.py",
            "tests/test_unified_rollouts.py",
            "tests/test_unified_grpo.py",
        ],
    },
    "requeue": {
        "files": ["unilip/training/requeue.py"],
        "names": ["unilip.training.requeue.*"],
        "tests": ["tests/test_requeue.py"],
    },
    "manifest": {
        "files": ["unilip/pipelines/manifest.py"],
        "names": ["unilip.pipelines.manifest.*"],
        "tests": ["tests/test_manifest.py", "tests/test_sampling.py", "-k", "not two_processes and not killed"],
    },
    "latent cache": {
        "files": ["unilip/data/latent_cache.py", "unilip/tasks/generation/target_cache.py"],
        "names": ["unilip.data.latent_cache.*", "unilip.tasks.generation.target_cache.*"],
        "tests": [
            "tests/test_latent_cache.py",
            "tests/test_latent_cache_fingerprint.py",
            "tests/test_dcae_identity.py",
            "-m",
            "not slow",
        ],
    },
    "export name mapping": {
        "files": [
            "unilip/pretrained/internvl.py",
            "unilip/pretrained/internvl_original.py",
            "unilip/pretrained/released.py",
        ],
        "names": [
            "unilip.pretrained.internvl.x_internvit_names*",
            "unilip.pretrained.internvl.x_convert_internvit_key*",
            "unilip.pretrained.internvl.x_convert_unilip_state_dict*",
            "unilip.pretrained.internvl_original.x_to_original_names*",
            "unilip.pretrained.internvl_original.x__is_vision*",
            "unilip.pretrained.released.x_generator_keys*",
        ],
        "tests": [
            "tests/test_export_names.py",
            "tests/test_internvl.py",
            "tests/test_internvl_original.py",
            "tests/test_released.py",
        ],
    },
    "encoders": {
        "files": ["unilip/models/encoders/*"],
        "names": ["unilip.models.encoders.*"],
        "tests": ["tests/test_encoders.py", "tests/test_encoder_export.py"],
    },
    # scoring (official outputs read back into numbers, the summary) and layouts (the jobs and files the official
    # scorers expect); not the harness's command-line plumbing or the unified bench's captioning
    "benchmark scoring and layouts": {
        "files": ["unilip/benchmarks/*"],
        "names": [
            "unilip.benchmarks.*collect*",
            "unilip.benchmarks.*jobs*",
            "unilip.benchmarks.*prepare*",
            "unilip.benchmarks.gedit.x*_csvs*",
            "unilip.benchmarks.gedit.x__group_means*",
            "unilip.benchmarks.imgedit.x*_images_root*",
            "unilip.benchmarks.wise.x*_folder*",
            "unilip.benchmarks.wise.x_scores_file*",
            "unilip.benchmarks.wise.x__read_scores*",
            "unilip.benchmarks.wise.x__category*",
            "unilip.benchmarks.base.x_mean*",
            "unilip.benchmarks.scoring.x_summary_markdown*",
            "unilip.benchmarks.scoring.x__flatten*",
            "unilip.benchmarks.scoring.x__value*",
        ],
        "tests": ["tests/test_benchmarks.py", "tests/test_benchmark_scorers.py", "tests/test_unified_bench.py"],
    },
}


# The tests that guarded each target before the fast unit tests existed (for the "before" scores; some
# are whole training runs, so --sample is needed to finish in hours rather than days).
BEFORE_TESTS: dict[str, list[str]] = {
    "losses": ["tests/test_losses.py"],
    "stages": ["tests/test_training.py"],
    "ema": ["tests/test_losses.py", "tests/test_training.py"],
    "nonfinite": ["tests/test_training.py", "-k", "non_finite"],
    "schedules": ["tests/test_losses.py"],
    "optimizer set-up (tasks/tokenizer/module.py)": ["tests/test_training.py"],
    "flow objective and CFG dropout (tasks/generation/module.py)": ["tests/test_generation_training.py"],
    "metrics": ["tests/test_evaluation.py", "-k", "not process"],
    "split logic (data/streams.py)": ["tests/test_data_loader.py"],
}


def slug(target: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in target.split(" (")[0])


def prepare(target: str, work: Path, repo: Path, tests: list[str]) -> Path:
    """A scratch copy of `repo`'s tracked files with [tool.mutmut] set for `target`; kept across runs."""
    spec = TARGETS[target]
    scratch = work / slug(target)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:  # refresh sources and tests; mutmut's own state (mutants/) stays
        source, target_path = repo / name, scratch / name
        if source.is_file():
            target_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target_path)
    settings = {
        "source_paths": ["unilip"],
        "only_mutate": spec["files"],
        "pytest_add_cli_args_test_selection": tests,
        # every mutant is a pytest session with its own temporary directory (photo shards, tiny runs: hundreds
        # of MB each): remove them when the session ends, or a run of hundreds of mutants fills the disk
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-x", "-o", "tmp_path_retention_policy=none"],
        "process_isolation": "forkserver",  # torch is not fork-safe after use
        # a mutant's CPU-time limit is 2 x this x (its tests' time + 1 s); at mutmut's 15 a failing test's
        # fixture set-up (tiny models, configs) could hit it, and a timeout counts as killed
        "timeout_multiplier": 60.0,
        "also_copy": ["conf", "train.py", "eval.py", "docs"],  # tests compose the real configs, read docs/results.md
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    (scratch / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n".join(lines) + "\n")
    return scratch


# A mutant's pytest session leaves its temporary directory behind (mutmut ends the forked session before pytest
# removes it): hundreds of them, some with the 528 MB VGG-16 the loss tests write, filled a 250 GB disk and
# truncated mutmut's own records mid-run. Each target's sessions get their own temporary root, pruned of
# directories no session has touched for this long (longer than any one mutant's tests).
STALE_TMP_S = 5 * 60


def prune_temporary(root: Path, older_than_s: float = STALE_TMP_S) -> None:
    """Remove pytest's numbered session directories under `root` not modified for `older_than_s` seconds."""
    now = time.time()
    for session in root.glob("pytest-of-*/pytest-*"):
        try:
            if session.is_dir() and not session.is_symlink() and now - session.stat().st_mtime > older_than_s:
                shutil.rmtree(session, ignore_errors=True)
        except FileNotFoundError:
            continue


def mutmut(scratch: Path, *args: str) -> str:
    temporary = scratch / ".pytest-tmp"
    temporary.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTEST_DEBUG_TEMPROOT"] = str(temporary)  # pytest's root for tmp_path (pytest-of-<user>/pytest-N)
    with subprocess.Popen(
        [sys.executable, "-m", "mutmut", *args], cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as process:  # fmt: skip
        while True:
            try:
                stdout, stderr = process.communicate(timeout=60)
                break
            except subprocess.TimeoutExpired:
                prune_temporary(temporary)
    prune_temporary(temporary, older_than_s=0)
    if process.returncode not in (0, 1):
        raise SystemExit(f"mutmut {' '.join(args)} failed in {scratch}:\n{stderr[-3000:]}")
    return stdout


def collect(target: str, scratch: Path, repo: Path) -> dict:
    """Counts and surviving mutants (with their diffs) of `target` from mutmut's results.

    `score` is the raw score: killed (a timeout counts as killed) over every mutant that was run, "no tests"
    (no selected test reaches the mutated function) and "suspicious" included in the denominator.
    """
    patterns = TARGETS[target]["names"]
    statuses: dict[str, str] = {}
    for line in mutmut(scratch, "results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            statuses[name] = status
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    tested = sum(n for status, n in counts.items() if status not in ("not checked", "skipped"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    survivors = {name: mutmut(scratch, "show", name) for name, status in statuses.items() if status == "survived"}
    no_tests = sorted(name for name, status in statuses.items() if status == "no tests")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    from importlib.metadata import version

    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip() + ("+uncommitted" if dirty else ""),
        "mutmut": version("mutmut"),
        "files": TARGETS[target]["files"],
        "tests": TARGETS[target]["tests"],
        "counts": counts,
        "tested": tested,
        "killed": killed,
        "score": killed / tested if tested else None,
        "no_tests": no_tests,
        "survivors": survivors,
    }


def exit_codes(scratch: Path, target: str) -> dict[str, int | None]:
    """Every generated mutant of `target` and its recorded exit code (None: no result yet)."""
    codes = {}
    for meta in (scratch / "mutants").rglob("*.meta"):
        for name, exit_code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in TARGETS[target]["names"]):
                codes[name] = exit_code
    return codes


def pending(scratch: Path, target: str) -> list[str]:
    """The mutants of `target` mutmut has generated but holds no result for (an interrupted run's rest)."""
    return sorted(name for name, exit_code in exit_codes(scratch, target).items() if exit_code is None)


def sample(scratch: Path, target: str, count: int) -> list[str]:
    """`count` mutant names of `target`, chosen with a fixed seed (mutants are generated by a first,
    one-mutant run if they do not exist yet)."""
    import random

    def names() -> list[str]:
        out = mutmut(scratch, "results", "--all", "true").splitlines()
        found = [line.strip().rpartition(": ")[0] for line in out]
        return sorted(n for n in found if n and any(fnmatch.fnmatch(n, p) for p in TARGETS[target]["names"]))

    if not names():
        mutmut(scratch, "run", "--max-children", "1", TARGETS[target]["names"][0].rstrip("*") + "*__mutmut_1")
    everything = names()
    return random.Random(0).sample(everything, min(count, len(everything)))


def report(results: dict) -> str:
    lines = [
        "| target | mutants | killed (of them timed out) | survived | no tests | raw score |",
        "|---|---|---|---|---|---|",
    ]
    for target, result in results.items():
        score = "-" if result["score"] is None else f"{100 * result['score']:.1f} %"
        counts = result["counts"]
        survived, timeouts, none = counts.get("survived", 0), counts.get("timeout", 0), counts.get("no tests", 0)
        lines.append(
            f"| {target} | {result['tested']} | {result['killed']} ({timeouts}) | {survived} | {none} | {score} |"
        )
    return "\n".join(lines)


def write(out: Path, target: str, result: dict) -> None:
    """`<out>/<slug>.json` (counts, survivors' diffs) and `<slug>.survivors.diff` (the diffs alone, to read)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug(target)}.json").write_text(json.dumps({"target": target, **result}, indent=2) + "\n")
    diffs = "".join(f"# {name}\n{diff}\n" for name, diff in result["survivors"].items())
    (out / f"{slug(target)}.survivors.diff").write_text(diffs)


def read(out: Path) -> dict:
    results = {}
    for file in sorted(out.glob("*.json")):
        result = json.loads(file.read_text())
        results[result.pop("target")] = result
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"slugs or names (default: all): {[slug(t) for t in TARGETS]}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/unilip-mutation"))
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measurements" / "mutation")
    parser.add_argument("--report", action="store_true", help="only collect and print the last results")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to mutate (default: this one)")
    parser.add_argument("--before", action="store_true", help="use the tests of the suite before the unit tests")
    parser.add_argument("--sample", type=int, help="run only this many randomly chosen mutants per target")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="run the last run's survivors and untested mutants again (new tests); the other results are kept",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="run only the mutants without a result (an interrupted run, same sources and tests); the kept "
        "results count, as in a whole run",
    )
    args = parser.parse_args(argv)
    chosen = [t for t in TARGETS if not args.targets or t in args.targets or slug(t) in args.targets]
    results = read(args.out) if args.out.exists() else {}
    if args.report:  # the recorded results only: a target without a scratch copy here must not be re-counted
        print(report({target: result for target, result in results.items() if target in chosen}))
        return
    for target in chosen:
        tests = BEFORE_TESTS[target] if args.before else TARGETS[target]["tests"]
        scratch = prepare(target, args.work, args.repo.resolve(), tests)
        names = TARGETS[target]["names"]
        if args.sample and not args.report:
            names = sample(scratch, target, args.sample)
        if args.survivors:  # and the mutants no test reached (a test may reach them now)
            last = collect(target, scratch, args.repo)
            names = [*last["survivors"], *last["no_tests"]] or names
        if args.resume:
            # only a run regenerates the mutants of functions changed since (their results reset): with nothing
            # pending, rerun one killed mutant (quick) so that they exist, then run them
            killed = sorted(name for name, code in exit_codes(scratch, target).items() if code == 1)
            names = pending(scratch, target) or killed[:1]
            while names:
                mutmut(scratch, "run", "--max-children", str(args.max_children), *names)
                left = pending(scratch, target)
                names = [] if set(left) >= set(names) else left
        else:
            mutmut(scratch, "run", "--max-children", str(args.max_children), *names)
        results[target] = collect(target, scratch, args.repo)
        if args.sample:
            results[target]["sampled"] = args.sample
        write(args.out, target, results[target])
        print(report({target: results[target]}).splitlines()[-1], flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
