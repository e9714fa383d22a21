"""Encoders whose home is one transformers vision model (SigLIP, SigLIP 2, DINOv2): loading it strictly,
writing it back as a checkpoint of that same class, and checking that what was written computes the
tokenizer's features."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from unilip.errors import ConfigError
from unilip.models.encoders.base import EXPORT_RTOL, Encoder, ExportCheck, merge_tokens, vision_field
from unilip.models.hub import StateDictMismatchError, load_strict, read_json, resolve_pretrained

if TYPE_CHECKING:
    from unilip.models.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)

# Files of a home checkpoint that describe its input, carried into an export (`--base`).
PROCESSOR_FILES = ("preprocessor_config.json",)


class VisionModelEncoder(Encoder):
    """`vision_tower` is a `model_class` (e.g. `SiglipVisionModel`); the features are its last hidden state's
    patch tokens (`patch_tokens`), merged `merge_factor` x `merge_factor` (`downsample_ratio` 0.5: 2 x 2)."""

    model_class: ClassVar[type[PreTrainedModel]]
    home_model_types: ClassVar[tuple[str, ...]]  # `model_type` of checkpoints holding it, whole or as vision_config
    compared_fields: ClassVar[tuple[str, ...]]  # config fields that decide the weights' shapes or the features

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        vision = self.vision_config(config.vision)
        vision._attn_implementation = "sdpa"
        self.vision_tower = self.model_class(vision)
        for param in self.unused_parameters():
            param.requires_grad_(False)

    @property
    def core(self) -> nn.Module:
        """The transformer inside `vision_tower` (transformers 5.0 wraps SigLIP's in `vision_model`; later
        versions do not): the module whose state dict has the home checkpoint's names."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    def patch_tokens(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Run `tower` (this encoder's or a reloaded export) -> ((B, h * w, C) patch tokens, (h, w))."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_tokens(self.vision_tower, pixel_values)
        return merge_tokens(tokens, grid, self.merge_factor(self.config))

    def native_size(self) -> int:
        """An input side the home model was trained at, rounded to the tokenizer's input multiple."""
        vision = self.vision_tower.config
        patches = getattr(vision, "image_size", 0) // vision.patch_size or round(vision.num_patches**0.5)
        multiple = self.config.input_multiple
        return multiple * max(1, patches * vision.patch_size // multiple)

    # ------------------------------------------------------------------ home checkpoint in
    def check_home(self, path: Path, *, what: str) -> None:
        """Refuse a checkpoint of another model type or size than the preset, before reading its weights."""
        config_file = path / "config.json" if path.is_dir() else None
        if config_file is None or not config_file.exists():
            return  # shapes are still checked key by key
        raw = read_json(config_file, what=f"{what} config")
        model_type = raw.get("model_type")
        if model_type not in self.home_model_types:
            raise ConfigError(
                f"{what} '{path}' is a {model_type!r} checkpoint, the tokenizer's encoder is {self.kind} (model_type "
                f"{' or '.join(map(repr, self.home_model_types))}); give a checkpoint of that encoder, or choose the "
                "preset of this one"
            )
        vision = raw.get("vision_config", raw)
        theirs = self.config_class(**{k: v for k, v in vision.items() if k != "model_type"})
        ours = self.vision_tower.config
        diffs = [
            f"{name}: {vision_field(theirs, name)} != {vision_field(ours, name)}"
            for name in self.compared_fields
            if vision_field(theirs, name) != vision_field(ours, name)
        ]
        if diffs:
            raise ConfigError(
                f"{what} '{path}' does not fit the tokenizer preset ({'; '.join(diffs)}); "
                "pick the preset that matches the checkpoint"
            )

    def load_pretrained(self, name_or_path: str | Path) -> None:
        """Read the home checkpoint with transformers' own `from_pretrained` (it knows the names the files use,
        which may differ from the module's, and finds a vision tower inside a whole SigLIP model), at this
        preset's config; every tensor of the encoder must be in it. Tensors of other parts (SigLIP's text
        tower, a classifier) are left out."""
        path = resolve_pretrained(name_or_path, what=f"{self.kind} weights", option=self.weights_option)
        self.check_home(path, what=f"{self.kind} checkpoint")
        dtype = next(self.vision_tower.parameters()).dtype
        home, info = self.model_class.from_pretrained(
            path, config=self.vision_tower.config, dtype=dtype, output_loading_info=True
        )
        missing = sorted(info.get("missing_keys", ())) + sorted(str(key) for key in info.get("mismatched_keys", ()))
        if missing:
            raise StateDictMismatchError(
                f"{self.kind} checkpoint '{path}' does not hold the whole encoder (missing or mismatched: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); is it the right checkpoint?"
            )
        if info.get("unexpected_keys"):
            log.info("left out %d tensors of '%s' that are not the encoder's", len(info["unexpected_keys"]), path)
        load_strict(self.vision_tower, home.state_dict(), what=f"'{path}'")
        log.info("loaded the %s encoder from %s", self.kind, path)

    # ------------------------------------------------------------------ home checkpoint out
    def export(self, out_dir: Path, base: str | None, dtype: torch.dtype | None) -> Path:
        """Save `vision_tower` with transformers' `save_pretrained` (a `model_class` checkpoint); with `base`,
        the home checkpoint must fit the preset and its image processor config is carried over."""
        base_dir = None
        if base is not None:
            base_dir = resolve_pretrained(base, what=f"base {self.kind} checkpoint", option="--base")
            self.check_home(base_dir, what="--base")
        tower = copy.deepcopy(self.vision_tower).cpu()
        if dtype is not None:
            tower.to(dtype)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tower.save_pretrained(out_dir)
        for name in PROCESSOR_FILES if base_dir is not None and base_dir.is_dir() else ():
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out_dir / name)
        log.info("wrote a %s checkpoint with the trained encoder to %s", self.model_class.__name__, out_dir)
        return out_dir

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        """Reload `out_dir` with `model_class.from_pretrained` (no missing or unexpected keys allowed) and compare
        its features, read the tokenizer's way, with this encoder's on one random image at the native size."""
        model, info = self.model_class.from_pretrained(out_dir, dtype="auto", output_loading_info=True)
        problems = {name: keys for name, keys in info.items() if name in ("missing_keys", "unexpected_keys") and keys}
        if problems:
            raise StateDictMismatchError(f"exported checkpoint '{out_dir}' does not load cleanly: {problems}")
        saved = next(model.parameters()).dtype
        model = model.float().eval()
        size = self.native_size()
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        pixel_values = self.normalise(images)
        reference = self._features_in(saved, pixel_values)
        with torch.no_grad():
            theirs, _ = merge_tokens(*self.patch_tokens(model, pixel_values), self.merge_factor(self.config))
        return ExportCheck(
            dtype=saved,
            difference=(reference - theirs).abs().max().item(),
            tolerance=EXPORT_RTOL * max(1.0, reference.abs().max().item()),
            rounding=(reference - self._features_in(torch.float32, pixel_values)).abs().max().item(),
        )

    def _features_in(self, dtype: torch.dtype, pixel_values: torch.Tensor) -> torch.Tensor:
        """This encoder's features with its weights rounded to `dtype`, computed in float32 on the CPU."""
        rounded = copy.deepcopy(self).cpu().to(dtype).float().eval()
        with torch.no_grad():
            return rounded(pixel_values)[0]
