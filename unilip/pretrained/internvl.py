"""InternVL key names: importing the released UniLIP checkpoints and exporting into InternVL.

The released UniLIP files (`1b_unilip.pth`, `2b_unilip.pth`) use the original InternVL
naming (`encoder.encoder.layers.N.attn.qkv`, `mlp1.1`, ...); transformers' native InternVL
uses its own (`encoder.layer.N.attention.q_proj`, `linear_1`, ...). The table below is the
mapping transformers documents in `models/internvl/convert_internvl_weights_to_hf.py`.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLVisionConfig

from unilip.errors import ConfigError
from unilip.models.encoders.internvit import InternViTEncoder, internvl_features
from unilip.models.hub import StateDictMismatchError, load_strict, load_torch_file, read_json, resolve_pretrained
from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer
from unilip.pretrained.base import EXPORT_RTOL, ExportCheck, vision_field

log = logging.getLogger(__name__)

# Original InternViT name (below the `encoder.` prefix of a UniLIP checkpoint) -> transformers name.
_VIT_RENAMES = (
    (r"embeddings\.class_embedding", r"embeddings.cls_token"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"embeddings\.position_embedding", r"embeddings.position_embeddings"),
    (r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"encoder.layer.\1.attention.\2.weight"),
    (r"encoder\.layers\.(\d+)\.ls(1|2)", r"encoder.layer.\1.lambda_\2"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
)
_QKV = re.compile(r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
# InternVL's `mlp1` Sequential(LayerNorm, Linear, GELU, Linear) -> transformers' projector.
PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
# Top-level prefixes of a released UniLIP checkpoint -> our module names.
_DIRECT_PREFIXES = {"down_blocks.": "residual_blocks.", "down_mlp.": "down_mlp.", "decoder.": "decoder."}
# Training-only heads some released files carry; they are not part of the tokenizer.
TRAINING_ONLY_PREFIXES = ("regressor.",)


def internvit_names(key: str) -> list[str]:
    """One original InternViT name -> its transformers name(s): [q, k, v] for a fused qkv, else one name.

    A fused qkv tensor is the rows of q, k and v stacked in that order (InternViT's `qkv` Linear).
    """
    if match := _QKV.fullmatch(key):
        layer, kind = match.groups()
        return [f"encoder.layer.{layer}.attention.{part}_proj.{kind}" for part in "qkv"]
    for pattern, replacement in _VIT_RENAMES:
        if re.fullmatch(pattern, key):
            return [re.sub(pattern, replacement, key)]
    raise KeyError(key)


def convert_internvit_key(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One original InternViT tensor -> its transformers tensor(s); qkv is split row-wise into q, k, v."""
    names = internvit_names(key)
    return dict(zip(names, tensor.chunk(len(names), dim=0), strict=True))


def convert_unilip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released UniLIP state dict (original InternVL names) -> `UniLIPTokenizer` names.

    Every key must be understood: an unknown key is an error that lists them all.
    """
    converted, unknown, dropped = {}, [], []
    for key, tensor in state.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            dropped.append(key)
        elif key.startswith("encoder."):
            try:
                for name, value in convert_internvit_key(key[len("encoder.") :], tensor).items():
                    converted[f"vision_tower.{name}"] = value
            except KeyError:
                unknown.append(key)
        elif key.startswith("mlp1.") and key.split(".")[1] in PROJECTOR_RENAMES:
            _, index, rest = key.split(".", 2)
            converted[f"multi_modal_projector.{PROJECTOR_RENAMES[index]}.{rest}"] = tensor
        elif prefix := next((p for p in _DIRECT_PREFIXES if key.startswith(p)), None):
            converted[_DIRECT_PREFIXES[prefix] + key[len(prefix) :]] = tensor
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise StateDictMismatchError(f"unrecognised keys in the UniLIP checkpoint: {shown}")
    if dropped:
        log.info("ignored %d training-only tensors (%s)", len(dropped), ", ".join(sorted(TRAINING_ONLY_PREFIXES)))
    return converted


def load_unilip_checkpoint(path: str | Path, config: TokenizerConfig) -> UniLIPTokenizer:
    """Build a tokenizer from a released UniLIP `.pth` file, every key accounted for.

    The file is read with `torch.load(weights_only=True)`: tensors only, no pickled code.
    `config` must be the matching preset (`unilip_1b` for `1b_unilip.pth`, `unilip_2b` for
    `2b_unilip.pth`); a mismatch shows up as a shape error naming the tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UniLIP checkpoint '{path}' does not exist")
    state = load_torch_file(path, what="UniLIP checkpoint", mmap=True)
    if not isinstance(state, dict):
        raise StateDictMismatchError(f"UniLIP checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    with torch.device("meta"):
        model = UniLIPTokenizer(config)
    load_strict(model, convert_unilip_state_dict(state), what=f"UniLIP checkpoint '{path}'")
    model._set_normalisation()
    return model


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


# Files of a transformers checkpoint that `save_pretrained` rewrites; everything else is copied.
_REWRITTEN = re.compile(r"(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|.*\.bin)")


def check_internvl_base(base_dir: Path, config: TokenizerConfig) -> None:
    """Refuse, before loading it, a base checkpoint whose image-feature path is not the tokenizer's.

    `tokenizer.features` is: last ViT layer, CLS dropped, pixel shuffle at `downsample_ratio`, the
    projector with `projector_hidden_act`. A base that is not a transformers InternVL checkpoint at
    all, or that configures any of these differently, would give other features (or load with a
    default LLM of several GB); the ViT and projector sizes are checked as loading checks them (`check_vision_config`).
    """
    config_file = base_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--base {base_dir}: no config.json; give a transformers InternVL checkpoint (-hf format)")
    raw = read_json(config_file, what="base config")
    if raw.get("model_type") != "internvl":
        raise ConfigError(
            f"--base {base_dir} is not a transformers InternVL checkpoint (model_type={raw.get('model_type')!r}) nor "
            "an original one ('internvl_chat'); give e.g. OpenGVLab/InternVL3-1B-hf or OpenGVLab/InternVL3-1B"
        )
    base = InternVLConfig.from_dict(raw)
    expected = {
        "projector_hidden_act": config.projector_hidden_act,
        "vision_feature_layer": -1,  # the last layer
        "vision_feature_select_strategy": "default",  # CLS dropped
        "downsample_ratio": config.downsample_ratio,
    }
    diffs = [
        f"{key}={getattr(base, key)!r}, the tokenizer's is {value!r}"
        for key, value in expected.items()
        if getattr(base, key) != value
    ]
    if diffs:
        raise ConfigError(
            f"--base {base_dir} computes image features differently from the tokenizer ({'; '.join(diffs)}); "
            "export into the InternVL checkpoint the tokenizer was trained from"
        )
    check_vision_config(base_dir, config)


def export_to_internvl(
    tokenizer: UniLIPTokenizer | InternViTEncoder,
    base: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a complete InternVL checkpoint whose vision tower and projector are `tokenizer`'s (a tokenizer
    with an InternViT encoder, or the encoder itself).

    `base` is the InternVL checkpoint to start from (hub id or directory, transformers
    format, e.g. `OpenGVLab/InternVL3-1B-hf`); its language model, tokenizer and processor
    files are kept. The result loads with `InternVLForConditionalGeneration.from_pretrained`
    with no missing or unexpected keys, and its `get_image_features` equals
    `tokenizer.features` for the same image (`verify_export` checks it). A base that does not
    fit is refused before it is loaded (`check_internvl_base`).
    """
    from transformers import InternVLForConditionalGeneration

    base_dir = resolve_pretrained(base, what="base InternVL checkpoint", option="--base", allow_patterns=None)
    check_internvl_base(base_dir, tokenizer.config)
    model = InternVLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype or "auto")
    for target, source in (
        (model.model.vision_tower, tokenizer.vision_tower),
        (model.model.multi_modal_projector, tokenizer.multi_modal_projector),
    ):
        state = {key: value.to(next(target.parameters()).dtype) for key, value in source.state_dict().items()}
        load_strict(target, state, what=f"the tokenizer's {type(source).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for file in base_dir.iterdir():
        if file.is_file() and not _REWRITTEN.fullmatch(file.name) and not (out_dir / file.name).exists():
            shutil.copy2(file, out_dir / file.name)
    log.info("wrote InternVL checkpoint with the trained encoder to %s", out_dir)
    return out_dir


def features_in(
    tokenizer: UniLIPTokenizer | InternViTEncoder, dtype: torch.dtype, pixel_values: torch.Tensor
) -> torch.Tensor:
    """The tokenizer's features with its ViT and projector weights rounded to `dtype`, computed in float32."""
    parts = [
        copy.deepcopy(part).to(dtype).float().eval()
        for part in (tokenizer.vision_tower, tokenizer.multi_modal_projector)
    ]
    with torch.no_grad():
        return internvl_features(*parts, pixel_values, tokenizer.config)[0]


def verify_export(
    tokenizer: UniLIPTokenizer | InternViTEncoder, out_dir: str | Path, *, image_size: int | None = None
) -> ExportCheck:
    """Reload an exported checkpoint with transformers and compare its image features with the tokenizer's.

    Raises `StateDictMismatchError` if any key is missing or unexpected; returns the measured
    differences (see `ExportCheck`; `check.ok` says whether the export computes the tokenizer's features).
    """
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(out_dir, dtype="auto", output_loading_info=True)
    problems = {name: keys for name, keys in info.items() if name in ("missing_keys", "unexpected_keys") and keys}
    if problems:
        raise StateDictMismatchError(f"exported checkpoint '{out_dir}' does not load cleanly: {problems}")
    saved = next(model.model.vision_tower.parameters()).dtype
    model = model.float().eval()
    size = image_size or model.config.vision_config.image_size[0]
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean, std = (
        torch.tensor(values).view(1, 3, 1, 1) for values in (tokenizer.config.image_mean, tokenizer.config.image_std)
    )
    pixel_values = (images - mean) / std
    reference = features_in(tokenizer, saved, pixel_values)
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=pixel_values).pooler_output
    return ExportCheck(
        dtype=saved,
        difference=(reference - theirs).abs().max().item(),
        tolerance=EXPORT_RTOL * max(1.0, reference.abs().max().item()),
        rounding=(reference - features_in(tokenizer, torch.float32, pixel_values)).abs().max().item(),
    )
