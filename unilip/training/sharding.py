"""FSDP2 plans of the networks more than one task trains: the generator (the generation task, and stage 2 of the
unified task). A plan only one task uses lives with that task (`unilip.tasks.<task>.sharding`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unilip.training.distributed import data_parallel_mesh

if TYPE_CHECKING:
    from unilip.models.generator import UniLIPGenerator


def shard_generator(generator: UniLIPGenerator, mesh) -> None:
    """FSDP2: `fully_shard` per DiT block, per connector layer, the DiT, and the generator root.

    The frozen LLM and tokenizer stay whole on every rank, outside FSDP. `condition` is an entry
    point besides `forward` (it uses the root's queries and projection), so FSDP must gather for it too.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    data_mesh = data_parallel_mesh(mesh)
    for block in generator.dit.transformer_blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(generator.dit, mesh=data_mesh)
    for layer in generator.connector.layers:
        fully_shard(layer, mesh=data_mesh)
    fully_shard(generator, mesh=data_mesh)
    register_fsdp_forward_method(generator, "condition")
