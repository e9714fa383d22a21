"""Export into InternVL's original checkpoint format (`OpenGVLab/InternVL3-1B`, run by its own remote code).

An original InternVL checkpoint ships its model as python files (`modeling_internvl_chat.py`, ...) that
`AutoModel.from_pretrained(path, trust_remote_code=True)` runs; VLMEvalKit's InternVL class loads it that
way and asks `model.chat(...)`. Its `config.json` has `model_type: internvl_chat` with `vision_config` /
`llm_config`, and its weights keep InternVL's own names: `vision_model.encoder.layers.N.attn.qkv` (q, k, v
stacked row-wise), `mlp1.{0,1,3}` (the projector's LayerNorm, Linear, Linear), `language_model.*`.

The export is the base checkpoint, file for file, with its `vision_model.*` and `mlp1.*` tensors replaced by
the tokenizer's under those names (the inverse of `convert_internvit_key`), in the same safetensors files
as the base (its index rewritten only for the total size). Nothing here imports or runs the checkpoint's
python files: they are copied as bytes, and the verification reads the weights back through the
original -> transformers mapping into transformers' own InternVL vision tower and projector.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from unilip.errors import ConfigError, UnreadableFileError
from unilip.models.encoders.internvit import internvl_features
from unilip.models.hub import StateDictMismatchError, load_safetensors, load_strict, read_json
from unilip.pretrained.base import EXPORT_RTOL, ExportCheck, vision_field
from unilip.pretrained.internvl import PROJECTOR_RENAMES, convert_internvit_key, features_in, internvit_names

if TYPE_CHECKING:
    from unilip.models.encoders.internvit import InternViTEncoder
    from unilip.models.tokenizer import TokenizerConfig, UniLIPTokenizer

log = logging.getLogger(__name__)

MODEL_TYPE = "internvl_chat"
_INDEX = "model.safetensors.index.json"
_VISION, _PROJECTOR = "vision_model.", "mlp1."
# `vision_config` field of the original `InternVisionConfig` -> transformers' `InternVLVisionConfig` field, with
# the original's default for a field its config.json leaves out (configuration_intern_vit.py).
_VISION_FIELDS = {
    "hidden_size": ("hidden_size", 3200),
    "num_hidden_layers": ("num_hidden_layers", 48),
    "num_attention_heads": ("num_attention_heads", 25),
    "intermediate_size": ("intermediate_size", 12800),
    "patch_size": ("patch_size", 14),
    "image_size": ("image_size", 224),
    "layer_norm_eps": ("layer_norm_eps", 1e-6),
    "norm_type": ("norm_type", "rms_norm"),
    "hidden_act": ("hidden_act", "gelu"),
    "qkv_bias": ("attention_bias", False),
    "qk_normalization": ("use_qk_norm", True),
}
# Weight files are rewritten (safetensors) or left out (pickles, which would still hold the old encoder).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_WEIGHT_INDEXES = (_INDEX, "pytorch_model.bin.index.json")


def is_original(directory: Path) -> bool:
    """Whether `directory` holds an original-format InternVL checkpoint (its config.json says `internvl_chat`)."""
    config_file = Path(directory) / "config.json"
    return config_file.is_file() and read_json(config_file, what="InternVL config").get("model_type") == MODEL_TYPE


def _square(value: Any) -> Any:
    """14 and [14, 14] are the same patch or image size."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _original_vision(raw: dict[str, Any]) -> dict[str, Any]:
    vision = raw.get("vision_config") or {}
    return {name: vision.get(name, default) for name, (_, default) in _VISION_FIELDS.items()}


