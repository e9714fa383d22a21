"""The homes of the encoders that are one transformers vision model (SigLIP, SigLIP 2, DINOv2,
`unilip.models.encoders.vision_model`): loading that model's checkpoint strictly, writing a trained encoder
back as a checkpoint of that same class, and checking that what was written computes the tokenizer's features.

An export has the tensor names of the hub's home checkpoints, whatever transformers writes it: SigLIP's
(google/siglip-*, google/siglip2-*) are whole SiglipModels / Siglip2Models, their vision tower under
`vision_model.`, which transformers 4.x and 5.0 also keep inside `SiglipVisionModel`; from 5.x on (5.23 here)
that class holds the tower itself and saves it without the prefix, a file that 5.0 and 4.57 load with every
weight missing (with only a warning). DINOv2's checkpoints are the Dinov2Model, without a prefix.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, PreTrainedModel, Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel
from transformers.utils import logging as transformers_logging

from unilip.errors import ConfigError
from unilip.models.encoders.base import merge_tokens
from unilip.models.encoders.vision_model import VisionModelEncoder
from unilip.models.hub import StateDictMismatchError, load_strict, read_json, resolve_pretrained
from unilip.pretrained.base import EXPORT_RTOL, ExportCheck, Home, vision_field

log = logging.getLogger(__name__)

# Files of a home checkpoint that describe its input, carried into an export (`--base`).
PROCESSOR_FILES = ("preprocessor_config.json",)
WEIGHTS_INDEX = "model.safetensors.index.json"
# A tiny text tower for the whole SigLIP model the export's check loads the vision tower into, as the hub's
# checkpoints are loaded; only its `vision_model.*` tensors are looked at.
_TINY_TEXT = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=8)
_TINY_TEXT |= dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)  # inside its vocabulary


class VisionModelHome(Home):
    """A `VisionModelEncoder`'s home: a checkpoint of its `model_class` (e.g. `SiglipVisionModel`), whole or as
    the vision tower of a larger model."""

    home_model_types: ClassVar[tuple[str, ...]]  # `model_type` of checkpoints holding it, whole or as vision_config
    published_prefix: ClassVar[str] = ""  # what the hub's checkpoints put before the vision model's tensor names
    compared_fields: ClassVar[tuple[str, ...]]  # config fields that decide the weights' shapes or the features
    encoder: VisionModelEncoder

    def native_size(self) -> int:
        """An input side the home model was trained at, rounded to the tokenizer's input multiple."""
        vision = self.encoder.vision_tower.config
        patches = getattr(vision, "image_size", 0) // vision.patch_size or round(vision.num_patches**0.5)
        multiple = self.encoder.config.input_multiple
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
        theirs = self.encoder.config_class(**{k: v for k, v in vision.items() if k != "model_type"})
        ours = self.encoder.vision_tower.config
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

    def load(self, name_or_path: str | Path) -> None:
        """Read the home checkpoint with transformers' own `from_pretrained` (it knows the names the files use,
        which may differ from the module's, and finds a vision tower inside a whole SigLIP model), at this
        preset's config; every tensor of the encoder must be in it. Tensors of other parts (SigLIP's text
        tower, a classifier) are left out."""
        path = resolve_pretrained(name_or_path, what=f"{self.kind} weights", option=self.weights_option)
        self.check_home(path, what=f"{self.kind} checkpoint")
        dtype = next(self.encoder.vision_tower.parameters()).dtype
        home, info = self.encoder.model_class.from_pretrained(
            path, config=self.encoder.vision_tower.config, dtype=dtype, output_loading_info=True
        )
        missing = sorted(info.get("missing_keys", ())) + sorted(str(key) for key in info.get("mismatched_keys", ()))
        if missing:
            raise StateDictMismatchError(
                f"{self.kind} checkpoint '{path}' does not hold the whole encoder (missing or mismatched: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); is it the right checkpoint?"
            )
        if info.get("unexpected_keys"):
            log.info("left out %d tensors of '%s' that are not the encoder's", len(info["unexpected_keys"]), path)
        load_strict(self.encoder.vision_tower, home.state_dict(), what=f"'{path}'")
        log.info("loaded the %s encoder from %s", self.kind, path)

    # ------------------------------------------------------------------ home checkpoint out
    def export(self, out_dir: Path, base: str | None, dtype: torch.dtype | None) -> Path:
        """Save `vision_tower` with transformers' `save_pretrained` (a `model_class` checkpoint); with `base`,
        the home checkpoint must fit the preset and its image processor config is carried over."""
        base_dir = None
        if base is not None:
            base_dir = resolve_pretrained(base, what=f"base {self.kind} checkpoint", option="--base")
            self.check_home(base_dir, what="--base")
        tower = copy.deepcopy(self.encoder.vision_tower).cpu()
        if dtype is not None:
            tower.to(dtype)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tower.save_pretrained(out_dir)  # in the names the checkpoint format has, which a release may have changed
        _add_prefix(out_dir, self.published_prefix)
        for name in PROCESSOR_FILES if base_dir is not None and base_dir.is_dir() else ():
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out_dir / name)
        log.info("wrote a %s checkpoint with the trained encoder to %s", self.encoder.model_class.__name__, out_dir)
        return out_dir

    def whole_model(self, vision: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig] | None:
        """The class of the hub's checkpoints and its config around `vision`, where they are more than
        `model_class` (SigLIP's whole model); None where they are `model_class` itself."""
        return None

    def verify_export(self, out_dir: Path, base: str | None = None) -> ExportCheck:
        """Reload `out_dir` as the hub's checkpoints are loaded: with `model_class.from_pretrained`, and where the
        checkpoints are a larger model (SigLIP's), also as that model's vision tower (no missing or unexpected
        keys allowed either way, so a file that only this transformers release would load is refused); then
        compare its features, read the tokenizer's way, with this encoder's on one random image at the native
        size."""
        model, info = self.encoder.model_class.from_pretrained(out_dir, dtype="auto", output_loading_info=True)
        problems = {name: keys for name, keys in info.items() if name in ("missing_keys", "unexpected_keys") and keys}
        if problems:
            raise StateDictMismatchError(f"exported checkpoint '{out_dir}' does not load cleanly: {problems}")
        self._check_published_layout(out_dir, model.config)
        saved = next(model.parameters()).dtype
        model = model.float().eval()
        size = self.native_size()
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        pixel_values = self.encoder.normalise(images)
        reference = self._features_in(saved, pixel_values)
        factor = self.encoder.merge_factor(self.encoder.config)
        with torch.no_grad():
            theirs, _ = merge_tokens(*self.encoder.patch_tokens(model, pixel_values), factor)
        return ExportCheck(
            dtype=saved,
            difference=(reference - theirs).abs().max().item(),
            tolerance=EXPORT_RTOL * max(1.0, reference.abs().max().item()),
            rounding=(reference - self._features_in(torch.float32, pixel_values)).abs().max().item(),
            how=self._how(),
        )

    def _how(self) -> str:
        whole = self.whole_model(self.encoder.vision_tower.config)
        also = f" and as the vision tower of a {whole[0].__name__}" if whole is not None else ""
        return (
            f"transformers loads it as a {self.encoder.model_class.__name__}{also} with no missing or unexpected keys"
        )

    def _check_published_layout(self, out_dir: Path, vision: PretrainedConfig) -> None:
        """Load `out_dir` into the hub checkpoints' whole model: every tensor of its vision tower must be found."""
        whole = self.whole_model(vision)
        if whole is None:
            return
        model_class, config = whole
        with _transformers_quiet():  # its load report lists the text tower, missing on purpose
            _, info = model_class.from_pretrained(out_dir, config=config, output_loading_info=True)
        missing = sorted(key for key in info.get("missing_keys", ()) if key.startswith(self.published_prefix))
        unexpected = sorted(info.get("unexpected_keys", ()))
        if missing or unexpected:
            raise StateDictMismatchError(
                f"exported checkpoint '{out_dir}' does not load as the vision tower of a {model_class.__name__} "
                f"(missing: {missing[:4]}, unexpected: {unexpected[:4]}); other transformers releases would load it "
                "with weights missing"
            )

    def _features_in(self, dtype: torch.dtype, pixel_values: torch.Tensor) -> torch.Tensor:
        """This encoder's features with its weights rounded to `dtype`, computed in float32 on the CPU."""
        rounded = copy.deepcopy(self.encoder).cpu().to(dtype).float().eval()
        with torch.no_grad():
            return rounded(pixel_values)[0]


