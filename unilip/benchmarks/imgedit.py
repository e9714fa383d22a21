"""ImgEdit-Bench, basic suite (Ye et al. 2025): single-turn edits of 9 types, judged by GPT-4o (1-5).

Format (PKU-YuanGroup/ImgEdit, Benchmark/Basic/basic_bench_readme.md and basic_bench.py): input
`basic_edit.json` = {key: {"id": source image path under the originals' root, "prompt", "edit_type"}}
(the benchmark download's singleturn/singleturn.json has the same form, its images beside it); output one
edited image per key:

    images/<key>.png

`basic_bench.py --result_img_folder images --edit_json basic_edit.json --origin_img_root <originals>
--prompts_json Benchmark/Basic/prompts.json` writes images/result.json (the judge's answers; set the API key
and endpoint inside basic_bench.py's call_gpt, as its readme says; an edit whose call fails gets
{"error": ...}); `step1_get_avgscore.py` averages each answer's scores per image, `step2_typescore.py` per
edit type. The overall score here is the mean over images (and the mean of the type scores is reported
beside it).

The sources keep their aspect ratio, and the judge sees source and edit side by side: with
`aspect=source` (the default) each edit is generated at its source's aspect ratio (about as many latent
tokens as `sampler.size` squared); `aspect=square` generates `sampler.size` squared, as the UniLIP
reference's eval/ImgEdit/imgedit.py does (its paper numbers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.benchmarks.scorers import Pin
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

AVERAGES = f"{SCORES}/imgedit_average_score.json"
TYPES = f"{SCORES}/imgedit_typescore.json"
BASIC = "Benchmark/Basic"
ASPECTS = ("source", "square")


class ImgEdit(Benchmark):
    name = "imgedit"
    format_source = "PKU-YuanGroup/ImgEdit: Benchmark/Basic/basic_bench_readme.md, basic_bench.py, step1/step2"
    pin = Pin(
        "PKU-YuanGroup/ImgEdit",
        "547185d12c08267a862b94248576e1746e479937",
        tuple(
            f"{BASIC}/{name}"
            for name in ("basic_bench.py", "step1_get_avgscore.py", "step2_typescore.py", "prompts.json")
        ),
    )

    def __init__(
        self,
        prompts: str | None,
        images: str | None = None,
        judge_prompts: str | None = None,
        judge_model: str = "gpt-4o",
        workers: int = 32,
        aspect: str = "source",
    ):
        if aspect not in ASPECTS:
            raise SamplingError(f"benchmark.aspect={aspect!r}: use source or square")
        self.prompts, self.images, self.judge_prompts, self.workers = prompts, images, judge_prompts, workers
        self.aspect = aspect
        self.judge = f"{judge_model} (OpenAI-compatible API, ImgEdit basic_bench.py protocol)"

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts), "images": str(self._images_root()), "aspect": self.aspect}

    def _images_root(self) -> Path:
        return Path(self.images) if self.images else Path(str(self.prompts)).parent

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        path = existing_file(self.prompts, "prompts", "ImgEdit's basic_edit.json (or singleturn.json)")
        root = existing_file(str(self._images_root()), "images", "the folder of ImgEdit's original images")
        try:
            edits = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise SamplingError(f"prompts={path} is not JSON ({error})") from None
        if not isinstance(edits, dict) or not edits:
            raise SamplingError(f"prompts={path} is not a {{key: {{id, prompt, edit_type}}}} object")
        jobs = []
        for index, (key, edit) in enumerate(edits.items()):
            if not isinstance(edit, dict) or not {"id", "prompt"} <= set(edit):
                raise SamplingError(f'{path}: entry {key} needs "id" and "prompt"')
            output = (f"{IMAGES}/{key}.png",)
            source = str(root / edit["id"])
            keep = self.aspect == "source"
            jobs.append(SampleJob(str(key), edit["prompt"], seed + index, output, source=source, keep_aspect=keep))
        if not any(Path(job.source).exists() for job in jobs):
            raise SamplingError(f"none of the source images is under images={root}; give the originals' root folder")
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        folder = checkout(scorer, "ImgEdit checkout", BASIC)
        answers = out / IMAGES / "result.json"  # basic_bench.py writes it into the result folder
        judge_prompts = self.judge_prompts or str(Path(folder, "prompts.json"))
        bench = (
            python, "basic_bench.py",
            "--result_img_folder", str(out / IMAGES),
            "--edit_json", str(Path(str(self.prompts)).resolve()),
            "--origin_img_root", str(self._images_root().resolve()),
            "--num_processes", str(self.workers),
            "--prompts_json", judge_prompts,
        )  # fmt: skip
        step1 = (
            python,
            "step1_get_avgscore.py",
            "--result_json",
            str(answers),
            "--average_score_json",
            str(out / AVERAGES),
        )
        step2 = (
            python, "step2_typescore.py",
            "--average_score_json", str(out / AVERAGES),
            "--basic_edit", str(Path(str(self.prompts)).resolve()),
            "--typescore_json", str(out / TYPES),
        )  # fmt: skip
        return [
            ScoreStep(bench, folder, (str(answers),), check=lambda: self._unjudged(out)),
            ScoreStep(step1, folder, (str(out / AVERAGES),), check=lambda: _older(out / AVERAGES, answers)),
            ScoreStep(step2, folder, (str(out / TYPES),), check=lambda: _older(out / TYPES, out / AVERAGES)),
        ]

    def _unjudged(self, out: Path) -> str | None:
        """Edits with an image but no judge's answer in result.json (basic_bench.py records a failed call as
        {"error": ...}, which step1_get_avgscore.py cannot read)."""
        path = out / IMAGES / "result.json"
        try:
            answers = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # basic_bench.py writes it in place at the end: a killed run leaves it cut short
            return f"{path} is not valid JSON"
        edits = json.loads(Path(str(self.prompts)).read_text(encoding="utf-8"))
        imaged = [key for key in edits if (out / IMAGES / f"{key}.png").exists()]
        failed = [key for key in imaged if not isinstance(answers.get(key), str)]
        if failed:
            first = answers.get(failed[0])
            reason = first.get("error") if isinstance(first, dict) else "no answer"
            return (
                f"the judge failed on {len(failed)} of {len(imaged)} edits (first, {failed[0]}: {reason}); fix the "
                "call (API key and endpoint in basic_bench.py's call_gpt) and run again: it judges every edit anew"
            )
        return None

    def collect(self, out: Path) -> dict[str, Any] | None:
        if not (out / AVERAGES).exists() or not (out / TYPES).exists():
            return None
        averages = json.loads((out / AVERAGES).read_text())
        types = json.loads((out / TYPES).read_text())
        return {
            "overall": mean([float(v) for v in averages.values()]),
            "mean_of_types": mean([float(v) for v in types.values()]),
            "types": types,
            "images": len(averages),
            "rule": "per image: mean of the judge's three 1-5 scores (step1_get_avgscore.py); overall: mean over "
            "images; types: step2_typescore.py",
        }


def _older(made: Path, source: Path) -> str | None:
    """`made` predates the file it is computed from (an earlier judge run's): it must be made again."""
    if source.exists() and made.stat().st_mtime_ns < source.stat().st_mtime_ns:
        return f"{made} is older than {source}"
    return None
