"""Wall time per generator update of TFD and DMD2 on the embedded text-to-image benchmark, in one run.

Usage (after `snakemake --cores 2 results/table2.csv` has built the teacher and the positives):
    OMP_NUM_THREADS=2 python benchmarks/bench_text_update.py [--iters 30] [--bench digits_text]

Both methods are built from their config rows (`runs.tfd`, `runs.dmd2`) on the same frozen teacher
(training prompts bound) and positives cache, and timed through the shared trainer's
`train_one_step` (batch drawing, forward, backward, clipping, optimiser and EMA), alternating
blocks of iterations so machine noise hits both alike. DMD2 updates its generator on every
`dfake_gen_update_ratio`-th iteration (two time-scale update), so its time per generator update is
the time of that many iterations. Prints one line per method and the ratio, then a JSON line.
"""
from __future__ import annotations

import argparse
import glob
import json
import time

import torch


def main():
    from eval.conditions import load_prompt_table
    from tfd.config import load_config
    from tfd.runs import build_method, load_teacher
    from tfd.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--bench", default="digits_text")
    ap.add_argument("--runs", nargs=2, default=["tfd", "dmd2"])
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per method (after 3 warm-up)")
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    cfg = load_config(args.config, {"benchmark": args.bench, "text_benchmark": None})
    b = cfg.bench()
    root = f"{args.results}/{args.bench}"
    prompts = sorted(glob.glob(f"{root}/train_prompts/*.jsonl"))
    positives = sorted(glob.glob(f"{root}/positives/*/positives.safetensors"))
    if not (prompts and positives):
        raise SystemExit(f"no training prompts / positives under {root}: run the DAG first (rule merge_positives)")
    teacher = load_teacher(b, f"{root}/teacher/pipeline", "cpu", prompts=load_prompt_table(prompts[0]))
    trainers = {}
    for run in args.runs:
        m = build_method(b, run, teacher, positives=positives[0])
        trainers[run] = Trainer(m, b.runs[run].train, f"/tmp/bench_text_update/{run}", progress=False)
    spent = {r: 0.0 for r in trainers}
    for t in trainers.values():  # warm-up
        for _ in range(3):
            t.train_one_step()
    start = {r: dict(t.updates) for r, t in trainers.items()}
    block = 5
    for _ in range(0, args.iters, block):
        for r, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(block):
                t.train_one_step()
            spent[r] += time.perf_counter() - t0
    out = {"threads": torch.get_num_threads(), "iters": args.iters}
    for r, t in trainers.items():
        gen = t.updates["generator"] - start[r]["generator"]
        out[r] = {"s_per_iter": spent[r] / args.iters, "generator_updates": gen,
                  "s_per_generator_update": spent[r] / max(gen, 1)}
        print(f"{r:6s} {out[r]['s_per_iter'] * 1e3:8.1f} ms/iteration  {gen:3d} generator updates  "
              f"{out[r]['s_per_generator_update'] * 1e3:8.1f} ms per generator update")
    a, c = args.runs
    out["ratio_per_generator_update"] = out[c]["s_per_generator_update"] / out[a]["s_per_generator_update"]
    print(f"{c}/{a} wall time per generator update: {out['ratio_per_generator_update']:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
