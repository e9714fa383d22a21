"""ImgEdit-Bench, basic suite (Ye et al. 2025): single-turn edits of 9 types, judged by GPT-4o (1-5).

Format (PKU-YuanGroup/ImgEdit, Benchmark/Basic/basic_bench_readme.md and basic_bench.py): input
`basic_edit.json` = {key: {"id": source image path under the originals' root, "prompt", "edit_type"}}
(the benchmark download's singleturn/singleturn.json has the same form, its images beside it); output one
edited image per key:

    images/<key>.png

`basic_bench.py --result_img_folder images --edit_json basic_edit.json --origin_img_root <originals>
--prompts_json <judge prompts>` writes images/result.json (the judge's answers; set the API key and
endpoint inside basic_bench.py's call_gpt, as its readme says); `step1_get_avgscore.py` averages each
answer's scores per image, `step2_typescore.py` per edit type. The overall score here is the mean over
images (and the mean of the type scores is reported beside it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

AVERAGES = f"{SCORES}/imgedit_average_score.json"
TYPES = f"{SCORES}/imgedit_typescore.json"


class ImgEdit(Benchmark):
    name = "imgedit"
    format_source = "PKU-YuanGroup/ImgEdit: Benchmark/Basic/basic_bench_readme.md, basic_bench.py, step1/step2"

    def __init__(
        self,
        prompts: str | None,
        images: str | None = None,
        judge_prompts: str | None = None,
        judge_model: str = "gpt-4o",
        workers: int = 32,
    ):
        self.prompts, self.images, self.judge_prompts, self.workers = prompts, images, judge_prompts, workers
        self.judge = f"{judge_model} (OpenAI-compatible API, ImgEdit basic_bench.py protocol)"

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts), "images": str(self._images_root())}

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
            jobs.append(
                SampleJob(
                    str(key), edit["prompt"], seed + index, (f"{IMAGES}/{key}.png",), source=str(root / edit["id"])
                )
            )
        if not any(Path(job.source).exists() for job in jobs):
            raise SamplingError(f"none of the source images is under images={root}; give the originals' root folder")
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        folder = checkout(scorer, "ImgEdit checkout", "Benchmark", "Basic")
        answers = out / IMAGES / "result.json"  # basic_bench.py writes it into the result folder
        judge_prompts = self.judge_prompts or "<ImgEdit judge prompts .json>"
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
            ScoreStep(bench, folder, (str(answers),)),
            ScoreStep(step1, folder, (str(out / AVERAGES),)),
            ScoreStep(step2, folder, (str(out / TYPES),)),
        ]

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
