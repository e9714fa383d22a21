"""WISE (Niu et al. 2025): world-knowledge-informed text-to-image, judged by GPT-4o (WiScore).

Format (PKU-YuanGroup/WISE, README.md "Usage Guide" and gpt_eval.py): input `data/cultural_common_sense.json`,
`data/spatio-temporal_reasoning.json`, `data/natural_science.json`, lists of {"prompt_id", "Prompt",
"Explanation", "Subcategory", ...}; output one image per prompt:

    images/<prompt_id>.png          1 ... 1000

`gpt_eval.py --json_path <file> --image_dir images --model gpt-4o-2024-05-13 --api_key ...` writes, per
file, a JSONL of consistency / realism / aesthetic_quality (0-2; 999 when the judge failed). WiScore per
image = (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2; categories as the repository's scripts assign
them (wise_space-time.py: "Longitudinal time" / "Horizontal time" subcategories are Time, the rest Space;
wise_science.py: prompt ids 701-800 Biology, 801-900 Physics, 901-1000 Chemistry); overall = 0.4 Cultural
+ 0.167 Time + 0.133 Space + 0.1 Biology + 0.1 Physics + 0.1 Chemistry (README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

FILES = ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science")  # the reference's order
WEIGHTS = {"Cultural": 0.4, "Time": 0.167, "Space": 0.133, "Biology": 0.1, "Physics": 0.1, "Chemistry": 0.1}
TIME_SUBCATEGORIES = ("Longitudinal time", "Horizontal time")
FAILED = 999


def scores_file(out: Path, name: str) -> Path:
    return out / SCORES / "wise" / f"{name}_scores_results.jsonl"


class WISE(Benchmark):
    name = "wise"
    format_source = "PKU-YuanGroup/WISE: README.md (usage guide), gpt_eval.py, wise_science.py, wise_space-time.py"

    def __init__(self, prompts: str | None, judge_model: str = "gpt-4o-2024-05-13", workers: int = 32):
        self.prompts = prompts
        self.judge_model = judge_model
        self.workers = workers
        self.judge = f"{judge_model} (OpenAI API, WISE gpt_eval.py protocol)"

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts)}

    def _folder(self) -> Path:
        folder = existing_file(self.prompts, "prompts", "WISE's data folder (cultural_common_sense.json, ...)")
        missing = [f"{name}.json" for name in FILES if not (folder / f"{name}.json").is_file()]
        if missing:
            raise SamplingError(f"prompts={folder} lacks {', '.join(missing)}; give WISE's data folder")
        return folder

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        folder, jobs, seen = self._folder(), [], set()
        for name in FILES:
            try:
                items = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise SamplingError(f"{folder / name}.json is not JSON ({error})") from None
            for item in items:
                if not isinstance(item, dict) or "prompt_id" not in item or "Prompt" not in item:
                    raise SamplingError(f'{folder / name}.json: every item needs "prompt_id" and "Prompt"')
                key = str(item["prompt_id"])
                if key in seen:
                    raise SamplingError(f"{folder / name}.json: prompt_id {key} appears twice")
                seen.add(key)
                jobs.append(SampleJob(key, item["Prompt"], seed + len(jobs), (f"{IMAGES}/{key}.png",)))
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        folder, root, steps = Path(str(self.prompts)), checkout(scorer, "WISE checkout"), []
        for name in FILES:
            results = out / SCORES / "wise"
            argv = (
                python, "gpt_eval.py",
                "--json_path", str(folder / f"{name}.json"),
                "--output_dir", str(results / name),
                "--image_dir", str(out / IMAGES),
                "--api_key", "${OPENAI_API_KEY}",
                "--model", self.judge_model,
                "--result_full", str(results / f"{name}_full_results.json"),
                "--result_scores", str(scores_file(out, name)),
                "--max_workers", str(self.workers),
            )  # fmt: skip
            steps.append(ScoreStep(argv, root, (str(scores_file(out, name)),), env=("OPENAI_API_KEY",)))
        return steps

    def collect(self, out: Path) -> dict[str, Any] | None:
        files = {name: scores_file(out, name) for name in FILES}
        if not all(path.exists() for path in files.values()):
            return None
        by_category: dict[str, list[float]] = {category: [] for category in WEIGHTS}
        failed = 0
        for name, path in files.items():
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                values = [record["consistency"], record["realism"], record["aesthetic_quality"]]
                if FAILED in values:
                    failed += 1
                    continue
                wiscore = (0.7 * values[0] + 0.2 * values[1] + 0.1 * values[2]) / 2
                by_category[_category(name, record)].append(wiscore)
        categories = {category: mean(scores) for category, scores in by_category.items()}
        complete = all(value is not None for value in categories.values())
        overall = sum(WEIGHTS[c] * categories[c] for c in WEIGHTS) if complete else None
        return {
            "overall": overall,
            "categories": categories,
            "images": sum(len(v) for v in by_category.values()),
            "judge_failures": failed,
            "rule": "WiScore = (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2; overall = 0.4 Cultural + "
            "0.167 Time + 0.133 Space + 0.1 (Biology + Physics + Chemistry) (WISE README.md)",
        }


def _category(file: str, record: dict[str, Any]) -> str:
    if file == "cultural_common_sense":
        return "Cultural"
    if file == "spatio-temporal_reasoning":
        return "Time" if record.get("Subcategory") in TIME_SUBCATEGORIES else "Space"
    prompt_id = int(record["prompt_id"])
    return "Biology" if prompt_id <= 800 else "Physics" if prompt_id <= 900 else "Chemistry"
