"""FSDP2 wrapping for tokenizer training, and reading its sharded checkpoints without a process group."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.device_mesh import DeviceMesh

if TYPE_CHECKING:
    from unilip.training.tokenizer import TokenizerTraining


def shard_tokenizer_training(module: TokenizerTraining, mesh: DeviceMesh) -> None:
    """`fully_shard` per ViT block, per decoder stage, the discriminator, and the tokenizer root.

    Blocks are the units that are gathered for compute and freed after, so peak memory is one
    block's full weights plus everything's shards. Frozen helper networks (teacher, LPIPS,
    ConvNeXt) are not sharded: they stay whole on every rank, outside the module tree.
    """
    from torch.distributed.fsdp import fully_shard

    data_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    tokenizer = module.tokenizer
    for layer in tokenizer.vision_tower.encoder.layer:
        fully_shard(layer, mesh=data_mesh)
    for block in tokenizer.decoder.up_blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(tokenizer, mesh=data_mesh)
    if module.discriminator is not None:
        fully_shard(module.discriminator, mesh=data_mesh)


def load_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distributed (DCP) checkpoint directory, as written by Lightning's ModelParallelStrategy, as one dict.

    Converted with `dcp_to_torch_save` into a temporary file and read back with `weights_only=True`.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(str(path), str(target))
        checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    meta = path / "meta.pt"
    if meta.exists():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    return checkpoint
