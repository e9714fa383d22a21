"""GenEval (Ghosh et al. 2023): object-focused text-to-image alignment, scored by an object detector.

Format (djghosh13/geneval, README.md "Image generation" and evaluation/evaluate_images.py):
input `prompts/evaluation_metadata.jsonl`, one JSON object per prompt ({"tag", "include", "prompt", ...});
output, per prompt N (its line number, 0-based, 5 digits):

    images/00000/metadata.jsonl     the N-th line of the input
    images/00000/samples/0000.png   4 samples per prompt (file names matching r"\\d+\\.png")

`evaluate_images.py <images> --outfile results.jsonl --model-path <detector folder>` scores every sample
(Mask2Former Swin-S detector from evaluation/download_models.sh, CLIP ViT-L/14 colour classifier); the
score is the mean over tags of the fraction of correct images, as evaluation/summary_scores.py computes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from unilip.benchmarks.base import IMAGES, SCORES, Benchmark, ScoreStep, checkout, existing_file, mean
from unilip.benchmarks.scorers import Pin
from unilip.pipelines.manifest import SamplingError
from unilip.pipelines.sampling import SampleJob

RESULTS = f"{SCORES}/geneval_results.jsonl"
SAMPLE = re.compile(r"\d+\.png")  # the file names evaluate_images.py scores (re.match)


class GenEval(Benchmark):
    name = "geneval"
    format_source = "djghosh13/geneval: README.md (image generation), evaluation/evaluate_images.py"
    judge = "Mask2Former Swin-S (mmdet 2.27) object detector + CLIP ViT-L/14 (OpenAI) colour classifier"
    pin = Pin(
        "djghosh13/geneval",
        "af4902f24d3ca90ebbb446dd9891a59e0f82725f",
        ("evaluation/evaluate_images.py", "evaluation/summary_scores.py", "evaluation/object_names.txt"),
    )

    def __init__(self, prompts: str | None, samples_per_prompt: int = 4, detector: str | None = None):
        self.prompts = prompts
        self.samples_per_prompt = samples_per_prompt
        self.detector = detector

    def inputs(self) -> dict[str, str]:
        return {"prompts": str(self.prompts)}

    def jobs(self, out: Path, seed: int) -> list[SampleJob]:
        path = existing_file(self.prompts, "prompts", "GenEval's prompts/evaluation_metadata.jsonl")
        jobs = []
        for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            try:
                metadata = json.loads(line)
            except json.JSONDecodeError as error:
                raise SamplingError(f"{path}:{index + 1}: not a JSON line ({error.msg})") from None
            if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
                raise SamplingError(f'{path}:{index + 1}: no "prompt"; is this evaluation_metadata.jsonl?')
            folder = f"{IMAGES}/{index:05d}"
            outputs = tuple(f"{folder}/samples/{k:04d}.png" for k in range(self.samples_per_prompt))
            extra = ((f"{folder}/metadata.jsonl", line.strip() + "\n"),)
            jobs.append(
                SampleJob(
                    f"{index:05d}",
                    metadata["prompt"],
                    seed + index,
                    outputs,
                    self.samples_per_prompt,
                    None,
                    False,
                    extra,
                )
            )
        if not jobs:
            raise SamplingError(f"{path} holds no prompts")
        return jobs

    def score_steps(self, out: Path, scorer: str | None, python: str, size: int) -> list[ScoreStep]:
        detector = self.detector or "<folder of mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth>"
        argv = (python, "evaluation/evaluate_images.py", str(out / IMAGES), "--outfile", str(out / RESULTS))
        argv += ("--model-path", detector)
        return [
            ScoreStep(argv, checkout(scorer, "geneval checkout"), (str(out / RESULTS),), check=lambda: _unscored(out))
        ]

    def collect(self, out: Path) -> dict[str, Any] | None:
        path = out / RESULTS
        if not path.exists():
            return None
        by_tag: dict[str, list[bool]] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_tag.setdefault(record["tag"], []).append(bool(record["correct"]))
        tags = {tag: mean([float(c) for c in correct]) for tag, correct in by_tag.items()}
        return {
            "overall": mean(list(tags.values())),
            "tags": tags,
            "images": sum(len(v) for v in by_tag.values()),
            "rule": "overall = mean over tags of the fraction of correct images (evaluation/summary_scores.py)",
        }


def _unscored(out: Path) -> str | None:
    """Samples on disk that results.jsonl has no record of (it was written before they were generated)."""
    samples = sum(1 for folder in (out / IMAGES).glob("*/samples") for p in folder.iterdir() if SAMPLE.match(p.name))
    records = sum(1 for line in (out / RESULTS).read_text().splitlines() if line.strip())
    if records < samples:
        return f"{out / RESULTS} scores {records} of the {samples} samples"
    return None
