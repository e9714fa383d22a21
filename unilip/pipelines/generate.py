"""Generate or edit images with a trained UniLIP generator.

    python -m unilip.pipelines.generate t2i  --generator runs/<name>/generate/stage3/generator \\
        --prompt "a red motorcycle parked in a garage" --out motorcycle.png
    python -m unilip.pipelines.generate edit --generator runs/<name>/generate/stage3/generator \\
        --image photo.jpg --instruction "make it black and white" --out edited.png
    torchrun --nproc-per-node 8 -m unilip.pipelines.generate prompts --generator ... \\
        --prompts prompts.jsonl --out samples/ [--images-per-prompt 4]

Options: --guidance-scale 4.5, --steps 20, --seed 0, --scheduler dpm|euler, --size 448, --device, --dtype;
--tokenizer / --mllm-weights point at the tokenizer or InternVL weights where they are not where training
recorded them. Several --prompt (or --instruction) give several images, OUT with _0, _1, ... suffixes.

A prompt file (`prompts`) is a .txt file (one prompt per line, blank lines skipped) or a .jsonl file of
{"prompt": ..., "key": optional output name, "image": optional source image (an edit; relative paths are
read from the file's folder), "seed": optional}. Prompt i (0-based) gets seed --seed + i unless it names
one; its images are OUT/<key>.png (OUT/<key>_<k>.png with several per prompt), key defaulting to i as
00000, 00001, ... The file is split over the processes torchrun starts; images that exist are kept (a
restart makes only the missing ones); OUT/manifest.json records the settings and the generator. A prompt
whose source image cannot be read is skipped and the others are made; the run then exits non-zero, saying
how many prompts have no output and naming the manifest that lists them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unilip.logs import cli_logging, one_line_errors
from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline
from unilip.pipelines.manifest import MANIFEST, SamplingError, generator_record, identity
from unilip.pipelines.sampling import RunResult, SampleJob, SamplerSettings, pending_samples, run_sampling

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    t2i = modes.add_parser("t2i", help="prompt -> image")
    t2i.add_argument("--prompt", action="append", required=True)
    edit = modes.add_parser("edit", help="image + instruction -> image")
    edit.add_argument("--image", required=True, type=Path)
    edit.add_argument("--instruction", action="append", required=True)
    many = modes.add_parser("prompts", help="a prompt file -> a folder of images (sharded, resumable)")
    many.add_argument("--prompts", required=True, type=Path, help="a .txt or .jsonl prompt file")
    many.add_argument("--images-per-prompt", type=int, default=1)
    many.add_argument("--batch-size", type=int, default=8, help="images per forward pass, per process")
    many.add_argument("--timeout", type=float, default=86400, help="seconds the processes wait for each other")
    for mode in (t2i, edit, many):
        mode.add_argument("--generator", required=True, type=Path, help="a saved generator (<run>/generator)")
        mode.add_argument("--out", required=True, type=Path, help="output PNG (prompts: output folder)")
        mode.add_argument("--guidance-scale", type=float, default=4.5)
        mode.add_argument("--steps", type=int, default=20)
        mode.add_argument("--seed", type=int, default=0)
        mode.add_argument("--scheduler", choices=SCHEDULERS, default="dpm")
        mode.add_argument("--size", type=int, default=448)
        mode.add_argument("--device", default=None, help="default: cuda (cuda:<local rank>) when available, else cpu")
        mode.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        mode.add_argument("--tokenizer", default=None, help="replaces the tokenizer the generator records")
        mode.add_argument("--mllm-weights", default=None, help="replaces the InternVL weights it records")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line -> its settings (the demo builds a command and parses it here, so it shows one that
    reproduces its images)."""
    return _parser().parse_args(argv)


def source_image(path: Path, side: int) -> torch.Tensor:
    """An image file -> (1, 3, side, side) in [0, 1]: the whole image resized (no crop), as the reference's edit."""
    try:
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    except OSError as error:
        raise ValueError(f"--image {path}: not a readable image ({error}); give a JPEG, PNG or WebP file") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def load_pipeline(args: argparse.Namespace) -> UniLIPPipeline:
    """The pipeline `t2i` / `edit` sample with (`args`: --generator, --device, --dtype, --tokenizer,
    --mllm-weights, --scheduler); the demo (`unilip.demo`) loads it through here too."""
    return UniLIPPipeline.from_pretrained(
        args.generator,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        tokenizer=args.tokenizer,
        mllm_weights=args.mllm_weights,
        scheduler=args.scheduler,
    )


