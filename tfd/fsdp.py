"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainer's networks (`train.shard: fsdp`).

Which modules become FSDP units: every module that owns parameters itself (convolutions, linear
layers, norms, ...), each its own unit with `reshard_after_forward=True`. The methods call their
networks through `Denoiser.denoise` / `features` / `raw` and submodules (DMD2's GAN head), seldom
through the network's own `forward`; FSDP2 gathers a unit's parameters in that unit's forward
pre-hook, so only modules whose forward is certain to run may hold parameters of a unit: the modules
that own parameters are the ones whose forward uses them. Each unit gathers its weights just before
its forward and frees them after (and again in backward), so a rank holds the full weights of one
layer at a time, its shard of the weights, gradients and AdamW moments otherwise. The price is one
all-gather per layer per call (coarser units, e.g. per UNet block, would need each network to name
the modules it calls through `forward`).

Mixed precision: `train.precision` maps to torch's `MixedPrecisionPolicy` (bf16/fp16: parameters
gathered and computed in that dtype, gradients reduced in fp32; fp32: none).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from tfd import dist


def policy(precision: str):
    """`MixedPrecisionPolicy` of `train.precision` ("fp32" | "bf16" | "fp16"): parameters in the
    compute dtype for all-gather and compute, gradient reduce-scatter in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def mesh(device: torch.device):
    """A 1-D device mesh over all ranks (`init_device_mesh`) on `device`'s type (cpu: gloo, cuda: nccl)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard(net: nn.Module, device_mesh, mp_policy) -> nn.Module:
    """Apply `fully_shard` in place to every module of `net` that owns parameters (innermost first;
    see the module docstring). Returns `net` (its parameters are now DTensors sharded on dim 0)."""
    from torch.distributed.fsdp import fully_shard
    units = [m for m in net.modules() if next(m.parameters(recurse=False), None) is not None]
    for m in reversed(units):  # modules() is pre-order: reversed puts descendants before ancestors
        fully_shard(m, mesh=device_mesh, mp_policy=mp_policy, reshard_after_forward=True)
    return net


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of `net`'s structure on the meta device (no memory), to rebuild full copies from."""
    return copy.deepcopy(net).to_empty(device="meta")


def full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective), `t` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_copy(net: nn.Module, shapes: nn.Module) -> nn.Module | None:
    """An unsharded copy of the sharded `net` on rank 0 (None on the others), built from `shapes`
    (`meta_copy` of it before sharding) with the weights gathered to rank 0's CPU
    (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), in eval mode, without gradients.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    out = copy.deepcopy(shapes).to_empty(device="cpu")
    out.load_state_dict(state, strict=True)
    return out.eval().requires_grad_(False)
