"""Finding pretrained weights (a hub id or a local path) and loading them strictly.

Every loader in unilip goes through `load_strict`: a key that is missing, left over
or of the wrong shape is an error that lists the keys, never a silent random init.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from unilip.errors import UnreadableFileError, UserError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.safetensors.index.json")


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Raised when pretrained weights cannot be found locally or fetched from the hub."""


class StateDictMismatchError(UserError, RuntimeError):
    """Raised when a checkpoint's keys or shapes do not match the module exactly."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A JSON config file as a dict; a file that is not valid JSON is an `UnreadableFileError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFileError(f"{what} '{path}' is not valid JSON ({_first_line(error)})") from None


def load_safetensors(path: Path, *, what: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or foreign file is an `UnreadableFileError` naming it."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as error:
        raise UnreadableFileError(
            f"{what} '{path}' is not a readable safetensors file ({_first_line(error)}); it is truncated or "
            "not a weights file: copy or save it again"
        ) from None


def load_torch_file(path: Path, *, what: str, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain containers, never pickled code.

    A file that is not a PyTorch checkpoint (truncated, another format, or one that holds code) is an
    `UnreadableFileError` naming it, instead of torch's message about zip archives or mmap.
    """
    path = Path(path)
    if mmap and not zipfile.is_zipfile(path):
        raise UnreadableFileError(
            f"{what} '{path}' is not a PyTorch checkpoint (not a torch.save zip archive: truncated, or another "
            "kind of file)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UnreadableFileError(
            f"{what} '{path}' is not a plain PyTorch weights file ({_first_line(error)}); only tensors are loaded"
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UnreadableFileError(
            f"{what} '{path}' cannot be read as a PyTorch checkpoint ({_first_line(error)}); it may be truncated"
        ) from None


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or name.endswith((".safetensors", ".pth", ".pt"))


def resolve_pretrained(
    name_or_path: str | Path, *, what: str, option: str, allow_patterns: tuple[str, ...] | None = WEIGHT_PATTERNS
) -> Path:
    """Return a local directory (or file) holding `name_or_path`'s weights.

    A local path is used as is; anything shaped like `owner/name` that is not a local
    path is fetched with `huggingface_hub.snapshot_download` (configs and safetensors
    only). `what` names the weights and `option` the config key to set, for the error.
    """
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if _looks_like_local_path(name):
        raise WeightsNotFoundError(
            f"{what}: no such file or directory '{name}'; set {option}=<an existing path or hub id>"
        )
    from huggingface_hub import snapshot_download

    try:
        patterns = list(allow_patterns) if allow_patterns is not None else None
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:  # offline, missing repo, auth, disk: the hub's own words say which
        raise WeightsNotFoundError(
            f"{what}: cannot fetch '{name}' from the hub ({_first_line(error)}); fix that, or download it where "
            f"there is network (`hf download {name} --local-dir DIR`) and set {option}=DIR"
        ) from None


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or not), or the file itself."""
    if path.is_file():
        return [path]
    for index_name in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsNotFoundError(f"no *.safetensors file in '{path}'")
    return files


def read_tensors(path: Path, prefixes: Iterable[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """Read the tensors under the first of `prefixes` that the checkpoint uses.

    Returns the prefix found and the tensors with it stripped. Only matching tensors are
    read, so the language model of a full InternVL checkpoint never reaches memory.
    """
    prefixes = list(prefixes)
    files = safetensors_files(path)
    keys_by_file = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys_by_file[file] = list(handle.keys())
        except SafetensorError as error:
            raise UnreadableFileError(
                f"'{file}' is not a readable safetensors file ({_first_line(error)}); it is truncated or not a "
                "weights file: download or copy it again"
            ) from None
    all_keys = [key for keys in keys_by_file.values() for key in keys]
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in all_keys):
            break
    else:
        raise StateDictMismatchError(
            f"'{path}' has no tensors under any of {prefixes}; is it the right checkpoint? (first keys: {all_keys[:5]})"
        )
    tensors = {}
    for file, keys in keys_by_file.items():
        wanted = [key for key in keys if key.startswith(prefix)]
        if not wanted:
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in wanted:
                tensors[key[len(prefix) :]] = handle.get_tensor(key)
    return prefix, tensors


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str) -> None:
    """Load `state_dict` into `module`, requiring every key to match in name and shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if own[key].shape != state_dict[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches (checkpoint vs model): {_listing(wrong_shape)}")
    if problems:
        raise StateDictMismatchError(f"{what} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True, assign=any(t.is_meta for t in own.values()))


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of a transformers model, on every supported version
    (`activation_checkpointing_enable` replaced `gradient_checkpointing_enable` after 5.0)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)
