"""WISE (Niu et al. 2025): world-knowledge-informed text-to-image, judged by GPT-4o (WiScore).

Format (PKU-YuanGroup/WISE; since upstream commit d6bfe42 the original benchmark lives under `WISE_legacy/`:
README.md "Usage Guide", gpt_eval.py, Calculate.py): input `WISE_legacy/data/cultural_common_sense.json`,
`spatio-temporal_reasoning.json`, `natural_science.json`, lists of {"prompt_id", "Prompt", "Explanation",
"Subcategory", ...}; output one image per prompt:

    images/<prompt_id>.png          1 ... 1000

`gpt_eval.py --json_path <file> --image_dir images --model gpt-4o-2024-05-13 --api_key ...` writes, per file, a
JSONL of consistency / realism / aesthetic_quality (0-2); a prompt whose answer it cannot parse after three tries
is left out (a rerun judges only the missing ones). As Calculate.py computes it: WiScore per image = (0.7
consistency + 0.2 realism + 0.1 aesthetic) / 2; categories by prompt id (1-400 Cultural, 401-567 Time, 568-700
Space, 701-800 Biology, 801-900 Physics, 901-1000 Chemistry); overall = 0.4 Cultural + 0.167 Time + 0.133 Space
+ 0.1 Biology + 0.1 Physics + 0.1 Chemistry, and only when every prompt id has a score (`--category all`
refuses an overall otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.benchmarks.scorers import Pin
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

FILES = ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science")  # the reference's order
WEIGHTS = {"Cultural": 0.4, "Time": 0.167, "Space": 0.133, "Biology": 0.1, "Physics": 0.1, "Chemistry": 0.1}
LAST_ID = {"Cultural": 400, "Time": 567, "Space": 700, "Biology": 800, "Physics": 900, "Chemistry": 1000}
LEGACY = "WISE_legacy"  # where gpt_eval.py, Calculate.py and data/ live since d6bfe42


def scores_file(out: Path, name: str) -> Path:
    return out / SCORES / "wise" / f"{name}_scores_results.jsonl"


class WISE(Benchmark):
    name = "wise"
    format_source = "PKU-YuanGroup/WISE: WISE_legacy/README.md (usage guide), gpt_eval.py, Calculate.py"
    pin = Pin(
        "PKU-YuanGroup/WISE",
        "eb51174483a5de2e34e8614cf9dfb3319ee7fcd0",
        (f"{LEGACY}/gpt_eval.py", f"{LEGACY}/Calculate.py"),
    )

    def __init__(self, prompts: str | None, judge_model: str = "gpt-4o-2024-05-13", workers: int = 32):
        self.prompts = prompts
        self.judge_model = judge_model
        self.workers = workers
        self.judge = f"{judge_model} (OpenAI API, WISE gpt_eval.py protocol)"

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts)}

    def _folder(self) -> Path:
        hint = f"WISE's {LEGACY}/data folder (cultural_common_sense.json, ...; there since upstream commit d6bfe42)"
        folder = existing_file(self.prompts, "prompts", hint)
        missing = [f"{name}.json" for name in FILES if not (folder / f"{name}.json").is_file()]
        if missing:
            raise SamplingError(f"prompts={folder} lacks {', '.join(missing)}; give {hint}")
        return folder

    def _items(self) -> dict[str, list[dict[str, Any]]]:
        folder, items = self._folder(), {}
        for name in FILES:
            try:
                items[name] = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise SamplingError(f"{folder / name}.json is not JSON ({error})") from None
        return items

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        jobs, seen = [], set()
        for name, items in self._items().items():
            for item in items:
                if not isinstance(item, dict) or "prompt_id" not in item or "Prompt" not in item:
                    raise SamplingError(f'{self.prompts}/{name}.json: every item needs "prompt_id" and "Prompt"')
                key = str(item["prompt_id"])
                if key in seen:
                    raise SamplingError(f"{self.prompts}/{name}.json: prompt_id {key} appears twice")
                seen.add(key)
                jobs.append(SampleJob(key, item["Prompt"], seed + len(jobs), (f"{IMAGES}/{key}.png",)))
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        folder, root, steps = Path(str(self.prompts)), checkout(scorer, "WISE checkout", LEGACY), []
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
            steps.append(
                ScoreStep(
                    argv,
                    root,
                    (str(scores_file(out, name)),),
                    env=("OPENAI_API_KEY",),
                    check=lambda name=name: self._unjudged(out, name),
                    label=f"gpt_eval.py {name}",
                )
            )
        return steps

    def _unjudged(self, out: Path, name: str) -> str | None:
        """Prompts of `name` with an image but no score: the judge's answer could not be parsed."""
        ids = {int(item["prompt_id"]) for item in self._items()[name]}
        imaged = {i for i in ids if (out / IMAGES / f"{i}.png").exists()}
        missing = sorted(imaged - set(_read_scores(scores_file(out, name))))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            return (
                f"the judge gave no score for {len(missing)} of {len(imaged)} prompts (ids {shown}); run the same "
                "command again to judge them (gpt_eval.py keeps the scores it has)"
            )
        return None

    def collect(self, out: Path) -> dict[str, Any] | None:
        files = {name: scores_file(out, name) for name in FILES}
        if not all(path.exists() for path in files.values()):
            return None
        by_category: dict[str, list[float]] = {category: [] for category in WEIGHTS}
        present: set[int] = set()
        for path in files.values():
            for prompt_id, values in _read_scores(path).items():
                present.add(prompt_id)
                if values is not None and _category(prompt_id) is not None:
                    wiscore = (0.7 * values[0] + 0.2 * values[1] + 0.1 * values[2]) / 2
                    by_category[_category(prompt_id)].append(wiscore)
        expected = {int(item["prompt_id"]) for items in self._items().values() for item in items}
        missing = sorted(expected - present)
        categories = {category: mean(scores) for category, scores in by_category.items()}
        complete = not missing and all(value is not None for value in categories.values())
        return {
            "overall": sum(WEIGHTS[c] * categories[c] for c in WEIGHTS) if complete else None,
            "categories": categories,
            "images": sum(len(v) for v in by_category.values()),
            "missing_prompt_ids": len(missing),
            "rule": "WiScore = (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2; overall = 0.4 Cultural + "
            "0.167 Time + 0.133 Space + 0.1 (Biology + Physics + Chemistry), only when every prompt id has a "
            "score (WISE_legacy/Calculate.py --category all)",
        }


def _read_scores(path: Path) -> dict[int, tuple[float, float, float] | None]:
    """prompt id -> (consistency, realism, aesthetic quality), None where a value is not a number (Calculate.py
    counts such a line's id as present but skips its score)."""
    scores: dict[int, tuple[float, float, float] | None] = {}
    if not path.exists():
        return scores
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # Calculate.py skips a line that is not JSON
        prompt_id = record.get("prompt_id")
        if not isinstance(prompt_id, int):
            continue
        values = [record.get(k) for k in ("consistency", "realism", "aesthetic_quality")]
        numeric = all(isinstance(v, (int, float)) for v in values)
        scores[prompt_id] = tuple(float(v) for v in values) if numeric else None
    return scores


def _category(prompt_id: int) -> str | None:
    """Calculate.py's ranges of prompt ids."""
    if prompt_id < 1:
        return None
    return next((category for category, last in LAST_ID.items() if prompt_id <= last), None)
