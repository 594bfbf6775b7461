"""Peak memory of one gradient all-reduce step: the old flat-concat path vs the bucketed one.

Spawns `--ranks` gloo processes on the CPU (a fresh group per path). Each builds the EDM ImageNet-64
ADM network (`tfd.networks.imagenet64_adm_kwargs`: 295.9M parameters at `--model-channels 192`) with
uninitialised-then-random weights, fills every gradient with random values (no forward/backward), resets
the kernel's peak-RSS mark (`/proc/self/clear_refs` 5, Linux), runs one all-reduce of all gradients and
reads the peak back (`VmHWM` in `/proc/self/status`; torch's CPU allocations go through malloc, which
tracemalloc does not see). Prints, per path and rank, the peak RSS increase over the RSS before the step,
in MB (2**20 bytes), and the gradient size for scale; last line: the numbers as JSON.

    old:      torch.cat of every gradient, one all_reduce, copy back (the trainer before issue 16)
    bucketed: tfd.dist.all_reduce_mean_ with `--bucket-cap-mb` (the trainer now; DDP's default 25)

    python benchmarks/bench_allreduce_memory.py [--model-channels 192] [--ranks 2] [--bucket-cap-mb 25]

Memory: about (3 + 1 old path) x 4 B x parameters per rank (weights, gradients, the flat copy);
295.9M parameters x 2 ranks peak near 10 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfd import dist  # noqa: E402
from tfd.networks import EDMPrecond, imagenet64_adm_kwargs  # noqa: E402

MB = 2**20


def _status_kb(field: str) -> int:
    """A `kB` field (VmRSS, VmHWM) of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def reset_peak_rss() -> None:
    """Set the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0, `man 5 proc`: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def flat_concat_allreduce(grads: list[torch.Tensor]) -> None:
    """The trainer's all-reduce before issue 16 (verbatim arithmetic): one flat copy of every gradient."""
    flat = torch.cat([g.flatten() for g in grads])
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def build(model_channels: int) -> torch.nn.Module:
    """The ADM network, weights random (normal * 0.01, no init cost), gradients random."""
    kw = {**imagenet64_adm_kwargs(), "model_channels": model_channels}
    with torch.device("meta"):
        net = EDMPrecond(**kw)
    net = net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    for p in net.parameters():
        with torch.no_grad():
            p.normal_(0, 0.01, generator=g)
        p.grad = torch.randn(p.shape, generator=g)
    return net


def _worker(rank, world, port, path, model_channels, bucket_cap_mb, out):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = build(model_channels)
        grads = [p.grad for p in net.parameters()]
        n_params = sum(p.numel() for p in net.parameters())
        tdist.barrier()
        reset_peak_rss()
        before_kb = _status_kb("VmRSS")
        if path == "old":
            flat_concat_allreduce(grads)
        else:
            dist.all_reduce_mean_(grads[::-1], bucket_cap_mb)
        peak_kb = _status_kb("VmHWM")
        rec = {"path": path, "rank": rank, "params": n_params, "grad_mb": n_params * 4 / MB,
               "rss_before_mb": before_kb * 1024 / MB, "peak_increase_mb": (peak_kb - before_kb) * 1024 / MB}
        torch.save(rec, os.path.join(out, f"{path}-{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: str, ranks: int, model_channels: int, bucket_cap_mb: float, out: str) -> list[dict]:
    """One all-reduce step of `path` ("old" / "bucketed") on `ranks` fresh gloo processes; a record per rank."""
    mp.spawn(_worker, args=(ranks, _free_port(), path, model_channels, bucket_cap_mb, out), nprocs=ranks, join=True)
    return [torch.load(os.path.join(out, f"{path}-{r}.pt")) for r in range(ranks)]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-channels", type=int, default=192, help="192: the ImageNet-64 teacher (295.9M params)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    a = ap.parse_args(argv)
    import tempfile
    recs = []
    with tempfile.TemporaryDirectory() as out:
        for path in ("old", "bucketed"):
            recs += measure(path, a.ranks, a.model_channels, a.bucket_cap_mb, out)
    print(f"{'path':>9} {'rank':>4} {'params':>12} {'grads MB':>9} {'RSS before MB':>14} {'peak increase MB':>17}")
    for r in recs:
        print(f"{r['path']:>9} {r['rank']:>4} {r['params']:>12,} {r['grad_mb']:>9.1f} {r['rss_before_mb']:>14.1f} "
              f"{r['peak_increase_mb']:>17.1f}")
    print(json.dumps({"bucket_cap_mb": a.bucket_cap_mb, "model_channels": a.model_channels, "ranks": recs}))
    return recs


if __name__ == "__main__":
    main()
