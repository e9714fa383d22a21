"""Data parallelism: DDP and FSDP2 strategies, the helpers the tasks' set-up uses (keeping a module out of DDP,
averaging gradients by hand, gathering shards), and reading sharded checkpoints without a process group. Each
task's FSDP2 plan lives with the task (`unilip.tasks.<task>.sharding`); plans several tasks share live in
`unilip.training.sharding`."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def join_elastic_attempt(backend: str, timeout: timedelta, device: torch.device) -> None:
    """Under torchrun, create the default process group on a store of its own per restart attempt.

    torchrun's agent keeps one TCP store for the whole job and every attempt's processes connect to
    it (`TORCHELASTIC_USE_AGENT_STORE`), but torch's env:// rendezvous adds no per-attempt prefix, so
    after a restart the keys of the failed attempt are still there: gloo's peers read the addresses
    of dead processes ("connectFullMesh failed ... Connection refused", or a hang) and NCCL its old
    unique id. Prefixing the store with `TORCHELASTIC_RESTART_COUNT` gives every attempt clean keys.
    Outside torchrun (or when the agent does not share its store) this does nothing and Lightning
    creates the group as usual.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or torch.distributed.is_initialized():
        return
    agent_store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"unilip/attempt_{attempt}", agent_store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
        device_id=device if device.type != "cpu" else None,
    )


class DDPStrategy(LightningDDPStrategy):
    """Lightning's DDP with what every unilip task needs: no unused-parameter search, gradients
    reduced straight into their buckets, and buffers never broadcast in `forward`.

    - Every parameter DDP manages gets a gradient in every step (the discriminator, which joins
      at the GAN start, is kept out of DDP; see `exclude_from_ddp`), so DDP does not traverse the
      autograd graph each step looking for unused ones (`find_unused_parameters=False`).
    - Buffers (EMA weights, LeCam EMAs, non-finite counters) are updated identically on every
      rank; broadcasting them from rank 0 each step would only cost time. torch >= 2.13 calls the
      switch `forward_sync_buffers` (its old name `broadcast_buffers` is deprecated there).
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("find_unused_parameters", False)
        kwargs.setdefault("gradient_as_bucket_view", True)
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            kwargs.setdefault("forward_sync_buffers", False)
        else:
            kwargs.setdefault("broadcast_buffers", False)
        super().__init__(**kwargs)

    def setup_distributed(self) -> None:
        join_elastic_attempt(self._get_process_group_backend(), self._timeout, self.root_device)
        super().setup_distributed()  # Lightning's set-up; it keeps a process group that exists


def exclude_from_ddp(module: nn.Module, submodule: str) -> None:
    """Keep `module.<submodule>`'s parameters out of DDP's gradient reduction (call before wrapping);
    the owner then averages their gradients itself, in the steps where they have any."""
    names = [f"{submodule}.{name}" for name, _ in module.get_submodule(submodule).named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def average_gradients(module: nn.Module) -> None:
    """Average `module`'s gradients over all ranks in one flat all-reduce (for parameters outside
    DDP/FSDP, e.g. the discriminator)."""
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)  # SUM, then divide: gloo has no AVG
    flat /= dist.get_world_size()
    for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(chunk.view_as(grad))


class GradientLayoutProbe:
    """Gives parameters the strides their gradients arrive with, where the two differ only in size-1
    dimensions (the same memory layout, described two ways): create it before a backward, call
    `apply()` after it. Used once per process under DDP.

    Autograd accepts such a gradient as is (e.g. a depthwise conv weight (C, 1, 3, 3) fed
    channels-last activations gets strides (9, 1, 3, 1), the weight has (9, 9, 3, 1)), but DDP
    compares strides exactly and copies every such gradient into its bucket with a strided copy,
    every step ("Grad strides do not match bucket view strides", printed once per process). DDP
    rebuilds its buckets once, at the second step, from the parameters' strides at that time: from
    then on the gradients match their buckets. The strides are recorded by tensor hooks, because
    after the backward DDP has replaced each gradient by its bucket view. (A gradient in a genuinely
    different layout, e.g. a channels-last conv weight gradient, is copied into the parameter's
    layout by autograd itself, before DDP sees it.)
    """

    def __init__(self, params: Iterable[nn.Parameter]):
        self.arrived: dict[int, tuple[nn.Parameter, tuple[int, ...]]] = {}
        self.handles = [
            param.register_post_accumulate_grad_hook(self._record)
            for param in params
            if param.requires_grad and 1 in param.shape
        ]

    def _record(self, param: nn.Parameter) -> None:
        # after autograd accumulated the gradient, before DDP's hook reduces it into its bucket
        self.arrived.setdefault(id(param), (param, param.grad.stride()))

    def apply(self) -> int:
        """Restride the parameters (same storage, same values); returns how many changed."""
        for handle in self.handles:
            handle.remove()
        changed = 0
        for param, stride in self.arrived.values():
            if stride != param.stride() and all(
                size == 1 or a == b for size, a, b in zip(param.shape, param.stride(), stride, strict=True)
            ):
                param.data = param.data.as_strided(param.shape, stride)
                changed += 1
        self.arrived.clear()
        return changed


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

    def _setup_distributed(self) -> None:
        join_elastic_attempt(self._get_process_group_backend(), self._timeout, self.root_device)
        super()._setup_distributed()  # Lightning's set-up; it keeps a process group that exists


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel axis of a ModelParallelStrategy mesh (the mesh itself when it has one axis)."""
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


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


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` as whole CPU copies, FSDP2 shards (DTensors) gathered: a collective, call on every rank
    with the same names in the same order.

    Copies, not views: on CPU `.cpu()` returns the parameter itself, which a caller may change after.
    """
    state = {}
    for key, value in tensors.items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().cpu().clone()
    return state


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s full state dict as CPU copies, FSDP2 shards gathered (a collective: call on every rank)."""
    return gathered(module.state_dict())
