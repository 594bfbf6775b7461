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

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.errors import BadFile, UserError
from eval.io import atomic_savez, read_npz

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
        raise UserError(f"--shard must look like k/n (e.g. 0/10), got {spec!r}") from None
    if not 0 <= k < n:
        raise UserError(f"--shard {spec}: need 0 <= k < n")
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
        check_finite_images(x, f"the sampler ({getattr(sampler, '__name__', type(sampler).__name__)})",
                            first_seed=int(base_seed + b[0]))
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


def check_finite_images(x: torch.Tensor, what: str, first_seed: int | None = None) -> None:
    """Refuse a batch of generated images `x` (float, any layout, any device) holding NaN or inf
    (quantisation would silently turn them into black pixels): UserError naming `what` (the
    generator), the number of non-finite values and images, and the batch's first seed."""
    bad = ~torch.isfinite(x.detach())
    if bad.any():
        per_image = bad.flatten(1).any(1) if x.ndim > 1 else bad
        where = f" (batch from seed {first_seed})" if first_seed is not None else ""
        raise UserError(f"{what} produced {int(bad.sum())} non-finite values (NaN/inf) in "
                        f"{int(per_image.sum())} of {len(x)} images{where}; the generator is broken (diverged "
                        "training or a bad checkpoint)")


@dataclass(frozen=True)
class SampleSpec:
    """What a benchmark's sample file must hold (None: not checked). `num_samples` images with
    seeds `base_seed .. base_seed + num_samples - 1` (the protocol: a complete set), `channels` and
    square `resolution` of `arr_0`, condition ids `arr_1` in `0 .. num_conditions - 1` (class
    benchmarks). `tfd.runs.sample_spec(b)` makes the spec of a benchmark."""
    num_samples: int | None = None
    base_seed: int | None = None
    channels: int | None = None
    resolution: int | None = None
    num_conditions: int | None = None

    def without_count(self) -> "SampleSpec":
        """The spec of one shard: layout and conditions, not the protocol's count and seeds."""
        return replace(self, num_samples=None, base_seed=None)


def _seed_range(seeds: np.ndarray) -> str:
    return f"{len(seeds)} images, seeds {int(seeds.min())}..{int(seeds.max())}" if len(seeds) else "no images"


def check_complete(seeds: np.ndarray, num_samples: int, base_seed: int, path) -> None:
    """Refuse a sample set that is not exactly the protocol's: `num_samples` images with seeds
    `base_seed .. base_seed + num_samples - 1`, each once (a missing first or last shard is as
    wrong as a hole in the middle). BadFile naming `path` and the key `seeds`."""
    want = np.arange(base_seed, base_seed + num_samples)
    if len(seeds) == num_samples and np.array_equal(np.sort(seeds), want):
        return
    s = set(map(int, seeds))
    missing = [int(v) for v in want if int(v) not in s]
    extra = sorted(v for v in s if not base_seed <= v < base_seed + num_samples)
    dup = len(seeds) - len(s)
    found = _seed_range(seeds) + "".join(
        f"; {k}" for k in ([f"{len(missing)} missing (first {missing[0]})"] if missing else [])
        + ([f"{len(extra)} outside the range (first {extra[0]})"] if extra else [])
        + ([f"{dup} duplicated"] if dup else []))
    raise BadFile(path, "not the protocol's sample set", key="seeds",
                  expected=f"{num_samples} images with seeds {base_seed}..{base_seed + num_samples - 1} "
                           "(eval.num_samples, eval.base_seed)", found=found,
                  hint="sample the missing shards or rerun sampling with the config's settings")