_SIGLIP_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "vision_use_head",
)


class SiglipHome(VisionModelHome):
    kind = "siglip"
    checkpoint = "SiglipVisionModel checkpoint"
    home_model_types = ("siglip", "siglip_vision_model")
    compared_fields = (*_SIGLIP_FIELDS, "image_size")
    published_prefix = "vision_model."  # SiglipModel.vision_model (and SiglipVisionModel.vision_model up to 5.0)
    whole_classes: ClassVar[tuple[type[PretrainedConfig], type[PreTrainedModel]]] = (SiglipConfig, SiglipModel)

    def whole_model(self, vision: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
        config_class, model_class = self.whole_classes
        return model_class, config_class(vision_config=vision.to_dict(), text_config=_TINY_TEXT)


class Siglip2Home(SiglipHome):
    kind = "siglip2"
    checkpoint = "Siglip2VisionModel checkpoint"
    home_model_types = ("siglip2", "siglip2_vision_model")
    compared_fields = (*_SIGLIP_FIELDS, "num_patches")
    whole_classes = (Siglip2Config, Siglip2Model)


_DINOV2_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "layerscale_value",
    "use_swiglu_ffn",
    "qkv_bias",
)


class Dinov2Home(VisionModelHome):
    kind = "dinov2"
    checkpoint = "Dinov2Model checkpoint"
    home_model_types = ("dinov2",)
    compared_fields = (*_DINOV2_FIELDS, "use_mask_token")


