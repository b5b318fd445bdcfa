"""Process-group helpers for `torchrun` launches (and plain single-process runs).

A run is distributed when torchrun's environment is present (WORLD_SIZE > 1): the process group is
nccl on GPUs and gloo on CPUs, and multi-node runs need nothing beyond torchrun's own flags
(--nnodes, --node_rank, --rdzv_endpoint, ...). Without it, everything runs in this process with no
process group at all.
"""
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""            # "" when no process group was created

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK must be an integer, got {os.environ.get('RANK')!r}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is available, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group when there is one; returns this process's rank, world and device."""
    world = env_world_size()
    rank = env_rank() if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else 0
    dev = resolve_device(device, local_rank)
    if world == 1:
        return DistContext(0, 1, 0, dev, "")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # one process per GPU, nccl
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def cleanup(ctx: DistContext) -> None:
    if ctx.backend and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of `tensor` over all ranks (in place); the tensor itself when not distributed."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def all_gather(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Stack of `tensor` from every rank, (world_size, *tensor.shape)."""
    if not ctx.distributed:
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def all_gather_object(obj: Any, ctx: DistContext) -> List[Any]:
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()
