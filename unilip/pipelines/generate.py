"""Generate or edit images with a trained UniLIP generator.

    python -m unilip.pipelines.generate t2i  --generator runs/<name>/generate/stage3/generator \\
        --prompt "a red motorcycle parked in a garage" --out motorcycle.png
    python -m unilip.pipelines.generate edit --generator runs/<name>/generate/stage3/generator \\
        --image photo.jpg --instruction "make it black and white" --out edited.png

Options: --guidance-scale 4.5, --steps 20, --seed 0, --scheduler dpm|euler, --size 448, --device, --dtype;
--tokenizer / --mllm-weights point at the tokenizer or InternVL weights where they are not where training
recorded them. Several --prompt (or --instruction) give several images, OUT with _0, _1, ... suffixes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unilip.logs import one_line_errors
from unilip.pipelines.generation import SCHEDULERS, UniLIPPipeline

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    t2i = modes.add_parser("t2i", help="prompt -> image")
    t2i.add_argument("--prompt", action="append", required=True)
    edit = modes.add_parser("edit", help="image + instruction -> image")
    edit.add_argument("--image", required=True, type=Path)
    edit.add_argument("--instruction", action="append", required=True)
    for mode in (t2i, edit):
        mode.add_argument("--generator", required=True, type=Path, help="a saved generator (<run>/generator)")
        mode.add_argument("--out", required=True, type=Path, help="output PNG")
        mode.add_argument("--guidance-scale", type=float, default=4.5)
        mode.add_argument("--steps", type=int, default=20)
        mode.add_argument("--seed", type=int, default=0)
        mode.add_argument("--scheduler", choices=SCHEDULERS, default="dpm")
        mode.add_argument("--size", type=int, default=448)
        mode.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        mode.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        mode.add_argument("--tokenizer", default=None, help="replaces the tokenizer the generator records")
        mode.add_argument("--mllm-weights", default=None, help="replaces the InternVL weights it records")
    return parser


def _image(path: Path, side: int) -> torch.Tensor:
    """An image file -> (1, 3, side, side) in [0, 1]: the whole image resized (no crop), as the reference's edit."""
    try:
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    except OSError as error:
        raise ValueError(f"--image {path}: not a readable image ({error}); give a JPEG, PNG or WebP file") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def _save(images: torch.Tensor, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with one_line_errors(OSError, ValueError):
        if args.mode == "edit" and not args.image.is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        pipe = UniLIPPipeline.from_pretrained(
            args.generator,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            tokenizer=args.tokenizer,
            mllm_weights=args.mllm_weights,
            scheduler=args.scheduler,
        )
        source = _image(args.image, pipe.conditioner.source_size).to(args.device) if args.mode == "edit" else None
    options = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.steps, "seed": args.seed}
    if source is None:
        images = pipe(args.prompt, size=args.size, **options)
    else:
        prompts = args.instruction
        images = pipe(prompts, source.expand(len(prompts), -1, -1, -1), size=args.size, **options)
    paths = _save(images, args.out)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
