"""Distributed correctness of a whole TFD step through the shared trainer, and torchrun.

Two gloo ranks, each holding half of one combined batch's condition groups, produce the same loss
(mean over ranks) and the same all-reduced generator gradients as one process on the combined
batch (<= 1e-5). A `torchrun --nproc_per_node 2` run of `tfd distill` trains and exports.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tfd.trainer import TrainCfg, Trainer

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _method():
    from tests.helpers import make_method
    return make_method()


def _combined_batch(method, G):
    torch.manual_seed(7)
    method.params.groups_per_rank = G
    batch = method.make_batch()
    return batch


def _slice(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def _step(rank, world, outdir):
    m = _method()
    G = 4
    batch = _combined_batch(m, G)
    n = G // world
    part = _slice(batch, rank * n, (rank + 1) * n)
    m.params.groups_per_rank = n
    m.make_batch = lambda: part
    t = Trainer(m, TrainCfg(steps=1, lr=1e-3, warmup_steps=1, grad_clip=0.0), outdir, progress=False)
    metrics = t.train_one_step()
    grads = {k: p.grad.clone() for k, p in m.generator.named_parameters() if p.grad is not None}
    return metrics["loss/generator"], grads


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_step(rank, WORLD, outdir), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_on_combined_batch(tmp_path):
    sys.path.insert(0, str(ROOT))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single_loss, single_grads = _step(0, 1, tmp_path / "single")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert abs(sum(r[0] for r in ranks) / WORLD - single_loss) <= 1e-5 * abs(single_loss)
    for k, g in single_grads.items():
        for r in ranks:  # after the all-reduce every rank holds the averaged gradient
            err = (r[1][k] - g).abs().max().item()
            assert err <= 1e-5 * max(g.abs().max().item(), 1e-8) + 1e-9, (k, err)


@pytest.mark.slow
def test_torchrun_distill_two_processes(tmp_path, tiny_config):
    cfg = tiny_config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    _method().teacher.save(tmp_path / "teacher.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "tfd.cli", "--", "distill", "--config", str(tmp_path / "config.yaml"), "--run", "tfd",
           "--teacher", str(tmp_path / "teacher.safetensors"), "--out-dir", str(tmp_path / "run"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    import json
    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert info["world_size"] == 2 and info["iters"] == 3
    assert (tmp_path / "run" / "ckpt" / "training-state.dcp" / "__1_0.distcp").is_file()  # sharded checkpoint
