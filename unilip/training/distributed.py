"""FSDP2 wrapping for tokenizer training, and reading its sharded checkpoints without a process group."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh

if TYPE_CHECKING:
    from unilip.training.tokenizer import TokenizerTraining


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every process on the data-parallel axis (pure FSDP2).

    ModelParallelStrategy's "auto" puts one data-parallel rank per node and the node's devices
    on the tensor-parallel axis; the tokenizer has no tensor parallelism, so all processes shard data.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_tokenizer_training(module: TokenizerTraining, mesh: DeviceMesh) -> None:
    """`fully_shard` per ViT block, per decoder stage, and the tokenizer root.

    Blocks are the units that are gathered for compute and freed after, so peak memory is one
    block's full weights plus everything's shards. Not sharded: the frozen helper networks
    (teacher, LPIPS, ConvNeXt: whole on every rank, outside the module tree) and the
    discriminator (a few million parameters, replicated; `TokenizerTraining` averages its
    gradients itself). Keeping it out of FSDP matters for correctness, not only speed: the
    generator's adversarial term runs D with its parameters' `requires_grad` switched off, and
    FSDP2 does not follow such a switch on parameters it manages.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    data_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    tokenizer = module.tokenizer
    for layer in tokenizer.vision_tower.encoder.layer:
        fully_shard(layer, mesh=data_mesh)
    for block in tokenizer.decoder.up_blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(tokenizer, mesh=data_mesh)
    # FSDP gathers parameters in hooks around `forward`; the tokenizer's other entry points need them too.
    for method in ("reconstruct", "features", "encode", "decode"):
        register_fsdp_forward_method(tokenizer, method)


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
        from unilip.models.hub import load_torch_file

        checkpoint.update(load_torch_file(meta, what="checkpoint metadata"))
    return checkpoint


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s full state dict as CPU copies, FSDP2 shards gathered (a collective: call on every rank).

    Copies, not views: on CPU `.cpu()` returns the parameter itself, which a caller may change after.
    """
    state = {}
    for key, value in module.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().cpu().clone()
    return state
