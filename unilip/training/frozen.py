"""Frozen networks during training: the ones a training module uses but does not own, and the frozen
parts of the model it trains. Both run in eval mode, always.

Networks outside the module tree (a stage-2 teacher, LPIPS, ConvNeXt, the generation LLM) are held
in a plain dataclass: no optimizer, no gradient sync, not in checkpoints (they are rebuilt from their
own weights), and Lightning's `train()` never reaches them. Frozen parts inside the tree (the stage-1
ViT and projector, the stage-1 DiT of generation) are built in train mode like the rest;
`FrozenStaysInEval` puts them in eval mode when training starts and keeps them there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass(eq=False)
class FrozenNetworks:
    """Base of the dataclasses that hold a training module's outside-the-tree networks (None: not used).

    Subclasses declare one field per network, so a misspelled name is an AttributeError, and
    `copy.deepcopy` / `pickle` of the training module work.
    """

    def __post_init__(self) -> None:
        for network in self.networks():
            network.eval()

    def networks(self) -> list[nn.Module]:
        return [value for f in fields(self) if isinstance(value := getattr(self, f.name), nn.Module)]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> FrozenNetworks:
        for network in self.networks():
            network.to(device=device, dtype=dtype)
        return self


def frozen_submodules(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of `module` that have parameters, none of which requires a gradient."""
    found: list[nn.Module] = []

    def visit(current: nn.Module) -> None:
        params = list(current.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(current)
            return
        for child in current.children():
            visit(child)

    visit(module)
    return found


class FrozenStaysInEval:
    """LightningModule mixin: trainable parts train in train mode, every fully frozen submodule stays in
    eval mode.

    Frozen weights do not learn, and a frozen network must compute what it computes at inference
    (the features InternVL sees), not a dropout or stochastic-depth sample of it. Models are built
    in train mode; Lightning sets no mode when fitting starts and, around each validation, restores
    the modes it found. So the modes are set here when training starts, and `train()` keeps them
    for anyone who calls it. Modules without parameters (activations, dropout inside trainable
    blocks) follow the mode they are given.
    """

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in frozen_submodules(self):
                module.eval()
        return self

    def on_train_start(self) -> None:
        self.train()
        super().on_train_start()
