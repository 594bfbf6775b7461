"""The embedded teacher's training step on a CPU shared with another process: threads x OpenMP wait policy.

For each setting (torch threads 1 or 2; OMP_WAIT_POLICY unset (libgomp's default: spin a while,
then sleep) or PASSIVE (sleep at once)) a fresh process builds the `digits` teacher of config.yaml
(ADM UNet, model_channels 16, 8x8x1, batch 128) and times EDM training steps (`tfd.train_teacher`'s
loss, Adam), first alone, then beside `--competitors` CPU-bound processes (a 1-thread torch matmul
loop each). Settings are interleaved in rounds so that slow drift of the machine hits all alike.
Prints ms per step (median over rounds) and the slowdown beside a competitor; the README's "CPU
threads" table is this script's output.

Usage: python benchmarks/bench_cpu_threads.py [--seconds 6] [--rounds 2] [--competitors 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP_CODE = r"""
import json, sys, time, torch
from tfd.config import TeacherCfg
from tfd.denoiser import EDMDenoiser
from tfd.train_teacher import build_teacher_arch, edm_loss
torch.manual_seed(0)
cfg = TeacherCfg(arch="digits", arch_overrides={"model_channels": 16})
net = EDMDenoiser(build_teacher_arch(cfg, 10, 8, 1), trainable=True).train()
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
x, y = torch.randn(128, 1, 8, 8).clamp(-1, 1), torch.randint(0, 10, (128,))
def step():
    loss = edm_loss(net, x, y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for _ in range(3):
    step()
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    step(); n += 1
print(json.dumps({"ms_per_step": (time.perf_counter() - t0) / n * 1000, "threads": torch.get_num_threads()}))
"""

BUSY_CODE = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a)
"""


def measure(threads: int, policy: str | None, seconds: float) -> float:
    """ms per teacher step in a fresh process with `threads` OpenMP threads and wait `policy`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if policy:  # else libgomp's default (STEP_CODE imports torch before tfd: tfd's own default stays out)
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", STEP_CODE, str(seconds)], env=env, capture_output=True,
                         text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["threads"] == threads, rec
    return rec["ms_per_step"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all settings (median reported)")
    ap.add_argument("--competitors", type=int, default=1, help="CPU-bound processes beside the step")
    args = ap.parse_args(argv)
    settings = [(t, p) for t in (1, 2) for p in (None, "PASSIVE")]
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for busy in (0, args.competitors):
            procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(busy)]
            try:
                time.sleep(1.0 if busy else 0.0)
                for t, p in settings:
                    times.setdefault((t, p, busy), []).append(measure(t, p, args.seconds))
            finally:
                for q in procs:
                    q.kill()
                    q.wait()
    print(f"cpus {os.cpu_count()}, {args.rounds} rounds x {args.seconds:g} s, competitors {args.competitors}")
    print("| threads | OMP_WAIT_POLICY | ms/step alone | ms/step beside competitor | slowdown |")
    print("|---:|:---|---:|---:|---:|")
    for t, p in settings:
        alone = statistics.median(times[(t, p, 0)])
        beside = statistics.median(times[(t, p, args.competitors)])
        print(f"| {t} | {p or 'unset (libgomp default)'} | {alone:.1f} | {beside:.1f} | {beside / alone:.2f}x |")


if __name__ == "__main__":
    main()