class Dinov2WithRegistersHome(VisionModelHome):
    kind = "dinov2_with_registers"
    checkpoint = "Dinov2WithRegistersModel checkpoint"
    home_model_types = ("dinov2_with_registers",)
    compared_fields = (*_DINOV2_FIELDS, "num_register_tokens")


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def _weight_map(out_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of the checkpoint in `out_dir` (one file, or shards with an index)."""
    index = out_dir / WEIGHTS_INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(out_dir / "model.safetensors", "pt") as weights:
        return dict.fromkeys(weights.keys(), "model.safetensors")


def _add_prefix(out_dir: Path, prefix: str) -> None:
    """Put `prefix` before every tensor name of the checkpoint in `out_dir`, unless transformers already wrote it
    (5.0 keeps SigLIP's tower in `vision_model`; later releases do not)."""
    names = _weight_map(out_dir)
    if not prefix or all(name.startswith(prefix) for name in names):
        return
    if any(name.startswith(prefix) for name in names):
        raise RuntimeError(f"'{out_dir}' mixes tensors with and without the prefix {prefix!r}")
    for file in sorted(set(names.values())):
        with safe_open(out_dir / file, "pt") as weights:
            metadata = weights.metadata()
        tensors = load_file(out_dir / file)
        save_file({prefix + name: tensor for name, tensor in tensors.items()}, out_dir / file, metadata=metadata)
    index = out_dir / WEIGHTS_INDEX
    if index.is_file():
        content = json.loads(index.read_text())
        content["weight_map"] = {prefix + name: file for name, file in content["weight_map"].items()}
        index.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
