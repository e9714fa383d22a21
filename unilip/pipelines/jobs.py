"""What a sampling run is asked for: its prompts (`SampleJob`) and the sampler settings (`SamplerSettings`).
`unilip.pipelines.sampling` runs them; `unilip.pipelines.manifest` records them and checks them on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SampleJob:
    """One prompt and where its samples go.

    Attributes:
        key: unique name of the prompt within the run (a benchmark's own id).
        prompt: the text (an instruction when `source` is set).
        seed: the seed of this prompt's starting noise.
        outputs: paths relative to the output directory: one per sample, or one grid file when `grid`.
        samples: how many samples the prompt gets.
        source: the source image of an edit (a file path), or None for text-to-image.
        grid: tile the samples 2 x 2 (row-major) into `outputs[0]` (DPG-Bench's layout).
        extra_files: (relative path, text) written before the images (e.g. GenEval's metadata.jsonl).
        keep_aspect: an edit generated at its source's aspect ratio (a latent grid of about as many tokens as
            size x size, `aspect_grid`) instead of size x size.
    """

    key: str
    prompt: str
    seed: int
    outputs: tuple[str, ...]
    samples: int = 1
    source: str | None = None
    grid: bool = False
    extra_files: tuple[tuple[str, str], ...] = ()
    keep_aspect: bool = False

    def __post_init__(self) -> None:
        expected = 1 if self.grid else self.samples
        if len(self.outputs) != expected or self.samples < 1:
            raise ValueError(f"job {self.key}: {self.samples} samples need {expected} output path(s)")
        if self.grid and self.samples != 4:
            raise ValueError(f"job {self.key}: a grid holds 4 samples (2 x 2), not {self.samples}")


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides the images besides the prompts and the model (recorded in the manifest)."""

    guidance_scale: float = 4.5
    steps: int = 20
    scheduler: str = "dpm"
    size: int = 448
    seed: int = 0
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
