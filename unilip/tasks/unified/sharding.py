"""FSDP2 for the unified task (`trainer=fsdp`): the network a stage trains is sharded over the ranks, the frozen
networks around it stay whole on every rank.

    stage 1   the captioner's LLM, per decoder layer (the LoRA adapters in it with it), under one root; its input
              embeddings, final norm and LM head stay whole (the captioner reads the embedding table outside the
              LLM's forward, and a tied LM head shares it); sampling is synced (`Captioner.synced`)
    stage 2   the generator as generation training shards it (per DiT block, connector layer, the DiT, the root),
              and the frozen copy of a fully trained DiT (the KL's reference) the same way
    whole     the UniLIP tokenizer, the stage-1 generator, the stage-2 captioner, the reward encoders

Sharded forward passes are collective, so every rank runs as many of them as every other: the caption sampler
runs until all ranks' captions are done, the SDE and ODE samplers run a fixed number of steps, and validation
batches are padded to the same number of rows on every rank before they are rendered in chunks.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from unilip.errors import ConfigError
from unilip.models.captioner import Captioner
from unilip.tasks.unified.rollouts import UnifiedNetworks
from unilip.training.distributed import data_parallel_mesh
from unilip.training.sharding import shard_generator


def shard_captioner(captioner: Captioner, mesh: DeviceMesh) -> None:
    """`fully_shard` per decoder layer of the captioner's LLM and the LLM as their root (embeddings, final norm and
    LM head ignored: whole on every rank)."""
    language_model = captioner.language_model
    layers = getattr(getattr(language_model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(language_model).__name__} has no `model.layers`; cannot shard it per decoder layer")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    in_layers = {id(p) for p in layers.parameters()}
    whole = {p for p in language_model.parameters() if id(p) not in in_layers}
    fully_shard(language_model, mesh=mesh, ignored_params=whole)
    captioner.synced = True


def shard_unified(networks: UnifiedNetworks, stage: int, mesh: DeviceMesh) -> None:
    """Shard the network stage `stage` trains (see the module docstring), in place."""
    data_mesh = data_parallel_mesh(mesh)
    if stage == 1:
        shard_captioner(networks.captioner, data_mesh)
        return
    shard_generator(networks.generator, mesh)
    reference = networks.reference_dit
    if reference is not None:
        for block in reference.transformer_blocks:
            fully_shard(block, mesh=data_mesh)
        fully_shard(reference, mesh=data_mesh)


def agreed_rows(images: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, list[str]]:
    """`images` and `keys` padded (the last row repeated) to the largest row count of any rank (one all-reduce)."""
    rows = torch.tensor([len(images)], device=images.device)
    torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
    extra = int(rows) - len(images)
    if extra <= 0:
        return images, keys
    return torch.cat([images, images[-1:].expand(extra, *images.shape[1:])]), keys + keys[-1:] * extra


def check_all_sharded(trained: dict) -> None:
    """Every trained parameter must be sharded: one FSDP left whole would get no gradient reduction and drift
    apart between the ranks, unnoticed."""
    whole = [name for name, param in trained.items() if not isinstance(param, DTensor)]
    if whole:
        shown = ", ".join(whole[:4]) + (f", ... ({len(whole)} in all)" if len(whole) > 4 else "")
        raise ConfigError(
            f"trainer=fsdp shards the captioner's decoder layers and the whole generator, but these trained "
            f"parameters lie outside them: {shown}; adapt modules inside the decoder layers (captioner.lora.targets) "
            "or train with trainer=ddp"
        )
