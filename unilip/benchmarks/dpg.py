"""DPG-Bench (ELLA, Hu et al. 2024): dense-prompt alignment, scored by a VQA model on generated questions.

Format (TencentQQGYLab/ELLA, README.md "DPG-Bench" and dpg_bench/compute_dpg_bench.py): input
`dpg_bench/prompts/<item_id>.txt`, one prompt per file; output one PNG per prompt with the prompt's file
name, holding 4 samples of `size` px as a 2 x 2 grid (sample 0 top left, 1 top right, 2 bottom left):

    images/<item_id>.png            (2 size) x (2 size)

`compute_dpg_bench.py --image-root-path images --resolution <size> --pic-num 4 --vqa-model mplug` crops
the 4 samples back out, asks mPLUG-large the questions of dpg_bench/dpg_bench.csv about each and writes
the per-image scores and the "DPG-Bench score" (mean over images, in percent) to --res-path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file
from unilip.benchmarks.scorers import Pin
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

RESULTS = f"{SCORES}/dpg_results.txt"


class DPGBench(Benchmark):
    name = "dpg"
    format_source = "TencentQQGYLab/ELLA: README.md (DPG-Bench), dpg_bench/compute_dpg_bench.py"
    judge = "mPLUG-large VQA (ModelScope damo/mplug_visual-question-answering_coco_large_en)"
    pin = Pin(
        "TencentQQGYLab/ELLA",
        "3c228f1dc6c4d3cad0a47493816151a419f14db3",
        ("dpg_bench/compute_dpg_bench.py", "dpg_bench/dpg_bench.csv"),
    )

    def __init__(self, prompts: str | None):
        self.prompts = prompts

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts)}

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        folder = existing_file(self.prompts, "prompts", "DPG-Bench's dpg_bench/prompts folder of <item_id>.txt files")
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise SamplingError(f"prompts={folder} holds no .txt prompt files; give ELLA's dpg_bench/prompts folder")
        jobs = []
        for index, file in enumerate(files):
            prompt = " ".join(file.read_text(encoding="utf-8").split())
            if not prompt:
                raise SamplingError(f"{file} is empty")
            jobs.append(SampleJob(file.stem, prompt, seed + index, (f"{IMAGES}/{file.stem}.png",), 4, grid=True))
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        argv = (
            python,
            "dpg_bench/compute_dpg_bench.py",
            "--image-root-path",
            str(out / IMAGES),
            "--resolution",
            str(size),
            "--pic-num",
            "4",
            "--vqa-model",
            "mplug",
            "--res-path",
            str(out / RESULTS),
        )
        return [ScoreStep(argv, checkout(scorer, "ELLA checkout"), (str(out / RESULTS),), check=lambda: _unscored(out))]

    def collect(self, out: Path) -> dict[str, Any] | None:
        path = out / RESULTS
        if not path.exists():
            return None
        text = path.read_text()
        overall = re.search(r"DPG-Bench score: ([0-9.eE+-]+)", text)
        if overall is None:
            return None  # the scorer has not finished (it writes the summary last)
        categories, in_l1 = {}, False  # the tab-indented "name: value" lines under "L1 category scores:"
        for line in text.splitlines():
            if not line.startswith("\t"):
                in_l1 = line.startswith("L1 category scores")
            elif in_l1 and ": " in line:
                name, value = line.strip().rsplit(": ", 1)
                categories[name] = float(value)
        root = str(out / IMAGES)
        scored = sum(1 for line in text.splitlines() if line.startswith(root))
        grids = sum(1 for path in (out / IMAGES).iterdir() if path.is_file()) if (out / IMAGES).is_dir() else scored
        return {"overall": float(overall.group(1)), "categories": categories, "images": scored,
                "unscored": grids - scored, "unit": "percent"}  # fmt: skip


def _unscored(out: Path) -> str | None:
    """A result file older than a grid (written before it was made), or without its closing summary (the
    scorer stopped). Grids it failed on are the official scorer's own rule (it prints "Failed filename" and
    leaves them out, e.g. any whose questions depend on the csv's first row, which prepare_dpg_data skips):
    `collect` reports how many grids the score covers."""
    path = out / RESULTS
    newest = max((p.stat().st_mtime_ns for p in (out / IMAGES).iterdir() if p.is_file()), default=0)
    if path.stat().st_mtime_ns < newest:
        return f"{path} is older than the newest grid in {out / IMAGES}"
    if "DPG-Bench score:" not in path.read_text():
        return f"{path} has no DPG-Bench score line"
    return None
