"""FSDP2 for the tokenizer task (`trainer=fsdp`): the tokenizer sharded per encoder block and decoder stage."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from unilip.models.tokenizer import UniLIPTokenizer
from unilip.training.distributed import data_parallel_mesh


def shard_tokenizer(tokenizer: UniLIPTokenizer, mesh: DeviceMesh) -> None:
    """`fully_shard` per encoder block (`tokenizer.encoder.blocks()`), per decoder stage, and the tokenizer root.

    Blocks are the units that are gathered for compute and freed after, so peak memory is one
    block's full weights plus everything's shards. Not sharded: the frozen helper networks
    (teacher, LPIPS, ConvNeXt: whole on every rank, outside the module tree) and the
    discriminator (a few million parameters, replicated; `TokenizerTraining` averages its
    gradients itself). Keeping it out of FSDP matters for correctness, not only speed: the
    generator's adversarial term runs D with its parameters' `requires_grad` switched off, and
    FSDP2 does not follow such a switch on parameters it manages.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    data_mesh = data_parallel_mesh(mesh)
    for block in tokenizer.encoder.blocks():
        fully_shard(block, mesh=data_mesh)
    for block in tokenizer.decoder.up_blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(tokenizer, mesh=data_mesh)
    # FSDP gathers parameters in hooks around `forward`; the tokenizer's other entry points need them too.
    for method in ("reconstruct", "features", "encode", "decode"):
        register_fsdp_forward_method(tokenizer, method)
