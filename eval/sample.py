"""Deterministic, sharded sampling: image `i` uses seed `base + i` and condition `i % len(conditions)`.

The output does not depend on the number of shards or the batch size: each image draws its noise
from its own generator (`StackedRandom`), and shards are contiguous index ranges merged back in
index order. File format: npz with `arr_0` uint8 NHWC images, `arr_1` int64 condition ids (class
labels on a class-conditional benchmark: the ADM/EDM exchange format), `seeds`, and for a prompt
table its `conditions_sha256` (see `eval.conditions`).

This module also holds the suite's one EDM quantisation (`quantise_edm`, described by
`QUANTISATION`, which every metric file records) and its inverse (`dequantise_edm`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.io import atomic_savez

QUANTISATION = "edm: uint8(clip(x*127.5+128, 0, 255)) (floor of x*127.5+128; EDM generate.py)"


def quantise_edm(x: torch.Tensor) -> torch.Tensor:
    """Images float in [-1, 1] -> uint8 exactly as EDM's generate.py (see QUANTISATION):
    `(x*127.5+128).clip(0,255).to(uint8)`, computed in float32 (the cast truncates, i.e. floors
    the clipped value). Any layout (NCHW from a generator) and device; returns a uint8 tensor of
    the same shape on the same device, detached."""
    return (x.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def dequantise_edm(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] as `u8 / 127.5 - 1` (how networks trained on [-1, 1]
    read quantised images). Any layout and device; same shape, same device."""
    return u8.to(torch.float32) / 127.5 - 1.0


def to_nhwc_numpy(x: torch.Tensor) -> np.ndarray:
    """NCHW tensor (any device) -> NHWC numpy array on the CPU, same dtype (the npz layout)."""
    return x.permute(0, 2, 3, 1).cpu().numpy()


class StackedRandom:
    """One torch.Generator per image seed; `randn` stacks one draw per generator (EDM's idea).

    `seeds`: iterable of ints (taken modulo 2**63); the draws are made on the CPU (so they do not
    depend on the device) and moved to `device`. `randn(shape)` -> float32 `[len(seeds), *shape]`."""

    def __init__(self, seeds, device="cpu"):
        self.device = device
        self.gens = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(list(shape), generator=g) for g in self.gens]).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:])


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'k/n' (zero-based k) -> (k, n); None -> (0, 1)."""
    if not spec:
        return 0, 1
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like k/n (e.g. 0/10), got {spec!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {spec}: need 0 <= k < n")
    return k, n


def shard_indices(num: int, k: int, n: int) -> range:
    """Contiguous index range of shard k of n over `num` images."""
    return range(num * k // n, num * (k + 1) // n)


def generate(sampler, num: int, conditions, base_seed: int = 0, batch_size: int = 250,
             shard: tuple[int, int] = (0, 1), device="cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """Run `sampler(cond, rnd) -> images [B, C, H, W] in [-1, 1]` over this shard's images.

    Image `i` gets condition `conditions.for_samples(i)` (= `ids[i % len]`, see
    `eval.conditions`) and seed `base_seed + i`. Returns the npz arrays: `arr_0` uint8 NHWC,
    `arr_1` int64 condition ids `[n]`, `seeds` int64 `[n]`, and `conditions_sha256` (0-d str)
    when the condition list has a hash (a prompt table)."""
    rng = shard_indices(num, *shard)
    idx = np.arange(rng.start, rng.stop)
    images, conds = [], []
    for start in tqdm(range(0, len(idx), batch_size), desc="sampling", disable=not progress, unit="batch"):
        b = idx[start:start + batch_size]
        c = torch.as_tensor(conditions.for_samples(b), dtype=torch.long, device=device)
        x = sampler(c, StackedRandom(base_seed + b, device=device))
        images.append(to_nhwc_numpy(quantise_edm(x)))
        conds.append(c.cpu().numpy())
    out = {"arr_0": np.concatenate(images) if images else np.zeros((0,), np.uint8),
           "arr_1": np.concatenate(conds) if conds else np.zeros((0,), np.int64),
           "seeds": (base_seed + idx).astype(np.int64)}
    if conditions.sha256 is not None:
        out["conditions_sha256"] = np.array(conditions.sha256)
    return out


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an npz atomically (`eval.io.atomic_savez`), so a killed job leaves no half file."""
    atomic_savez(path, **arrays)


def merge_npz(parts: list[str | Path], out: str | Path) -> dict[str, np.ndarray]:
    """Join shard files in seed order; refuses gaps and duplicates."""
    loaded = [np.load(p) for p in parts]
    seeds = np.concatenate([d["seeds"] for d in loaded])
    order = np.argsort(seeds, kind="stable")
    seeds = seeds[order]
    if len(seeds) and not np.array_equal(seeds, np.arange(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"shards {list(map(str, parts))} do not form one contiguous seed range")
    merged = {k: np.concatenate([d[k] for d in loaded])[order] for k in ("arr_0", "arr_1")}
    merged["seeds"] = seeds
    hashes = {str(d["conditions_sha256"]) if "conditions_sha256" in d else None for d in loaded}
    if len(hashes) > 1:
        raise ValueError(f"shards {list(map(str, parts))} were sampled with different condition lists "
                         f"(conditions_sha256: {sorted(map(str, hashes))})")
    if hashes != {None}:
        merged["conditions_sha256"] = np.array(hashes.pop())
    save_npz(out, merged)
    return merged
