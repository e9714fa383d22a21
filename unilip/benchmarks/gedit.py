"""GEdit-Bench (Step1X-Edit, Liu et al. 2025): real-world edit instructions in 11 groups, judged by VIEScore.

Format (stepfun-ai/Step1X-Edit, GEdit-Bench/EVAL.md, generate_image_example.py and test_gedit_score.py):
input the `stepfun-ai/GEdit-Bench` dataset (parquet, split "train": task_type, key, instruction,
instruction_language, input_image, input_image_raw, Intersection_exist), read from a local copy
(`hf download --repo-type dataset stepfun-ai/GEdit-Bench --local-dir ...`); output one image per row:

    images/<model_name>/fullset/<task_type>/<instruction_language>/<key>.png

The sources are `input_image_raw`, extracted once to sources/. `test_gedit_score.py --model_name <model_name>
--edited_images_dir images --save_dir scores/gedit --backbone gpt4o|qwen25vl` writes one CSV per group
(semantics and quality, 0-10); as calculate_statistics.py does, per image overall = sqrt(semantics x
quality), each group is averaged, and the scores are the means over groups, per instruction language.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.pipelines.manifest import TEMP_PREFIX, SamplingError
from unilip.pipelines.sampling import SampleJob

GROUPS = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)  # fmt: skip
JUDGES = {
    "gpt4o": "GPT-4.1 (VIEScore backbone gpt4o, OpenAI API)",
    "qwen25vl": "Qwen2.5-VL-72B-Instruct-AWQ (VIEScore backbone qwen25vl, local)",
}
SOURCES = "sources/gedit"


class GEditBench(Benchmark):
    name = "gedit"
    format_source = "stepfun-ai/Step1X-Edit: GEdit-Bench/EVAL.md, generate_image_example.py, test_gedit_score.py"

    def __init__(self, prompts: str | None, language: str = "all", model_name: str = "unilip", backbone: str = "gpt4o"):
        if language not in ("all", "en", "cn"):
            raise SamplingError(f"benchmark.language={language!r}: use all, en or cn")
        if backbone not in JUDGES:
            raise SamplingError(f"benchmark.backbone={backbone!r}: use one of {sorted(JUDGES)}")
        self.prompts, self.language, self.model_name, self.backbone = prompts, language, model_name, backbone
        self.judge = JUDGES[backbone]
        self._dataset = None
        self._rows: dict[str, int] = {}

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts), "language": self.language}

    def _load(self):
        if self._dataset is None:
            folder = existing_file(self.prompts, "prompts", "a local copy of the stepfun-ai/GEdit-Bench dataset")
            try:
                import datasets
            except ImportError:
                raise SamplingError("GEdit-Bench is read with the datasets package: pip install datasets") from None
            files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else [str(folder)]
            if files and files[0].endswith(".parquet"):
                self._dataset = datasets.Dataset.from_parquet(files)
            else:
                self._dataset = datasets.load_from_disk(str(folder))
            needed = {"task_type", "key", "instruction", "instruction_language", "input_image_raw"}
            if not needed <= set(self._dataset.column_names):
                raise SamplingError(f"prompts={folder} lacks GEdit-Bench columns {sorted(needed)}")
        return self._dataset

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        table = self._load().select_columns(["task_type", "key", "instruction", "instruction_language"])
        jobs, self._rows = [], {}
        for row, item in enumerate(table):
            language = item["instruction_language"]
            if self.language != "all" and language != self.language:
                continue
            name = f"{item['task_type']}/{language}/{item['key']}"
            if name in self._rows:
                raise SamplingError(f"prompts: {name} appears twice in the dataset")
            self._rows[name] = row
            output = f"{IMAGES}/{self.model_name}/fullset/{name}.png"
            jobs.append(
                SampleJob(
                    name, item["instruction"], seed + len(jobs), (output,), source=str(out / SOURCES / f"{name}.png")
                )
            )
        if not jobs:
            raise SamplingError(f"prompts={self.prompts} has no rows in language {self.language!r}")
        return jobs

    def prepare(self, out: Path, jobs: Sequence[SampleJob]) -> None:
        """Extract the shard's source images (input_image_raw) to sources/, once."""
        dataset = self._load()
        for job in jobs:
            path = Path(job.source)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(TEMP_PREFIX + path.name)
                dataset[self._rows[job.key]]["input_image_raw"].convert("RGB").save(temporary, format="PNG")
                temporary.replace(path)

    def _csv_folder(self, out: Path) -> Path:
        return out / SCORES / "gedit" / self.model_name / self.backbone

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        argv = (
            python, "test_gedit_score.py",
            "--model_name", self.model_name,
            "--edited_images_dir", str(out / IMAGES),
            "--instruction_language", self.language,
            "--save_dir", str(out / SCORES / "gedit"),
            "--backbone", self.backbone,
        )  # fmt: skip
        csvs = tuple(
            str(self._csv_folder(out) / f"{self.model_name}_{g}_{self.language}_vie_score.csv") for g in GROUPS
        )
        env = ("OPENAI_API_KEY",) if self.backbone == "gpt4o" else ()
        return [ScoreStep(argv, checkout(scorer, "Step1X-Edit checkout", "GEdit-Bench"), csvs, env=env)]

    def collect(self, out: Path) -> dict[str, Any] | None:
        folder = self._csv_folder(out)
        files = {g: folder / f"{self.model_name}_{g}_{self.language}_vie_score.csv" for g in GROUPS}
        if not all(path.exists() for path in files.values()):
            return None
        per_language: dict[str, dict[str, dict[str, list[float]]]] = {}
        for group, path in files.items():
            with path.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    semantics, quality = float(row["sementics_score"]), float(row["quality_score"])
                    scores = per_language.setdefault(row["instruction_language"], {}).setdefault(
                        group, {"semantics": [], "quality": [], "overall": []}
                    )
                    scores["semantics"].append(semantics)
                    scores["quality"].append(quality)
                    scores["overall"].append(math.sqrt(semantics * quality))
        summary = {}
        for language, groups in per_language.items():
            means = {g: {k: mean(v) for k, v in s.items()} for g, s in groups.items()}
            summary[language] = {
                "G_SC": mean([m["semantics"] for m in means.values()]),
                "G_PQ": mean([m["quality"] for m in means.values()]),
                "G_O": mean([m["overall"] for m in means.values()]),
                "groups": means,
            }
        return {
            "overall": (summary.get("en") or next(iter(summary.values()), {})).get("G_O"),
            "languages": summary,
            "rule": "per image overall = sqrt(semantics x quality); per group means; G_* = mean over groups "
            "(calculate_statistics.py); overall = English G_O",
        }