def read_samples(path: str | os.PathLike, spec: SampleSpec | None = None, *, need_seeds: bool = True) -> dict:
    """Read and check a sample npz (the one reader of the format): -> dict `arr_0` uint8 NHWC
    `[N, H, W, C]`, `arr_1` int64 `[N]` or None, `seeds` int64 `[N]` (or None when absent and not
    needed), `quantisation` str, `conditions_sha256` str or None.

    Checks, each a `BadFile` naming the file, the array, what was expected and what was found: a
    readable npz (a truncated or damaged file, a CRC error); `arr_0` present, uint8, 4-d NHWC with 1
    or 3 channels (NCHW is recognised and named), `spec.channels` / `spec.resolution`; `arr_1` a
    flat integer vector of one id per image (in `0 .. spec.num_conditions - 1`); `seeds` present
    (`need_seeds`), one per image, each once; with `spec.num_samples`/`spec.base_seed` the complete
    protocol set (`check_complete`), and with `spec.num_conditions` too, for a file `tfd sample` wrote
    (it has `source`), the protocol's condition of every image (class `(seed - base_seed) %
    num_conditions`; other files may label their images freely, in range). FileNotFoundError when
    the file is missing."""
    path = Path(path)
    spec = spec or SampleSpec()
    z = read_npz(path, "sample file")
    keys = set(z)
    if "arr_0" not in keys:
        raise BadFile(path, "no images", key="arr_0", expected="uint8 NHWC images [N, H, W, C]",
                      found=f"keys {sorted(keys)}")
    out = {k: z[k] for k in ("arr_0", "arr_1", "seeds") if k in keys}
    out["quantisation"] = str(z["quantisation"]) if "quantisation" in keys else QUANTISATION
    out["conditions_sha256"] = str(z["conditions_sha256"]) if "conditions_sha256" in keys else None
    out["source"] = str(z["source"]) if "source" in keys else None  # run and weights (tfd sample)
    images = out["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        nchw = images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3)
        raise BadFile(path, "wrong image layout", key="arr_0", expected="uint8 NHWC [N, H, W, C] with C 1 or 3",
                      found=f"{images.dtype} {tuple(images.shape)}",
                      hint="this looks like NCHW: store a.transpose(0, 2, 3, 1)" if nchw else None)
    n, h, w, c = images.shape
    if spec.channels is not None and c != spec.channels:
        raise BadFile(path, "wrong number of channels", key="arr_0", expected=f"{spec.channels} (the benchmark's)",
                      found=f"{c} (shape {tuple(images.shape)})")
    if spec.resolution is not None and (h, w) != (spec.resolution, spec.resolution):
        raise BadFile(path, "wrong resolution", key="arr_0", expected=f"{spec.resolution}x{spec.resolution}",
                      found=f"{h}x{w}")
    labels = out.get("arr_1")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
            raise BadFile(path, "wrong condition ids", key="arr_1",
                          expected=f"a flat integer vector of {n} condition ids (one per image)",
                          found=f"{labels.dtype} {tuple(labels.shape)}",
                          hint="one-hot labels: store labels.argmax(1)" if labels.ndim == 2 else None)
        labels = labels.astype(np.int64)
        if spec.num_conditions is not None and n and (labels.min() < 0 or labels.max() >= spec.num_conditions):
            raise BadFile(path, "condition id out of range", key="arr_1",
                          expected=f"0..{spec.num_conditions - 1}", found=f"{int(labels.min())}..{int(labels.max())}")
    elif spec.num_conditions is not None:
        raise BadFile(path, "no condition ids", key="arr_1", expected=f"{n} class labels (a class-conditional "
                      "benchmark)", found=f"keys {sorted(keys)}")
    out["arr_1"] = labels
    seeds = out.get("seeds")
    if seeds is None:
        if need_seeds or spec.num_samples is not None:
            raise BadFile(path, "no per-image seeds", key="seeds", expected=f"{n} int seeds (written by tfd sample)",
                          found=f"keys {sorted(keys)}")
        out["seeds"] = None
    else:
        if seeds.ndim != 1 or seeds.dtype.kind not in "iu" or len(seeds) != n:
            raise BadFile(path, "wrong seeds", key="seeds", expected=f"a flat integer vector of {n} seeds",
                          found=f"{seeds.dtype} {tuple(seeds.shape)}")
        out["seeds"] = seeds = seeds.astype(np.int64)
        if len(np.unique(seeds)) != n:
            raise BadFile(path, "duplicated seeds", key="seeds", expected="each seed once",
                          found=f"{n - len(np.unique(seeds))} duplicates")
        if spec.num_samples is not None:
            check_complete(seeds, spec.num_samples, spec.base_seed or 0, path)
        if (spec.num_conditions is not None and spec.base_seed is not None and labels is not None and n
                and out["source"] is not None):  # a file of `tfd sample`: image i has class i % C (the protocol)
            want = (seeds - spec.base_seed) % spec.num_conditions
            bad = np.flatnonzero(labels != want)
            if len(bad):
                raise BadFile(path, "condition ids are not the protocol's", key="arr_1",
                              expected=f"class (seed - {spec.base_seed}) % {spec.num_conditions} for every image",
                              found=f"{len(bad)} of {n} differ (first: seed {int(seeds[bad[0]])} has "
                                    f"{int(labels[bad[0]])}, expected {int(want[bad[0]])})")
    return out


def merge_npz(parts: list[str | Path], out: str | Path, spec: SampleSpec | None = None) -> dict[str, np.ndarray]:
    """Join shard files in seed order. Each shard is read with `read_samples` (its layout checked
    against `spec`); refuses gaps, duplicates and mixed condition lists, and with
    `spec.num_samples` a set that is not the protocol's complete one (`check_complete`: a missing
    first or last shard too). Writes `out` atomically; returns the merged arrays."""
    spec = spec or SampleSpec()
    loaded = [read_samples(p, spec.without_count()) for p in parts]
    seeds = np.concatenate([d["seeds"] for d in loaded])
    order = np.argsort(seeds, kind="stable")
    seeds = seeds[order]
    if len(seeds) and not np.array_equal(seeds, np.arange(seeds[0], seeds[0] + len(seeds))):
        dup = len(seeds) - len(np.unique(seeds))
        gap = int(seeds[-1] - seeds[0] + 1) - len(np.unique(seeds))
        what = "; ".join(x for x in (f"{dup} seeds in two shards (overlap)" if dup else "",
                                     f"{gap} seeds missing between {int(seeds[0])} and {int(seeds[-1])}" if gap
                                     else "") if x)
        per = ", ".join(f"{p}: {_seed_range(d['seeds'])}" for p, d in zip(parts, loaded))
        raise UserError(f"shards do not form one contiguous seed range ({what}): {per}")
    if spec.num_samples is not None:
        check_complete(seeds, spec.num_samples, spec.base_seed or 0, f"shards {', '.join(map(str, parts))}")
    if len({d["arr_0"].shape[1:] for d in loaded}) > 1:
        raise UserError(f"shards {list(map(str, parts))} hold images of different shapes "
                        f"{sorted({d['arr_0'].shape[1:] for d in loaded})}")
    merged = {k: np.concatenate([d[k] for d in loaded])[order] for k in ("arr_0",)}
    labels = [d["arr_1"] for d in loaded]
    if any(x is None for x in labels) and not all(x is None for x in labels):
        raise UserError(f"shards {list(map(str, parts))}: some have condition ids (arr_1), some not")
    if labels[0] is not None:
        merged["arr_1"] = np.concatenate(labels)[order]
    merged["seeds"] = seeds
    sources = {d["source"] for d in loaded}
    if len(sources) > 1:
        raise UserError(f"shards {list(map(str, parts))} were sampled from different runs or weights "
                        f"({'; '.join(sorted(map(str, sources)))})")
    if sources != {None}:
        merged["source"] = np.array(sources.pop())
    hashes = {d["conditions_sha256"] for d in loaded}
    if len(hashes) > 1:
        raise UserError(f"shards {list(map(str, parts))} were sampled with different condition lists "
                        f"(conditions_sha256: {sorted(map(str, hashes))})")
    if hashes != {None}:
        merged["conditions_sha256"] = np.array(hashes.pop())
    save_npz(out, merged)
    return merged