def check_original_base(base_dir: Path, raw: dict[str, Any], config: TokenizerConfig) -> None:
    """Refuse, before any weight is read, an original-format base whose image-feature path is not the tokenizer's.

    The remote code's `extract_feature`: the ViT's layer `select_layer`, CLS dropped, pixel shuffle at
    `downsample_ratio` (`ps_version` "v2"; "v1" leaves the grid transposed), `mlp1` with an exact GELU, on tiles
    of `force_image_size` (or the ViT's `image_size`).
    """
    ours = config.vision_config()
    theirs = _original_vision(raw)
    diffs = [
        f"{name}: {theirs[name]!r} != {_square(vision_field(ours, field))!r}"
        for name, (field, _) in _VISION_FIELDS.items()
        if _square(theirs[name]) != _square(vision_field(ours, field))
    ]
    expected = {
        "llm_config.hidden_size": ((raw.get("llm_config") or {}).get("hidden_size"), config.llm_hidden_size),
        "downsample_ratio": (raw.get("downsample_ratio", 0.5), config.downsample_ratio),
        "ps_version": (raw.get("ps_version", "v1"), "v2"),
        "select_layer": (raw.get("select_layer", -1), -1),
        "force_image_size": (raw.get("force_image_size") or theirs["image_size"], _square(ours.image_size)),
    }
    diffs += [f"{name}: {value!r} != {want!r}" for name, (value, want) in expected.items() if value != want]
    # what the original model has no room for: another projector activation, a LayerNorm after the last layer
    if config.projector_hidden_act != "gelu":
        diffs.append(f"the tokenizer's projector_hidden_act is {config.projector_hidden_act!r}, mlp1's is 'gelu'")
    if not ours.use_mean_pooling:
        diffs.append("the tokenizer's ViT ends in a LayerNorm (use_mean_pooling=false), InternViT's does not")
    if diffs:
        raise ConfigError(
            f"--base {base_dir} (original InternVL format) does not fit the tokenizer ({'; '.join(diffs)}); "
            "export into the InternVL checkpoint the tokenizer was trained from"
        )


def _unreadable(file: Path, error: Exception) -> UnreadableFileError:
    return UnreadableFileError(
        f"'{file}' is not a readable safetensors file ({type(error).__name__}: {str(error).splitlines()[0]}); it is "
        "truncated or not a weights file: download or copy it again"
    )


