"""A small torch.distributed shim that also works in a single process (after NVlabs/edm's).

Launch with `torchrun --nproc_per_node=N ...`; without torchrun every function degrades to the
single-process case, so library code never branches on "am I distributed".
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> None:
    """Initialise the default process group when started by torchrun (RANK/WORLD_SIZE set)."""
    if dist.is_available() and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend=backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (differentiable-free: use on detached statistics)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (on detached statistics)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def buckets(tensors: list[torch.Tensor], bucket_cap_mb: float) -> list[list[torch.Tensor]]:
    """Consecutive groups of `tensors` of one dtype and device, each at most `bucket_cap_mb` MB
    (2**20 bytes) unless it is a single tensor larger than that (DDP's bucketing rule, in the order given)."""
    cap_bytes = bucket_cap_mb * 2**20
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > cap_bytes or (t.dtype, t.device) != (last[0].dtype, last[0].device):
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def all_reduce_mean_(tensors: list[torch.Tensor], bucket_cap_mb: float = 25.0) -> None:
    """Average `tensors` (any shapes and dtypes, e.g. a network's gradients) over ranks, in place, one
    `all_reduce` per bucket of at most `bucket_cap_mb` MB (`buckets`). A bucket of one contiguous tensor
    is reduced in place; a bucket of several is packed into one flat buffer of the bucket's size and
    copied back, so the extra memory is at most one bucket, never a copy of every tensor. Sum then
    divide (gloo has no ReduceOp.AVG). A no-op in one process."""
    if not is_distributed():
        return
    world = get_world_size()
    for bucket in buckets(tensors, bucket_cap_mb):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            bucket[0].div_(world)
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))
        del flat


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)
