"""Low-rank adapters (LoRA, Hu et al. 2022) through `peft`, on any module: the captioner's LLM, the DiT.

`add_lora` injects adapters in place and freezes everything else; the base weights are never written
(the adapted layer computes W x + (alpha / r) B A x, with B = 0 at the start, so the adapted model starts
as the base). `adapters_disabled` gives the base model back for a forward pass (the reference policy of
GRPO, without a second copy). `merged_state_dict` folds the adapters into the base weights under the
base model's own key names, so a merged model saves and loads like one that was never adapted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name


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