def sample(pipe: UniLIPPipeline, prompts: list[str], source: torch.Tensor | None, args: argparse.Namespace):
    """`t2i` (source None) or `edit` (source (1, 3, S, S) in [0, 1]) images, (B, 3, size, size) in [0, 1], with the
    settings of `args` (--guidance-scale, --steps, --seed, --size); one call for all prompts, so prompt i of a seed
    gets row i of its noise. The demo samples through here too, so its images are the CLI's."""
    options = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.steps, "seed": args.seed}
    if source is None:
        return pipe(prompts, size=args.size, **options)
    return pipe(prompts, source.to(pipe.device).expand(len(prompts), -1, -1, -1), size=args.size, **options)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded: the pixels the CLI writes."""
    return (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def _save(images: torch.Tensor, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(to_pixels(image)).save(path)
    return paths


def read_prompt_file(path: Path, images_per_prompt: int = 1, seed: int = 0) -> list[SampleJob]:
    """A .txt or .jsonl prompt file -> one `SampleJob` per prompt (format in the module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    if images_per_prompt < 1:
        raise SamplingError(f"--images-per-prompt {images_per_prompt}: give 1 or more")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        entries = [({"prompt": line.strip()}, number) for number, line in enumerate(lines, 1) if line.strip()]
    elif path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise SamplingError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
                raise SamplingError(f'{path}:{number}: each line needs a non-empty "prompt" string')
            entries.append((entry, number))
    else:
        raise SamplingError(f"--prompts {path}: use a .txt (one prompt per line) or .jsonl file")
    if not entries:
        raise SamplingError(f"--prompts {path}: no prompts in the file")
    jobs, keys = [], set()
    for index, (entry, number) in enumerate(entries):
        where = f"{path}:{number}"
        key = entry.get("key", f"{index:05d}")
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise SamplingError(f'{where}: "key" must be a string (a file name), got {json.dumps(key)}')
        key = str(key)
        if not key or "/" in key or "\\" in key or key.startswith("."):
            raise SamplingError(f"{where}: key {key!r} must be a plain file name")
        if key in keys:
            raise SamplingError(f"{where}: key {key!r} appears twice")
        keys.add(key)
        source = entry.get("image")
        if source is not None:
            if not isinstance(source, str) or not source.strip():
                raise SamplingError(f'{where}: "image" must be the path of an image file, got {json.dumps(source)}')
            source = str((path.parent / source) if not Path(source).is_absolute() else Path(source))
        names = (f"{key}.png",) if images_per_prompt == 1 else tuple(f"{key}_{k}.png" for k in range(images_per_prompt))
        jobs.append(
            SampleJob(key, entry["prompt"], _seed(entry, seed + index, where), names, images_per_prompt, source)
        )
    return jobs


def _seed(entry: dict, default: int, where: str) -> int:
    """A line's own seed: a JSON integer that torch accepts (5.7 or "5" would silently become another seed)."""
    value = entry.get("seed", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise SamplingError(f'{where}: "seed" must be a whole number in [0, 2^64), got {json.dumps(value)}')
    return value


def _sample_prompt_file(args: argparse.Namespace) -> None:
    jobs = read_prompt_file(args.prompts, args.images_per_prompt, args.seed)
    settings = SamplerSettings(args.guidance_scale, args.steps, args.scheduler, args.size, args.seed, args.dtype)
    model, lineage = generator_record(args.generator, args.tokenizer, args.mllm_weights)
    run = identity(settings, jobs, model, task="prompts")
    description = {"prompts": str(args.prompts.resolve()), "seed_rule": SEED_RULE, "generator": lineage}

    def load(device: torch.device) -> UniLIPPipeline:
        return UniLIPPipeline.from_pretrained(
            args.generator,
            device=device,
            dtype=getattr(torch, args.dtype),
            tokenizer=args.tokenizer,
            mllm_weights=args.mllm_weights,
            scheduler=args.scheduler,
        )

    result = run_sampling(load, jobs, args.out, settings, run, description, args.batch_size, args.device, args.timeout)
    if result.manifest is not None and not result.manifest["complete"]:  # rank 0, once every rank is done
        raise SamplingError(_incomplete(jobs, result, args.out))


def _incomplete(jobs: list[SampleJob], result: RunResult, out: Path) -> str:
    """One line for a run that left prompts without output: how many, the first reason, where the rest is."""
    missing = [job.key for job in jobs if pending_samples(job, out)]
    reasons = [skip for report in result.reports or [] for skip in report.skipped]
    first = f" (first: {reasons[0]['key']}: {reasons[0]['reason']})" if reasons else ""
    return (
        f"{len(missing)} of {len(jobs)} prompts have no output{first}; every other image was written. The "
        f"skipped prompts and why are in {out / MANIFEST} (runs[-1].ranks[].skipped); fix them and run the same "
        "command again to make only what is missing"
    )


SEED_RULE = (
    "prompt i (0-based, file order) uses seed + i unless it gives its own; its sample k starts from row k of "
    "torch.randn((images per prompt, C, h, w), generator=torch.Generator().manual_seed(that seed))"
)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    cli_logging()
    if args.mode == "prompts":
        with one_line_errors(OSError, ValueError):
            _sample_prompt_file(args)
        return [args.out]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with one_line_errors(OSError, ValueError):
        if args.mode == "edit" and not args.image.is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        pipe = load_pipeline(args)
        source = source_image(args.image, pipe.conditioner.source_size) if args.mode == "edit" else None
    images = sample(pipe, args.prompt if source is None else args.instruction, source, args)
    paths = _save(images, args.out)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
