"""Low-rank adapters (LoRA, Hu et al. 2022) through `peft`, on any module: the captioner's LLM, the DiT.

`add_lora` injects adapters in place and freezes everything else; the base weights are never written
(the adapted layer computes W x + (alpha / r) B A x, with B = 0 at the start, so the adapted model starts
as the base). `adapters_disabled` gives the base model back for a forward pass (the reference policy of
GRPO, without a second copy). `merged_state_dict` folds the adapters into the base weights under the
base model's own key names, so a merged model saves and loads like one that was never adapted.
`save_peft_adapter` / `load_peft_adapter` write and read adapters as peft's own folder
(`PeftModel.from_pretrained(base, folder)`), for a base that holds the adapted module under other names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name
PEFT_CONFIG_NAME = "adapter_config.json"  # peft's file names (peft.utils.constants)
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before its base model's own names


@dataclass
class LoRASpec:
    """rank r, alpha (the update is scaled by alpha / r), and the module names (suffixes) to adapt."""

    rank: int = 16
    alpha: float = 32.0
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0  # A is drawn from it (B starts at 0)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank} must be >= 1")


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def add_lora(model: nn.Module, spec: LoRASpec) -> dict[str, nn.Parameter]:
    """Inject LoRA adapters into `model` (in place); every other parameter is frozen. Returns the adapters'
    parameters by name. Raises if no module matches `spec.targets`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"lora.targets={list(spec.targets)}: {error}") from None
    model.requires_grad_(False)
    adapters = {name: param for name, param in model.named_parameters() if ".lora_" in name}
    for param in adapters.values():
        param.requires_grad_(True)
    return adapters


def has_lora(model: nn.Module) -> bool:
    return bool(_tuner_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` computes as its base (adapters bypassed); they are switched back on after."""
    layers = _tuner_layers(model)
    # switching adapters back on makes peft mark them trainable: restore what each was
    trainable = [(param, param.requires_grad) for layer in layers for param in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with every adapter folded into its base weight, under the base model's key names
    (`x.base_layer.weight` -> `x.weight`, adapter tensors dropped). `model` itself is left unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "lora_A", {}):
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER).detach()
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value.detach().clone()
    return merged


def load_adapters(adapters: dict[str, nn.Parameter], state: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved adapter tensors into `adapters` (from `add_lora`), every name and shape matching."""
    missing, unexpected = sorted(set(adapters) - set(state)), sorted(set(state) - set(adapters))
    shapes = [n for n in set(adapters) & set(state) if adapters[n].shape != state[n].shape]
    if missing or unexpected or shapes:
        from unilip.models.hub import StateDictMismatchError

        raise StateDictMismatchError(
            f"the adapters in {where} do not fit the LoRA spec they record (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, other shapes {shapes[:4]})"
        )
    with torch.no_grad():
        for name, param in adapters.items():
            param.copy_(state[name])


def _renamed(name: str, prefixes: Mapping[str, str]) -> str | None:
    """`name` with its leading part replaced by the first of `prefixes` (old -> new) it starts with; None if none."""
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def save_peft_adapter(
    model: nn.Module,
    directory: Path,
    base_model: str | None,
    prefixes: Mapping[str, str],
    adapters: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapters `add_lora` put into `model` as `PeftModel.save_pretrained` writes them for a base
    model that holds `model` under other names (`prefixes`: `model`'s leading names -> the base's, e.g. a causal
    LM's `model.` -> InternVL's `model.language_model.`): `adapter_config.json` (peft's LoraConfig, naming
    `base_model` and every adapted module by its full name in the base, so only those are adapted there) and
    `adapter_model.safetensors` (peft's key names: `base_model.model.<name in the base>`, no adapter name).
    `adapters`: the adapter tensors by name in `model`, where they are not `model`'s own (gathered shards)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if adapters is None:
        adapters = {name: param for name, param in model.named_parameters() if ".lora_" in name}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in adapters.items()}
    # peft's names in `model`; embeddings, when adapted, are adapters like the others (not saved whole)
    state = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)
    renamed = {name: _renamed(name, prefixes) for name in state}
    if None in renamed.values():
        outside = [name for name, new in renamed.items() if new is None]
        raise ValueError(f"adapters outside {list(prefixes)} have no name in the base model: {outside[:4]}")
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base_model
    config.target_modules = sorted({new.split(".lora_")[0] for new in renamed.values()})
    config.inference_mode = True  # as PeftModel.save_pretrained records it
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    weights = {PEFT_PREFIX + renamed[name]: tensor for name, tensor in state.items()}
    save_file(weights, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def load_peft_adapter(model: nn.Module, directory: Path, prefixes: Mapping[str, str]) -> None:
    """Load what `save_peft_adapter` wrote (with the same `prefixes`) into `model`'s adapters (from `add_lora`),
    every adapter tensor matched, through peft's own `set_peft_model_state_dict`."""
    from peft.utils import set_peft_model_state_dict

    from unilip.models.hub import StateDictMismatchError, load_safetensors

    back = {PEFT_PREFIX + new: old for old, new in prefixes.items()}
    saved = load_safetensors(directory / PEFT_WEIGHTS_NAME, what="LoRA adapters")
    state = {_renamed(name, back): tensor for name, tensor in saved.items()}
    unexpected = sorted(name for name in saved if _renamed(name, back) is None)
    missing = []
    if not unexpected:
        try:
            result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
        except RuntimeError as error:  # torch's load_state_dict: another shape
            raise StateDictMismatchError(
                f"the adapters in {directory}: {str(error).strip().splitlines()[-1]}"
            ) from None
        missing = sorted(key for key in result.missing_keys if ".lora_" in key)
        unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise StateDictMismatchError(
            f"the adapters in {directory} do not fit the LoRA spec they record (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
