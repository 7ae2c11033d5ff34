"""One process, or one of many under torchrun: which rank this is, its device, and the few collectives used.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs as rank 0 of 1 and no process
group is made. GPUs talk over NCCL, CPUs over gloo. Training wraps the network in DistributedDataParallel (every
rank holds the whole model) or, with --fsdp, FSDP2's fully_shard per decoder layer (parameters, gradients and
optimizer state sharded over the ranks).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..inputs import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks (a new tensor on every rank)."""
        t = t.detach().clone()
        if self.active:
            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None, timeout_minutes: float = 30.0) -> Dist:
    """This process's place: from torchrun's environment, or rank 0 of 1. device: 'cpu', 'cuda' (each rank takes
    cuda:LOCAL_RANK) or None (CUDA when there is one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local, dev)


def wrap(net: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module each rank trains through: `net` itself (one process), DDP, or FSDP2 shards."""
    if fsdp:
        if not d.active:
            raise ValueError("--fsdp shards the model over ranks: run it under torchrun with 2 or more processes")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for layer in net.lm.layers:
            if layer.cross_attn is not None:   # MusicLM.cross_kv runs it from the root's forward, not the layer's
                fully_shard(layer.cross_attn.kv, mesh=mesh)
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers off: the only buffer is the LM's fixed position table, the same on every rank
        return DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
    return net


def sync_gradients(module: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: gradients are reduced over ranks only on the last one (the
    others accumulate locally), as nanoGPT does with require_backward_grad_sync."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP) and not enabled:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):   # FSDP2
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
