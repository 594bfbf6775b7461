"""Distributed training that scales (issue 16 item 2): bucketed gradient all-reduce, FSDP2 and sharded
checkpoints, each checked on 2 gloo ranks against one process on the combined batch.

Every step draws one combined batch from seeds shared by all ranks; rank r trains on its half (every
batch entry splits along dim 0), one process on the whole. After k steps the weights agree (<= 1e-6).
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from tfd import dist
from tfd.trainer import TrainCfg, Trainer

WORLD = 2
STEPS = 3
ROOT = Path(__file__).resolve().parents[1]
SMALL_BUCKET_MB = 0.004  # 4 KiB: the tiny networks' gradients span many buckets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(kind: str):
    """A tiny method whose `make_batch` draws the combined batch of both ranks."""
    from tests.helpers import make_method
    if kind == "tfd":
        m = make_method()
        m.params.groups_per_rank = 4
        return m
    from tfd.data import ClassBalancedSampler, digits_arrays
    from tfd.denoiser import EDMDenoiser
    from tfd.methods.cd import CD, CDParams
    from tfd.methods.dmd2 import DMD2, DMD2Params
    from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
    torch.manual_seed(123)
    teacher = EDMDenoiser(EDMPrecond(**digits_unet_kwargs(model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                                          attn_resolutions=[])))
    x, y = digits_arrays()
    data = ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(0))
    if kind == "cd":  # its `target` network has an optimiser that never steps
        return CD(teacher, data, CDParams(batch_per_rank=4))
    return DMD2(teacher, data, DMD2Params(batch_per_rank=4, dfake_gen_update_ratio=2))  # generator: steps 0, 2


def split_batches(method, rank: int, world: int):
    """Make `method.make_batch` draw the combined batch from per-step seeds and keep this rank's part."""
    draw, step = method.make_batch, [0]

    def part():
        torch.manual_seed(1000 + step[0])
        step[0] += 1
        return {k: v.chunk(world)[rank] for k, v in draw().items()}

    method.make_batch = part
    return method


def train(kind: str, rank: int, world: int, run_dir, **train_kw) -> dict:
    """Weights of every trainable network after STEPS steps ({net: {name: tensor}})."""
    m = split_batches(make(kind), rank, world)
    cfg = TrainCfg(steps=STEPS, lr=1e-3, warmup_steps=1, grad_clip=1.0, **train_kw)
    t = Trainer(m, cfg, run_dir, progress=False)
    if cfg.shard == "fsdp" and world > 1:  # really sharded: each rank holds its half of every weight
        from torch.distributed.tensor import DTensor
        params = [p for net in t.nets.values() for p in net.parameters()]
        assert all(isinstance(p, DTensor) for p in params)
        assert sum(p.to_local().numel() for p in params) <= sum(p.numel() for p in params) // world + 100
    for _ in range(STEPS):
        t.train_one_step()
    return _full_weights(t)


def _worker(rank, port, outdir, kind, train_kw):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(train(kind, rank, WORLD, Path(outdir) / "run", **train_kw), Path(outdir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def two_ranks(kind: str, tmp_path, **train_kw) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), kind, train_kw), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_same_weights(single: dict, ranks: list[dict], tol: float = 1e-6) -> None:
    for net, weights in single.items():
        for name, w in weights.items():
            for r, got in enumerate(ranks):
                err = (got[net][name] - w).abs().max().item()
                assert err <= tol, (net, name, r, err)


# -- bucketed all-reduce ---------------------------------------------------------------------------

def test_buckets_follow_ddps_rule():
    ts = [torch.zeros(n) for n in (100, 100, 600, 50, 50)]  # 4 bytes each: 400, 400, 2400, 200, 200 B
    mb = 1000 / 2**20
    got = [[t.numel() for t in b] for b in dist.buckets(ts, mb)]
    assert got == [[100, 100], [600], [50, 50]]
    mixed = [torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)]
    assert [len(b) for b in dist.buckets(mixed, 1.0)] == [1, 2]


def test_small_bucket_cap_gives_several_buckets():
    for kind in ("tfd", "dmd2"):
        for net in make(kind).networks().values():
            grads = [p for p in net.parameters() if p.requires_grad]
            assert len(dist.buckets(grads, SMALL_BUCKET_MB)) > 5


