"""The Generate and Edit tabs' computation: the generate CLI itself, driven with the command it would be given.

Each request is written as the `python -m unilip.pipelines.generate t2i|edit ...` command that reproduces it,
parsed by the CLI's parser and run through the CLI's own steps (`load_pipeline`, `sample`, `to_pixels`), so the
images are the CLI's bit for bit on the same device. Several images of one prompt are the CLI given the prompt
several times: one batch from one seed. The downloads carry that command and the settings (in each PNG's text
chunk `unilip` and in `settings.json`).
"""

from __future__ import annotations

import json
import shlex
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from unilip.errors import ConfigError
from unilip.pipelines import generate as cli

MAX_IMAGES = 8
_SAMPLING = threading.Lock()


@dataclass
class Request:
    """What the page asks for. `source`: the edit's source image file (None: text-to-image)."""

    prompt: str
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.5
    count: int = 1
    size: int = 448
    scheduler: str = "dpm"
    source: str | None = None


def generator_dir(path: Path) -> Path:
    """A saved generator, or a generation run's (written when the run finishes)."""
    if (path / "generator" / "config.json").is_file():
        return path / "generator"
    if (path / "config.json").is_file():
        return path
    raise ConfigError(
        f"{path} has no saved generator yet (a generation run writes generator/ when it finishes); "
        "wait for the run to end or give <run>/generator of a finished one"
    )


def command(generator: Path, request: Request, device: str, dtype: str) -> list[str]:
    """The generate CLI's arguments for `request` (without the output path)."""
    if not request.prompt.strip():
        raise ValueError("write a prompt" if request.source is None else "write an instruction")
    if not 1 <= request.count <= MAX_IMAGES:
        raise ValueError(f"number of images {request.count}: choose 1 to {MAX_IMAGES}")
    if request.steps < 1 or request.size < 1:
        raise ValueError("steps and size must be at least 1")
    if request.source is None:
        argv = ["t2i", *["--prompt", request.prompt] * request.count]
    else:
        argv = ["edit", "--image", request.source, *["--instruction", request.prompt] * request.count]
    return [
        *argv,
        "--generator", str(generator),
        "--seed", str(request.seed),
        "--steps", str(request.steps),
        "--guidance-scale", repr(float(request.guidance_scale)),
        "--size", str(request.size),
        "--scheduler", request.scheduler,
        "--device", device,
        "--dtype", dtype,
    ]  # fmt: skip


def check_prompt_length(pipe, prompt: str) -> None:
    """Refuse a prompt the generator would cut (training cuts captions at `max_prompt_tokens`; the CLI too)."""
    conditioner = pipe.conditioner
    count = len(conditioner.text_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if count > conditioner.max_prompt_tokens:
        raise ValueError(
            f"the prompt is {count} tokens long; this generator reads at most {conditioner.max_prompt_tokens} "
            "(the rest would be cut off). Shorten it"
        )


def load(argv: list[str]):
    """The CLI's pipeline for a command (its --generator, --device, --dtype, --tokenizer, --mllm-weights)."""
    return cli.load_pipeline(cli.parse_args([*argv, "--out", "unused.png"]))


def run(pipe, argv: list[str]) -> list[np.ndarray]:
    """The CLI's images for `argv`, as (H, W, 3) uint8 arrays: what it would write."""
    args = cli.parse_args([*argv, "--out", "unused.png"])
    if args.mode == "edit":
        source = cli.source_image(args.image, pipe.conditioner.source_size)
        prompts = args.instruction
    else:
        source, prompts = None, args.prompt
    check_prompt_length(pipe, prompts[0])
    with _SAMPLING:  # the Generate and Edit tabs share one pipeline: one request at a time sets its sampler
        pipe.scheduler = args.scheduler  # what `load_pipeline` sets from --scheduler
        images = cli.sample(pipe, prompts, source, args)
    return [cli.to_pixels(image) for image in images]


def command_line(argv: list[str]) -> str:
    """The shell command that makes these images with the generate CLI."""
    out = "edited.png" if argv[0] == "edit" else "image.png"
    return shlex.join(["python", "-m", "unilip.pipelines.generate", *argv, "--out", out])


def write_downloads(images: list[np.ndarray], request: Request, argv: list[str], folder: Path) -> list[Path]:
    """PNG files with their settings and the reproducing command in a text chunk, and `settings.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**asdict(request), "command": command_line(argv), "files": []}
    paths = []
    for index, pixels in enumerate(images):
        path = folder / f"seed{request.seed}_{index}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("unilip", json.dumps({**settings, "index": index, "files": None}))
        Image.fromarray(pixels).save(path, pnginfo=info)
        settings["files"].append(path.name)
        paths.append(path)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    return [*paths, folder / "settings.json"]
