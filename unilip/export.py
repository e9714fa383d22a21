"""Put a trained encoder back into its home model.

    python -m unilip.export --tokenizer runs/stage2/tokenizer --base OpenGVLab/InternVL3-1B-hf --out InternVL3-1B-UniLIP
    python -m unilip.export --tokenizer runs/stage2/tokenizer --base OpenGVLab/InternVL3-1B --out InternVL3-1B-UniLIP
    python -m unilip.export --tokenizer runs/siglip/tokenizer/stage2/tokenizer --out siglip2-unilip [--base google/...]

`--tokenizer` is a `save_pretrained` directory or a released `.pth` (then give `--preset`).
Where the encoder goes depends on it:
- InternViT: a complete InternVL checkpoint in the format of `--base` (required), told apart by its
  config.json. A transformers (-hf) base (`OpenGVLab/InternVL3-1B-hf`, lmms-eval's `internvl_hf`) gives a
  checkpoint that `InternVLForConditionalGeneration.from_pretrained` loads directly. An original remote-code
  base (`OpenGVLab/InternVL3-1B`, model_type internvl_chat; what VLMEvalKit loads) gives a copy of it,
  file for file, whose `vision_model.*` and `mlp1.*` tensors are the tokenizer's (q, k, v merged into qkv),
  in the base's safetensors files and dtype; its python files are copied, never run. A base whose
  image-feature path differs from the tokenizer's (another projector activation, feature layer, CLS
  handling, pixel-shuffle ratio or version, size) is refused before its weights are read.
- SigLIP / SigLIP 2 / DINOv2: a `SiglipVisionModel`, `Siglip2VisionModel`, `Dinov2Model` or
  `Dinov2WithRegistersModel` checkpoint with the tensor names of the hub's checkpoints (SigLIP's under
  `vision_model.`), which transformers 4.57 and 5.0 load too; SigLIP's is also checked to load as the vision
  tower of a whole `SiglipModel`. `--base` (optional) is the checkpoint the encoder came from: it must be of
  the same model type and size, and its image processor config is carried over.
Unless `--no-verify`, the result is reloaded with transformers (no missing or unexpected keys; an
original-format export through the original -> transformers key mapping, its language model checked bit
for bit against the base's) and its features are compared with the tokenizer's; it is written next to
`--out` and moved there only once it passed, so a failed export leaves nothing that looks like a
checkpoint. `--out` must not exist (or be empty).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from unilip.errors import ConfigError
from unilip.logs import cli_logging, one_line_errors
from unilip.pretrained import ExportMismatchError, home_of, load_tokenizer

log = logging.getLogger("unilip.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="save_pretrained directory, or a released UniLIP .pth")
    parser.add_argument("--preset", default=None, help="tokenizer preset for a .pth file: unilip_1b or unilip_2b")
    parser.add_argument(
        "--base",
        default=None,
        help="the home checkpoint the encoder came from (hub id or directory): required for InternViT (InternVL, "
        "-hf or original format; the export takes its format), optional for SigLIP / DINOv2",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (new, or empty)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="dtype to save in (auto: InternVL's base's, else the tokenizer's; for an original-format base every "
        "floating-point tensor is cast, its config.json is not changed)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and comparing features")
    args = parser.parse_args(argv)
    cli_logging()

    with one_line_errors():
        out = args.out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} already exists and is not empty; choose a new directory")
        tokenizer = load_tokenizer(args.tokenizer, preset=args.preset)
        home = home_of(tokenizer.encoder)
        with _staging(out) as staging:
            home.export(staging, args.base, DTYPES[args.dtype])
            if not args.no_verify:
                check = home.verify_export(staging, args.base)
                if not check.ok:
                    raise ExportMismatchError(
                        f"the exported model's image features differ from the tokenizer's by {check.difference:.2e} "
                        f"(tolerance {check.tolerance:.2e}); nothing was written to {out}"
                    )
            if out.exists():
                out.rmdir()
            staging.rename(out)
    if not args.no_verify:
        log.info(
            "verified %s: %s; its image features equal the tokenizer's with %s weights (max |diff| %.2e, "
            "tolerance %.2e); saving in %s moves them by %.2e",
            *(out, check.how, _name(check.dtype), check.difference, check.tolerance, _name(check.dtype)),
            check.rounding,
        )
    log.info("wrote %s", out)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` (same filesystem: the final rename is atomic); removed, with any parent
    directories this created, unless it has been moved to `out`."""
    created = [parent for parent in [out.parent, *out.parent.parents] if not parent.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)
            for parent in created:  # innermost first
                if not any(parent.iterdir()):
                    parent.rmdir()


if __name__ == "__main__":
    main()
