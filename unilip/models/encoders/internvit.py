"""InternViT + InternVL's pixel shuffle and projector `mlp1`: the UniLIP encoder (REFERENCE section 1).

The vision tower, projector and pixel shuffle are transformers' own InternVL code, so the trained
encoder drops back into `InternVLForConditionalGeneration` unchanged (`unilip.pretrained.internvl`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from unilip.errors import ConfigError
from unilip.models.encoders.base import Encoder, ExportCheck, vision_field
from unilip.models.hub import load_strict, read_json, read_tensors, resolve_pretrained

if TYPE_CHECKING:
    from unilip.models.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)


def internvl_features(
    vision_tower: InternVLVisionModel,
    projector: InternVLMultiModalProjector,
    pixel_values: torch.Tensor,
    config: TokenizerConfig,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """InternVL's image-feature path: ViT -> drop CLS -> pixel shuffle -> projector.

    (B, 3, H, W) normalised pixels -> ((B, N, D) features, (h, w) grid of the N tokens).
    """
    pixel_values = pixel_values.to(vision_tower.embeddings.patch_embeddings.projection.weight.dtype)
    hidden = vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
    patch = vision_tower.config.patch_size[0]
    grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    hidden = hidden.reshape(hidden.shape[0], grid_h, grid_w, hidden.shape[-1])
    # transformers' own pixel shuffle (a plain function of its arguments), so the features
    # match InternVLModel.get_image_features bit for bit.
    hidden = InternVLModel.pixel_shuffle(None, hidden, scale_factor=config.downsample_ratio)
    grid = (hidden.shape[1], hidden.shape[2])
    return projector(hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])), grid


class InternViTEncoder(Encoder):
    """`vision_tower` (InternVLVisionModel) + `multi_modal_projector`; features are InternVL's
    `get_image_features(...).pooler_output`, D = the LLM's hidden size (`llm_hidden_size`)."""

    kind = "internvit"
    config_class = InternVLVisionConfig
    weights_option = "model.internvl_weights"
    home = "InternVL checkpoint (InternVLForConditionalGeneration)"

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        internvl = config.internvl_config()
        internvl.vision_config._attn_implementation = "sdpa"
        self.vision_tower = InternVLVisionModel(internvl.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(internvl)

    @classmethod
    def feature_width(cls, config: TokenizerConfig) -> int:
        return config.llm_hidden_size

    @classmethod
    def check_config(cls, config: TokenizerConfig) -> None:
        if config.llm_hidden_size is None:
            raise ConfigError("the internvit encoder needs llm_hidden_size (the InternVL projector's output width)")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return internvl_features(self.vision_tower, self.multi_modal_projector, pixel_values, self.config)

    def blocks(self) -> list[nn.Module]:
        return list(self.vision_tower.encoder.layer)

    def load_pretrained(self, name_or_path: str | Path) -> None:
        """Load the vision tower and projector from an InternVL checkpoint (transformers format).

        Only the `vision_tower.*` and `multi_modal_projector.*` tensors are read; every key must
        match (transformers' own `InternVLVisionModel.from_pretrained` on a full InternVL
        checkpoint silently keeps random weights, which is why this exists).
        """
        path = resolve_pretrained(name_or_path, what="InternVL weights", option=self.weights_option)
        check_vision_config(path, self.config)
        for module, names in (
            (self.vision_tower, ("vision_tower.", "model.vision_tower.")),
            (self.multi_modal_projector, ("multi_modal_projector.", "model.multi_modal_projector.")),
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
            return export_to_original(self, base_dir, out_dir, dtype=dtype)
        return export_to_internvl(self, base_dir, out_dir, dtype=dtype)

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        from unilip.pretrained.internvl import verify_export
        from unilip.pretrained.internvl_original import is_original, verify_original_export

        if is_original(out_dir):
            if base is None:
                raise ValueError("verifying an export into the original InternVL format needs its base")
            return verify_original_export(self, out_dir, _base_dir(base))
        return verify_export(self, out_dir)


def _base_dir(base: str | Path) -> Path:
    # every file: an original-format base's python files and tokenizer are part of the export
    return resolve_pretrained(base, what="base InternVL checkpoint", option="--base", allow_patterns=None)


def check_vision_config(path: Path, config: TokenizerConfig) -> None:
    """Refuse an InternVL checkpoint whose ViT or projector differs from the preset."""
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        return  # shapes are still checked key by key
    theirs = read_json(config_file, what="InternVL config")
    vision = InternVLVisionConfig(**{k: v for k, v in theirs.get("vision_config", {}).items() if k != "model_type"})
    ours = config.vision_config()
    fields = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "patch_size",
        "layer_norm_eps",
        "norm_type",
        "use_qk_norm",
        "attention_bias",
        "hidden_act",
        "use_mean_pooling",
    )
    diffs = [
        f"{name}: {vision_field(vision, name)} != {vision_field(ours, name)}"
        for name in fields
        if vision_field(vision, name) != vision_field(ours, name)
    ]
    text_hidden = theirs.get("text_config", {}).get("hidden_size")
    if text_hidden is not None and text_hidden != config.llm_hidden_size:
        diffs.append(f"llm_hidden_size: {text_hidden} != {config.llm_hidden_size}")
    if diffs:
        raise ConfigError(
            f"InternVL checkpoint '{path}' does not fit the tokenizer preset ({'; '.join(diffs)}); "
            "pick the preset that matches the checkpoint"
        )
