"""The dataset stage (tfd.datastore) on a synthetic EDM zip: conversion speed and the trainer's memory.

Writes an EDM-style dataset zip of `--images` random `--size`x`--size` RGB PNGs over `--classes`
classes (`make_edm_zip`, also used by tests/test_datastore.py at tiny sizes) in a temporary folder,
then prints:
- conversion time and images/s of `tfd.datastore.build_store` with 1 and 2 worker processes;
- the peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) of a fresh process that builds the
  trainer's sampler and draws `--batches` TFD-shaped batches (`--groups` classes x `--per-class`
  images) from (a) the memory-mapped store (`StoreSampler`) and (b) the old in-memory path
  (`load_edm_zip` + `ClassBalancedSampler` on float32), each in its own subprocess, beside (c) a
  process that only imports them (torch and its libraries: the floor of every path); with the
  resident memory at the end split into anonymous (the process's own) and file-backed (shared
  libraries and the pages of the mapped store: the kernel's reclaimable file cache), from
  /proc/self/status.

Usage: python benchmarks/bench_datastore.py [--images 20000] [--size 64] [--classes 100] [--batches 200]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_edm_zip(path: str | Path, n: int, size: int = 64, num_classes: int = 100, seed: int = 0,
                 channels: int = 3) -> Path:
    """Write an EDM dataset zip (`dataset_tool.py` layout: `00000/img00000000.png`, ... in folders of
    1000, and `dataset.json` with `{"labels": [[name, class], ...]}`) of `n` random uint8
    `size`x`size`x`channels` PNGs, image i of class `i % num_classes`. Returns `path`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(n):
            a = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a[:, :, 0] if channels == 1 else a).save(buf, format="PNG")
            name = f"{i // 1000:05d}/img{i:08d}.png"
            z.writestr(name, buf.getvalue())
            labels.append([name, i % num_classes])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return Path(path)


DRAW_CODE = r"""
import json, resource, sys, time
import torch
from tfd.data import ClassBalancedSampler, StoreSampler, load_edm_zip
from tfd.datastore import open_store
torch.set_num_threads(1)
mode, source, batches, G, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
gen = torch.Generator().manual_seed(0)
t0 = time.perf_counter()
if mode == "baseline":  # the imports only: what every path pays before it holds any data
    sampler = None
elif mode == "store":
    sampler = StoreSampler(open_store(source), gen)
else:
    x, y = load_edm_zip(source)
    sampler = ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), gen)
t_ready = time.perf_counter() - t0
for _ in range(batches if sampler is not None else 0):
    imgs, cond = sampler.sample(G, k)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
print(json.dumps({"ready_s": t_ready, "draw_s": time.perf_counter() - t0 - t_ready,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_anon_mb": int(status["RssAnon"].split()[0]) / 1024,
                  "rss_file_mb": int(status["RssFile"].split()[0]) / 1024}))
"""


def draw_in_subprocess(mode: str, source: Path, batches: int, groups: int, per_class: int) -> dict:
    """Peak RSS and timings of a fresh process drawing `batches` batches (`mode` store / memory)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", DRAW_CODE, mode, str(source), str(batches), str(groups),
                          str(per_class)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--groups", type=int, default=10, help="classes per batch (TFD imagenet64: groups_per_rank 10)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (TFD: n_pos 4 + n_anchor 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    from tfd.datastore import build_store

    with tempfile.TemporaryDirectory(prefix="bench_datastore_") as d:
        d = Path(d)
        build_store(make_edm_zip(d / "warm.zip", 8, 8, 2), d / "warm", progress=False)  # one-time imports
        t0 = time.perf_counter()
        zpath = make_edm_zip(d / "data.zip", a.images, a.size, a.classes)
        print(f"synthetic zip: {a.images} random {a.size}x{a.size} RGB PNGs, {a.classes} classes, "
              f"{zpath.stat().st_size / 2**20:.1f} MiB, written in {time.perf_counter() - t0:.1f} s")
        print("\nconversion (tfd.datastore.build_store; includes hashing the zip and the arrays)")
        print("| workers | time (s) | images/s |\n|---:|---:|---:|")
        for w in a.workers:
            t0 = time.perf_counter()
            build_store(zpath, d / f"store{w}", workers=w, progress=False)
            dt = time.perf_counter() - t0
            print(f"| {w} | {dt:.2f} | {a.images / dt:,.0f} |", flush=True)
        store = d / f"store{a.workers[0]}"
        print(f"\ntrainer's sampler, {a.batches} batches of {a.groups} classes x {a.per_class} images "
              "(each path in a fresh process)")
        print("| data path | peak RSS (MiB) | RSS at end: anon / file-backed (MiB) | ready (s) | draws (s) |")
        print("|---|---:|---:|---:|---:|")
        for mode, label, src in (("store", "memory-mapped store (StoreSampler)", store),
                                 ("memory", "in memory (load_edm_zip + ClassBalancedSampler)", zpath),
                                 ("baseline", "imports only, no data (floor)", zpath)):
            r = draw_in_subprocess(mode, src, a.batches, a.groups, a.per_class)
            print(f"| {label} | {r['peak_rss_mb']:,.0f} | {r['rss_anon_mb']:,.0f} / {r['rss_file_mb']:,.0f} | "
                  f"{r['ready_s']:.2f} | {r['draw_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