@pytest.mark.parametrize("kind", ["tfd", "dmd2"])
def test_bucketed_two_ranks_equal_one_process(tmp_path, kind):
    ranks = two_ranks(kind, tmp_path, bucket_cap_mb=SMALL_BUCKET_MB)
    single = train(kind, 0, 1, tmp_path / "single")
    assert_same_weights(single, ranks)
    moved = max((single["generator"][n] - w).abs().max().item()
                for n, w in make(kind).generator.state_dict().items())
    assert moved > 1e-4  # the test can fail: the generator did train


# -- FSDP2 -----------------------------------------------------------------------------------------

def _full_weights(t: Trainer) -> dict:
    from tfd import fsdp
    return {k: {n: fsdp.full(v).detach().clone() for n, v in net.state_dict().items()} for k, net in t.nets.items()}


@pytest.mark.parametrize("kind", ["tfd", "dmd2"])
def test_fsdp_two_ranks_equal_one_process(tmp_path, kind):
    ranks = two_ranks(kind, tmp_path, shard="fsdp")
    single = train(kind, 0, 1, tmp_path / "single")
    assert_same_weights(single, ranks)


# -- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------------

def _resume_worker(rank, port, outdir, kind, train_kw):
    from tests.helpers import crash_and_resume
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cfg = TrainCfg(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2, ema_halflife_steps=2.0,
                       **train_kw)
        ref, resumed = crash_and_resume(lambda: make(kind), cfg, Path(outdir))
        out = {"step": resumed.step, "ref": _full_weights(ref), "resumed": _full_weights(resumed),
               "unstepped": sorted(k for t in (ref, resumed) for k, opt in t.opts.items() if not opt.state)}
        for name, t in (("ref_ema", ref), ("resumed_ema", resumed)):
            from tfd import fsdp
            out[name] = {n: fsdp.full(v).clone() for n, v in t.ema.state_dict().items()}
        torch.save(out, Path(outdir) / f"resume{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("kind,shard", [("tfd", "none"), ("tfd", "fsdp"), ("cd", "none")])
def test_sharded_checkpoint_resumes_exactly(tmp_path, kind, shard):
    from eval.errors import UserError
    sys.path.insert(0, str(ROOT))
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path), kind, {"shard": shard}), nprocs=WORLD, join=True)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"resume{r}.pt", weights_only=False)
        assert got["step"] == 6
        # writing or reading a checkpoint leaves a never-stepped optimiser (CD's target) untouched
        assert got["unstepped"] == (["target", "target"] if kind == "cd" else [])
        assert_same_weights(got["ref"], [got["resumed"]], tol=1e-7)
        assert_same_weights({"ema": got["ref_ema"]}, [{"ema": got["resumed_ema"]}], tol=1e-7)
    ckpt = tmp_path / "b" / "ckpt"
    files = {p.name for p in (ckpt / "training-state.dcp").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.json"} <= files
    assert (ckpt / "training-state.prev.dcp" / "trainer.json").is_file()
    assert not list(ckpt.glob("*.pt"))  # no single-file checkpoints under torchrun
    # written by 2 processes, resumed by 1: a one-line UserError saying what to do
    with pytest.raises(UserError, match=r"2 process.*--nproc_per_node 2.*--no-resume") as e:
        Trainer(make(kind), TrainCfg(steps=7, checkpoint_every=3, shard=shard), tmp_path / "b",
                progress=False).fit()
    assert "\n" not in str(e.value)


# -- config ----------------------------------------------------------------------------------------

def test_new_train_keys_leave_run_specs_and_checkpoints_as_they_were():
    from dataclasses import asdict

    from tfd.config import params_spec
    assert set(asdict(TrainCfg())) - set(params_spec(TrainCfg())) == {"bucket_cap_mb", "shard"}
    assert params_spec(TrainCfg(shard="fsdp"))["shard"] == "fsdp"
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        TrainCfg(bucket_cap_mb=0)


def test_precision_maps_to_torch_mixed_precision_policy():
    from tfd import fsdp
    assert fsdp.policy("fp32").param_dtype is None
    bf16 = fsdp.policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp.policy("fp16").param_dtype == torch.float16


@pytest.mark.slow
def test_allreduce_memory_benchmark_runs_at_a_tiny_size():
    import json
    import subprocess
    script = ROOT / "benchmarks" / "bench_allreduce_memory.py"
    r = subprocess.run([sys.executable, str(script), "--model-channels", "16", "--bucket-cap-mb", "1"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(r.stdout.strip().splitlines()[-1])["ranks"]
    assert sorted((x["path"], x["rank"]) for x in recs) == [("bucketed", 0), ("bucketed", 1), ("old", 0), ("old", 1)]
    assert "peak increase MB" in r.stdout
