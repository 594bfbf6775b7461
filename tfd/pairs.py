"""Teacher noise/image pairs for DMD's regression loss (Yin et al. 2024b): a DAG stage and its file.

Pair i: condition `i % num_conditions`, seed `pair_seed(seed, i)` (63-bit, from numpy's SeedSequence
of the two integers, so the pairs never share noise with the evaluation images, whose seeds are
`eval.base_seed + i`), noise z_i = `randn(sample_shape)` of a CPU generator with that seed, and
target y_i = the teacher's deterministic EDM Heun ODE solution (`tfd.sampling.edm_sampler`, S_churn
0, `steps` steps over the teacher's sigma range, EDM's rho 7) started from `sigma_max * z_i`: the
image DMD's generator G(sigma_max z_i) is regressed onto. A pair depends only on its index, so the
bytes do not depend on the sharding or the batch size.

Files (safetensors, written atomically with the tensors' sha256, `eval.io`):
- a shard (`tfd teacher-pairs --shard k/n`, rule `teacher_pairs`): rows `num * k // n ..
  num * (k + 1) // n`;
- the cache (`tfd merge-pairs`, rule `merge_teacher_pairs`):
  `results/<bench>/pairs/<key>/pairs.safetensors`, `key` = `pairs_key(settings)`, shared by every
  run with the same settings.
Tensors: `noise` [N, *sample_shape] float32, `target` [N, *sample_shape] float32, `cond` [N] int64,
`seed` [N] int64, `index` [N] int64. Metadata: `format` (`FORMAT`), `key`, `settings` (num, steps,
seed), `sample_shape`, `num_conditions`, `sigma_max`, `teacher` (path) and `teacher_sha256`, and for
a shard `shard` [k, n] and `rows` [start, stop]. `load_pairs` is the checked reader: a missing,
damaged, foreign or mismatched file is a `BadFile` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from eval.errors import BadFile, UserError
from eval.io import atomic_save_safetensors, load_safetensors, read_safetensors_metadata

FORMAT = "tfd.teacher_pairs.v1"
TENSORS = ("noise", "target", "cond", "seed", "index")
SETTINGS = ("num", "steps", "seed")   # what shapes the pairs (shards only split the work)


def pairs_settings(params) -> dict:
    """The pair settings of a DMD run's params (`pairs_num`, `pairs_steps`, `pairs_seed`)."""
    return {"num": int(params.pairs_num), "steps": int(params.pairs_steps), "seed": int(params.pairs_seed)}


