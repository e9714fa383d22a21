"""Put a trained UniLIP encoder back into InternVL.

    python -m unilip.export --tokenizer runs/stage2/tokenizer --base OpenGVLab/InternVL3-1B-hf --out InternVL3-1B-UniLIP

`--tokenizer` is a `save_pretrained` directory or a released `.pth` (then give `--preset`).
The output is a complete transformers InternVL checkpoint (language model, tokenizer and
processor files from `--base`) that `InternVLForConditionalGeneration.from_pretrained`
loads directly. Unless `--no-verify`, it is reloaded and its image features are compared
with the tokenizer's.
"""

from __future__ import annotations

import argparse
import logging

import torch

from unilip.logs import one_line_errors
from unilip.models.internvl import export_to_internvl, verify_export
from unilip.models.loading import load_tokenizer

log = logging.getLogger("unilip.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="save_pretrained directory, or a released UniLIP .pth")
    parser.add_argument("--preset", default=None, help="tokenizer preset for a .pth file: unilip_1b or unilip_2b")
    parser.add_argument("--base", required=True, help="base InternVL checkpoint (hub id or directory, -hf format)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="dtype to save in (auto: the base's)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and comparing features")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with one_line_errors(OSError, ValueError):
        tokenizer = load_tokenizer(args.tokenizer, preset=args.preset)
        out = export_to_internvl(tokenizer, args.base, args.out, dtype=DTYPES[args.dtype])
    if not args.no_verify:
        diff = verify_export(tokenizer, out)
        log.info(
            "verified: transformers loads %s with no missing or unexpected keys; feature max |diff| = %.2e", out, diff
        )


if __name__ == "__main__":
    main()