def weight_files(directory: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors files of an original checkpoint, in order, and its index (None when it has one file)."""
    index_file = directory / _INDEX
    if index_file.is_file():
        index = read_json(index_file, what="weights index")
        files = sorted({directory / name for name in index.get("weight_map", {}).values()})
        if not files:
            raise ConfigError(f"'{index_file}' lists no weight files; download the checkpoint again")
        return files, index
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in directory.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)))
        raise ConfigError(
            f"--base {directory} has no safetensors weights{f' (only {found})' if found else ''}; "
            "give a checkpoint saved as safetensors (the hub's InternVL3 checkpoints are)"
        )
    return files, None


def _headers(files: list[Path]) -> tuple[dict[str, tuple[Path, tuple[int, ...], torch.dtype]], dict[Path, dict]]:
    """Every tensor's file, shape and dtype, and each file's metadata, from the headers alone."""
    tensors, metadata = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata[file] = handle.metadata() or {}
                names = handle.keys()  # a safe_open handle is not iterable
                for key in names:
                    piece = handle.get_slice(key)
                    tensors[key] = (file, tuple(piece.get_shape()), _DTYPES[piece.get_dtype()])
        except (SafetensorError, OSError) as error:
            raise _unreadable(file, error) from None
    return tensors, metadata


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def to_original_names(base_keys: list[str], vision: dict[str, torch.Tensor], projector: dict[str, torch.Tensor]):
    """The tokenizer's vision tower and projector tensors under the base's original names.

    Each `vision_model.*` key of the base gets the tensor `convert_internvit_key` would split into the
    tokenizer's (q, k and v concatenated row-wise into qkv), each `mlp1.*` key the projector tensor it maps
    to. A base key with no tokenizer tensor, or a tokenizer tensor no base key takes, is an error naming them.
    """
    out, missing = {}, []
    used = set()
    for key in base_keys:
        if key.startswith(_VISION):
            try:
                names = [("vision", name) for name in internvit_names(key[len(_VISION) :])]
            except KeyError:
                missing.append(key)
                continue
        else:
            _, index, rest = [*key.split(".", 2), "", ""][:3]
            if index not in PROJECTOR_RENAMES:
                missing.append(key)
                continue
            names = [("projector", f"{PROJECTOR_RENAMES[index]}.{rest}")]
        parts = [(vision if part == "vision" else projector).get(name) for part, name in names]
        if any(p is None for p in parts):
            missing.append(key)
            continue
        used.update(names)
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    extra = sorted(
        f"{'vision_tower' if part == 'vision' else 'multi_modal_projector'}.{name}"
        for part, state in (("vision", vision), ("projector", projector))
        for name in state
        if (part, name) not in used
    )
    problems = []
    if missing:
        problems.append(f"base tensors the tokenizer has nothing for: {_listing(sorted(missing))}")
    if extra:
        problems.append(f"tokenizer tensors the base has no place for: {_listing(extra)}")
    if problems:
        raise StateDictMismatchError(f"the base's vision part does not match the tokenizer: {'; '.join(problems)}")
    return out


def _is_vision(key: str) -> bool:
    return key.startswith((_VISION, _PROJECTOR))


def export_to_original(
    tokenizer: UniLIPTokenizer | InternViTEncoder, base_dir: Path, out_dir: Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write `base_dir` (an original-format InternVL checkpoint) to `out_dir` with the tokenizer's vision tower
    and projector in place of its own. Every other file is copied as it is; the weights stay in the base's
    files and dtype (each vision tensor in the dtype of the one it replaces) unless `dtype` is given, which
    casts every floating-point tensor, the language model's too.
    """
    raw = read_json(base_dir / "config.json", what="base InternVL config")
    check_original_base(base_dir, raw, tokenizer.config)
    files, index = weight_files(base_dir)
    headers, metadata = _headers(files)
    ours = to_original_names(
        [key for key in headers if _is_vision(key)],
        tokenizer.vision_tower.state_dict(),
        tokenizer.multi_modal_projector.state_dict(),
    )
    wrong = [f"{key} {tuple(v.shape)} vs {headers[key][1]}" for key, v in ours.items() if v.shape != headers[key][1]]
    if wrong:
        raise StateDictMismatchError(f"the tokenizer's tensors do not fit the base's shapes: {_listing(wrong)}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for file in files:
        tensors = load_safetensors(file, what="base InternVL weights")
        for key, tensor in tensors.items():
            if key in ours:  # rounded once, to the dtype it is saved in
                tensor = ours[key].detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
            elif dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor
            total += tensor.numel() * tensor.element_size()
        target = out_dir / file.relative_to(base_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata={"format": "pt", **metadata[file]})
        del tensors
    if index is not None:
        index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total}}
        (out_dir / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _copy_other_files(base_dir, out_dir)
    log.info("wrote InternVL checkpoint (original format) with the trained encoder to %s", out_dir)
    return out_dir


def _copy_other_files(base_dir: Path, out_dir: Path) -> None:
    """Every file of the base but its weights, byte for byte (hidden files and folders, e.g. a download cache,
    left out)."""
    for path in sorted(base_dir.rglob("*")):
        relative = path.relative_to(base_dir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES:
            continue
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / relative)


def transformers_parts(raw: dict[str, Any]) -> tuple[InternVLVisionModel, InternVLMultiModalProjector]:
    """A fresh transformers InternVL vision tower and projector of the sizes an original config.json names."""
    vision = _original_vision(raw)
    internvl = InternVLConfig(
        vision_config={field: vision[name] for name, (field, _) in _VISION_FIELDS.items()} | {"use_mean_pooling": True},
        text_config={"model_type": "qwen2", "hidden_size": raw["llm_config"]["hidden_size"]},
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
    )
    internvl.vision_config._attn_implementation = "sdpa"
    return InternVLVisionModel(internvl.vision_config).eval(), InternVLMultiModalProjector(internvl).eval()


def read_back(
    out_dir: Path, raw: dict[str, Any]
) -> tuple[InternVLVisionModel, InternVLMultiModalProjector, torch.dtype]:
    """The exported vision tensors, renamed by `convert_internvit_key`, loaded strictly into `transformers_parts`
    (in float32), and the dtype they were saved in."""
    files, _ = weight_files(out_dir)
    vision, projector = {}, {}
    for file in files:
        for key, tensor in load_safetensors(file, what="exported InternVL weights").items():
            if key.startswith(_VISION):
                try:
                    vision.update(convert_internvit_key(key[len(_VISION) :], tensor))
                except KeyError:
                    vision[key] = tensor  # reported by load_strict as unexpected
            elif key.startswith(_PROJECTOR):
                _, index, rest = key.split(".", 2)
                projector[f"{PROJECTOR_RENAMES.get(index, index)}.{rest}"] = tensor
    saved = {tensor.dtype for tensor in [*vision.values(), *projector.values()]}
    if len(saved) != 1:
        raise StateDictMismatchError(
            f"the exported vision weights in '{out_dir}' mix dtypes ({sorted(map(str, saved))})"
        )
    tower, mlp = transformers_parts(raw)
    load_strict(tower, vision, what=f"the exported vision weights in '{out_dir}'")
    load_strict(mlp, projector, what=f"the exported projector weights in '{out_dir}'")
    return tower, mlp, saved.pop()


def check_language_model(out_dir: Path, base_dir: Path) -> None:
    """The export holds exactly the base's tensor names and shapes, and every tensor outside the vision part is
    the base's, bit for bit (after the same cast when the export changed the dtype)."""
    written, _ = _headers(weight_files(out_dir)[0])
    base, _ = _headers(weight_files(base_dir)[0])
    if written.keys() != base.keys():
        raise StateDictMismatchError(
            f"exported checkpoint '{out_dir}' has other tensors than its base: missing "
            f"{_listing(sorted(base.keys() - written.keys()))}; extra {_listing(sorted(written.keys() - base.keys()))}"
        )
    differ = []
    handles = {}
    try:
        for key, (file, shape, _) in written.items():
            if _is_vision(key):
                if shape != base[key][1]:
                    differ.append(key)
                continue
            for path in (file, base[key][0]):
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
            ours, theirs = handles[file].get_tensor(key), handles[base[key][0]].get_tensor(key)
            if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours.dtype)):
                differ.append(key)
    finally:
        handles.clear()
    if differ:
        raise StateDictMismatchError(f"exported checkpoint '{out_dir}' changed the base's tensors {_listing(differ)}")