def pairs_key(settings: dict) -> str:
    """12 hex digits naming a pairs cache: sha256 of its settings (`SETTINGS`)."""
    d = {k: settings[k] for k in SETTINGS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def pair_seed(seed: int, index: int) -> int:
    """The noise seed of pair `index` (63-bit)."""
    return int(np.random.SeedSequence([int(seed), int(index), 0x7061697273]).generate_state(1, np.uint64)[0] >> 1)


def pair_noise(seeds, shape) -> torch.Tensor:
    """z `[len(seeds), *shape]` float32: one CPU `torch.randn` per seed."""
    return torch.stack([torch.randn(list(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def teacher_ode(teacher, z: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
    """The teacher's deterministic EDM Heun solution from `sigma_max * z` (float32, model space)."""
    from tfd.sampling import HeunCfg, edm_sampler
    return edm_sampler(teacher.denoise, cond, SimpleNamespace(randn=lambda shape: z), teacher.sample_shape,
                       HeunCfg(steps=int(steps)), teacher.sigma_min, teacher.sigma_max)


def make_pairs_shard(teacher, settings: dict, num_conditions: int, shard: tuple[int, int], out,
                     teacher_path: str | os.PathLike = "", teacher_sha256: str = "", batch_size: int = 250,
                     device="cpu", progress: bool = True) -> dict:
    """Write shard `k` of `n` of the pairs of `settings` -> `out`; returns its metadata."""
    from eval.sample import shard_indices
    k, n = shard
    if settings["num"] < 1 or settings["steps"] < 1:
        raise UserError(f"pairs: num and steps must be >= 1, got {settings}")
    rows = shard_indices(settings["num"], k, n)
    idx = torch.arange(rows.start, rows.stop, dtype=torch.int64)
    seeds = torch.tensor([pair_seed(settings["seed"], i) for i in idx.tolist()], dtype=torch.int64)
    cond = idx % max(int(num_conditions), 1)
    noise = pair_noise(seeds.tolist(), teacher.sample_shape) if len(idx) else \
        torch.zeros((0, *teacher.sample_shape))
    targets = []
    for lo in tqdm(range(0, len(idx), batch_size), desc=f"teacher pairs {k}/{n}", disable=not progress):
        z = noise[lo:lo + batch_size].to(device)
        targets.append(teacher_ode(teacher, z, cond[lo:lo + batch_size].to(device), settings["steps"]).cpu())
    target = torch.cat(targets) if targets else torch.zeros_like(noise)
    meta = {"format": FORMAT, "key": pairs_key(settings), "settings": {k_: settings[k_] for k_ in SETTINGS},
            "sample_shape": list(teacher.sample_shape), "num_conditions": int(num_conditions),
            "sigma_max": float(teacher.sigma_max), "teacher": str(teacher_path), "teacher_sha256": teacher_sha256,
            "shard": [k, n], "rows": [rows.start, rows.stop]}
    tensors = {"noise": noise.float().contiguous(), "target": target.float().contiguous(), "cond": cond,
               "seed": seeds, "index": idx}
    atomic_save_safetensors(tensors, out, meta)
    return meta


def _meta(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadFile(path, "teacher pairs file not found",
                      hint="made by rules teacher_pairs + merge_teacher_pairs (tfd teacher-pairs, tfd merge-pairs)")
    meta = read_safetensors_metadata(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadFile(path, "not a teacher pairs file", key="format", expected=repr(FORMAT),
                      found=repr(meta.get("format") if isinstance(meta, dict) else None))
    return meta


def merge_pairs(parts: list, out) -> dict:
    """Join shard files (any order) into the pairs cache `out`; BadFile / UserError naming the files
    when they are not one complete, contiguous set of shards of the same settings and teacher."""
    metas = [_meta(p) for p in parts]
    same = {(m["key"], m.get("teacher_sha256"), m["shard"][1]) for m in metas}
    if len(same) != 1:
        raise UserError(f"teacher pairs shards {list(map(str, parts))} mix settings, teachers or shard counts")
    order = sorted(range(len(parts)), key=lambda i: metas[i]["rows"][0])
    stops = [0] + [metas[i]["rows"][1] for i in order]
    if len(parts) != metas[0]["shard"][1] or any(metas[i]["rows"][0] != stops[j] for j, i in enumerate(order)) \
            or stops[-1] != metas[0]["settings"]["num"]:
        raise UserError(f"teacher pairs shards {list(map(str, parts))} do not cover the pairs once, in order")
    loaded = [load_pairs(parts[i])[0] for i in order]
    tensors = {k: torch.cat([d[k] for d in loaded]).contiguous() for k in TENSORS}
    meta = {k: v for k, v in metas[0].items() if k not in ("shard", "rows")}
    meta["shards"] = len(parts)
    atomic_save_safetensors(tensors, out, meta)
    return meta


def load_pairs(path, key: str | None = None, teacher_sha256: str | None = None, sample_shape=None,
               num_conditions: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a pairs file (shard or cache), checked: `BadFile` naming `path` when it is
    missing, not a safetensors file, damaged (checksum), of another format, lacks a tensor, has tensors
    of inconsistent length, shape or dtype, non-finite values, conditions out of range, or (when given)
    another settings `key`, teacher (`teacher_sha256`), `sample_shape` or `num_conditions`."""
    meta = _meta(path)
    tensors, _ = load_safetensors(path, "teacher pairs")
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise BadFile(path, "teacher pairs file lacks tensors", expected=list(TENSORS), found=sorted(tensors))
    shape = tuple(meta.get("sample_shape") or ())
    n = len(tensors["index"])
    for k in TENSORS:
        t = tensors[k]
        want = (n, *shape) if k in ("noise", "target") else (n,)
        if tuple(t.shape) != want:
            raise BadFile(path, "wrong shape", key=k, expected=want, found=tuple(t.shape))
        dtype = torch.float32 if k in ("noise", "target") else torch.int64
        if t.dtype != dtype:
            raise BadFile(path, "wrong dtype", key=k, expected=str(dtype), found=str(t.dtype))
    for k in ("noise", "target"):
        if not torch.isfinite(tensors[k]).all():
            raise BadFile(path, "non-finite values", key=k)
    nc = int(meta.get("num_conditions", 0))
    if n and nc and (int(tensors["cond"].min()) < 0 or int(tensors["cond"].max()) >= nc):
        raise BadFile(path, "condition ids out of range", key="cond", expected=f"0..{nc - 1}")
    if key is not None and meta.get("key") != key:
        raise BadFile(path, "teacher pairs made with other settings", key="key", expected=key, found=meta.get("key"),
                      hint="rebuild them (rules teacher_pairs + merge_teacher_pairs)")
    if teacher_sha256 and meta.get("teacher_sha256") and meta["teacher_sha256"] != teacher_sha256:
        raise BadFile(path, "teacher pairs made with another teacher", key="teacher_sha256",
                      expected=teacher_sha256[:12], found=str(meta["teacher_sha256"])[:12],
                      hint="rebuild them (rules teacher_pairs + merge_teacher_pairs)")
    if sample_shape is not None and shape != tuple(sample_shape):
        raise BadFile(path, "teacher pairs of another sample shape", expected=tuple(sample_shape), found=shape)
    if num_conditions is not None and nc != int(num_conditions):
        raise BadFile(path, "teacher pairs of another number of conditions", expected=num_conditions, found=nc)
    return tensors, meta
