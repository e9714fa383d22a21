"""Pretrained weights in and out: the formats weights come from and go back to.

InternVL's transformers (-hf) and original remote-code checkpoints, the authors' released UniLIP files (the
tokenizer's `.pth`, the generator's import: `python -m unilip.pretrained.released`), the SigLIP / SigLIP 2 /
DINOv2 checkpoints and the DC-AE decoder's diffusers checkpoint. Every encoder has a home here (`HOMES`, by the
encoder's kind): its checkpoint in, a trained copy out (`python -m unilip.export`), the copy verified.

May import `unilip.models` (the networks these weights fill) and the foundation (`unilip.errors`, `unilip.logs`);
the networks never import this package.
"""

from unilip.pretrained.base import ExportCheck, ExportMismatchError, Home
from unilip.pretrained.homes import HOMES, home_of
from unilip.pretrained.tokenizer import build_tokenizer, load_encoder, load_tokenizer

__all__ = [
    "HOMES",
    "ExportCheck",
    "ExportMismatchError",
    "Home",
    "build_tokenizer",
    "home_of",
    "load_encoder",
    "load_tokenizer",
]