def verify_original_export(
    tokenizer: UniLIPTokenizer | InternViTEncoder, out_dir: Path, base_dir: Path, *, image_size: int | None = None
) -> ExportCheck:
    """Check an export into the original format: the language model is the base's bit for bit, and the vision
    weights read back into transformers' InternVL compute the tokenizer's features (see `ExportCheck`)."""
    raw = read_json(Path(out_dir) / "config.json", what="exported config")
    check_language_model(Path(out_dir), Path(base_dir))
    tower, mlp, saved = read_back(Path(out_dir), raw)
    size = image_size or _square(raw["vision_config"]["image_size"])
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tokenizer.config.image_mean, tokenizer.config.image_std))
    pixel_values = (images - mean) / std
    reference = features_in(tokenizer, saved, pixel_values)
    # the written config's pixel-shuffle ratio, not the tokenizer's
    shuffle = copy.copy(tokenizer.config)
    shuffle.downsample_ratio = raw.get("downsample_ratio", 0.5)
    with torch.no_grad():
        theirs = internvl_features(tower, mlp, pixel_values, shuffle)[0]
    return ExportCheck(
        dtype=saved,
        difference=(reference - theirs).abs().max().item(),
        tolerance=EXPORT_RTOL * max(1.0, reference.abs().max().item()),
        rounding=(reference - features_in(tokenizer, torch.float32, pixel_values)).abs().max().item(),
        how="its vision weights, read back through the original -> transformers mapping, load into transformers' "
        "InternVL with no missing or unexpected keys and its language model is the base's bit for bit",
    )
