"""GEdit-Bench (Step1X-Edit, Liu et al. 2025): real-world edit instructions in 11 groups, judged by VIEScore.

Format (stepfun-ai/Step1X-Edit, GEdit-Bench/EVAL.md and run_gedit_score.py, the scorer EVAL.md names since
June 2025; the older test_gedit_score.py and its `<key>_SRCIMG.png` files are gone upstream): input the
`stepfun-ai/GEdit-Bench` dataset (parquet, split "train": task_type, key, instruction, instruction_language,
input_image, input_image_raw, Intersection_exist), read from a local copy (`hf download --repo-type dataset
stepfun-ai/GEdit-Bench --local-dir ...`); output one image per row:

    images/<model_name>/fullset/<task_type>/<instruction_language>/<key>.png

The sources are `input_image_raw`, extracted once to sources/. `run_gedit_score.py --model_name <model_name>
--edited_images_dir images --instruction_language all --save_dir scores/gedit --backbone gpt4o|qwen25vl` (which
reads the dataset through the Hugging Face cache, and the OpenAI key from the first line of GEdit-Bench/secret.env)
writes one CSV per group (semantics and quality, 0-10); as calculate_statistics.py does, per image overall =
sqrt(semantics x quality), each group is averaged, and the scores are the means over groups, per instruction
language (and over the rows with Intersection_exist).

The judge sees source and edit each resized to about 512 x 512 pixels at its own aspect ratio, and the
benchmark's reference inference (generate_image_example.py) edits at the source's aspect ratio: with
`aspect=source` (the default) each edit is generated at its source's aspect ratio with about as many latent
tokens as `sampler.size` squared; `aspect=square` generates `sampler.size` squared.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.benchmarks.scorers import Pin
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
FOLDER = "GEdit-Bench"


class GEditBench(Benchmark):
    name = "gedit"
    format_source = "stepfun-ai/Step1X-Edit: GEdit-Bench/EVAL.md, run_gedit_score.py, calculate_statistics.py"
    pin = Pin(
        "stepfun-ai/Step1X-Edit",
        "95feaea4c43b6dc69e9a2766dabd16976bbafcdc",
        tuple(f"{FOLDER}/{name}" for name in ("run_gedit_score.py", "calculate_statistics.py", "viescore/__init__.py")),
    )

    def __init__(
        self,
        prompts: str | None,
        language: str = "all",
        model_name: str = "unilip",
        backbone: str = "gpt4o",
        aspect: str = "source",
    ):
        if language not in ("all", "en", "cn"):
            raise SamplingError(f"benchmark.language={language!r}: use all, en or cn")
        if backbone not in JUDGES:
            raise SamplingError(f"benchmark.backbone={backbone!r}: use one of {sorted(JUDGES)}")
        if aspect not in ("source", "square"):
            raise SamplingError(f"benchmark.aspect={aspect!r}: use source or square")
        self.prompts, self.language, self.model_name, self.backbone = prompts, language, model_name, backbone
        self.aspect = aspect
        self.judge = JUDGES[backbone]
        self._dataset = None
        self._rows: dict[str, int] = {}

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts), "language": self.language, "aspect": self.aspect}

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
            source, keep = str(out / SOURCES / f"{name}.png"), self.aspect == "source"
            jobs.append(
                SampleJob(name, item["instruction"], seed + len(jobs), (output,), source=source, keep_aspect=keep)
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

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        argv = (
            python, "run_gedit_score.py",
            "--model_name", self.model_name,
            "--edited_images_dir", str(out / IMAGES),
            "--instruction_language", self.language,
            "--save_dir", str(out / SCORES / "gedit"),
            "--backbone", self.backbone,
        )  # fmt: skip
        folder = checkout(scorer, "Step1X-Edit checkout", FOLDER)
        key = str(Path(folder, "secret.env")) if self.backbone == "gpt4o" and scorer else None
        csvs = tuple(map(str, self._csvs(out).values()))
        return [ScoreStep(argv, folder, csvs, key_file=key, check=lambda: self._unscored(out))]

    def _csvs(self, out: Path) -> dict[str, Path]:
        folder = out / SCORES / "gedit" / self.model_name / self.backbone
        return {g: folder / f"{self.model_name}_{g}_{self.language}_vie_score.csv" for g in GROUPS}

    def _unscored(self, out: Path) -> str | None:
        """Edits on disk without a row in their group's CSV (the judge failed, or the CSV predates them:
        run_gedit_score.py skips a group whose CSV exists)."""
        images = out / IMAGES / self.model_name / "fullset"
        short = []
        for group, path in self._csvs(out).items():
            expected = sum(1 for _ in (images / group).glob("*/*.png"))
            with path.open(newline="", encoding="utf-8") as handle:
                rows = sum(1 for _ in csv.DictReader(handle))
            if rows < expected:
                short.append(f"{path.name} ({rows} of {expected})")
        if short:
            return (
                f"edits without a score in {', '.join(short)}; delete those CSVs and run again (run_gedit_score.py "
                "skips a group whose CSV exists)"
            )
        return None

    def collect(self, out: Path) -> dict[str, Any] | None:
        files = self._csvs(out)
        if not all(path.exists() for path in files.values()):
            return None
        rows: dict[str, dict[str, list[tuple[float, float, bool]]]] = {}  # language -> group -> rows
        for group, path in files.items():
            with path.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    semantics, quality = float(row["sementics_score"]), float(row["quality_score"])
                    in_intersection = row["intersection_exist"] == "True"
                    rows.setdefault(row["instruction_language"], {}).setdefault(group, []).append(
                        (semantics, quality, in_intersection)
                    )
        summary = {}
        for language, groups in rows.items():
            summary[language] = {
                **_group_means({g: groups.get(g, []) for g in GROUPS}),
                "intersection": _group_means({g: [r for r in groups.get(g, []) if r[2]] for g in GROUPS}),
            }
        return {
            "overall": (summary.get("en") or {}).get("G_O"),
            "languages": summary,
            "rule": "per image overall = sqrt(semantics x quality); per group means; G_* = mean over the 11 groups, "
            "none while a group has no row (calculate_statistics.py); overall = English G_O",
        }


def _group_means(groups: dict[str, list[tuple[float, float, bool]]]) -> dict[str, Any]:
    """calculate_statistics.py's aggregation: per group the means of semantics, quality and sqrt(semantics x
    quality); G_SC, G_PQ, G_O the means over all groups (None where a group has no rows: its mean is NaN there)."""
    means = {
        group: {
            "semantics": mean([r[0] for r in scored]),
            "quality": mean([r[1] for r in scored]),
            "overall": mean([math.sqrt(r[0] * r[1]) for r in scored]),
        }
        for group, scored in groups.items()
    }
    complete = all(scored for scored in groups.values())
    return {
        "G_SC": mean([m["semantics"] for m in means.values()]) if complete else None,
        "G_PQ": mean([m["quality"] for m in means.values()]) if complete else None,
        "G_O": mean([m["overall"] for m in means.values()]) if complete else None,
        "groups": {group: m for group, m in means.items() if groups[group]},
    }
