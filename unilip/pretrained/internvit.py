"""InternViT's home: an InternVL checkpoint, in transformers' format (-hf, `unilip.pretrained.internvl`) or
InternVL's original remote-code one (`unilip.pretrained.internvl_original`), told apart by its config.json."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unilip.errors import ConfigError
from unilip.models.hub import load_strict, read_tensors, resolve_pretrained
from unilip.pretrained.base import ExportCheck, Home
from unilip.pretrained.internvl import check_vision_config

log = logging.getLogger(__name__)


class InternViTHome(Home):
    """The vision tower and projector of an InternVL checkpoint (`InternVLForConditionalGeneration`)."""

    kind = "internvit"
    checkpoint = "InternVL checkpoint (InternVLForConditionalGeneration)"
    weights_option = "model.internvl_weights"

    def load(self, name_or_path: str | Path) -> None:
        """Load the vision tower and projector from an InternVL checkpoint (transformers format).

        Only the `vision_tower.*` and `multi_modal_projector.*` tensors are read; every key must
        match (transformers' own `InternVLVisionModel.from_pretrained` on a full InternVL
        checkpoint silently keeps random weights, which is why this exists).
        """
        path = resolve_pretrained(name_or_path, what="InternVL weights", option=self.weights_option)
        check_vision_config(path, self.encoder.config)
        for module, names in (
            (self.encoder.vision_tower, ("vision_tower.", "model.vision_tower.")),
            (self.encoder.multi_modal_projector, ("multi_modal_projector.", "model.multi_modal_projector.")),
        ):
            prefix, tensors = read_tensors(path, names)
            load_strict(module, tensors, what=f"'{path}' ({prefix}*)")
        log.info("loaded InternViT and projector from %s", path)

    def export(self, out_dir: Path, base: str | None, dtype: torch.dtype | None) -> Path:
        """Into `base`'s format: transformers' (-hf, `unilip.pretrained.internvl`) or InternVL's original remote-code
        one (`unilip.pretrained.internvl_original`), told apart by its config.json."""
        from unilip.pretrained.internvl import export_to_internvl
        from unilip.pretrained.internvl_original import export_to_original, is_original

        if base is None:
            raise ConfigError(
                "--base is required for an InternViT tokenizer: the InternVL checkpoint it was trained from "
                "(its language model is kept), e.g. OpenGVLab/InternVL3-1B-hf or OpenGVLab/InternVL3-1B"
            )
        base_dir = _base_dir(base)
        if is_original(base_dir):
            return export_to_original(self.encoder, base_dir, out_dir, dtype=dtype)
        return export_to_internvl(self.encoder, base_dir, out_dir, dtype=dtype)

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        from unilip.pretrained.internvl import verify_export
        from unilip.pretrained.internvl_original import is_original, verify_original_export

        if is_original(out_dir):
            if base is None:
                raise ValueError("verifying an export into the original InternVL format needs its base")
            return verify_original_export(self.encoder, out_dir, _base_dir(base))
        return verify_export(self.encoder, out_dir)


def _base_dir(base: str | Path) -> Path:
    # every file: an original-format base's python files and tokenizer are part of the export
    return resolve_pretrained(base, what="base InternVL checkpoint", option="--base", allow_patterns=None)
