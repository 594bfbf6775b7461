"""benchmarks/bench_gpu.py at tiny shapes on the CPU (its JSON schema, FLOPs > 0) and `tfd plan`: its
arithmetic against a hand computation, the dry-run parser, and the "not measured" message."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tfd.config import load_config
from tfd.plan import (
    NOT_MEASURED,
    format_plan,
    jobs_from_config,
    jobs_from_dry_run,
    make_plan,
    parse_dry_run,
    train_record,
)

from tests.helpers import ROOT

TRAIN_KEYS = {"kind", "bench", "method", "params", "batch", "seconds_per_iter", "flops_per_iter", "tflops_per_s",
              "mfu", "peak_memory_mb", "iters"}
SAMPLE_KEYS = {"kind", "bench", "nfe", "batch", "seconds_per_image", "seconds_per_image_per_nfe", "images_per_s",
               "peak_memory_mb"}


def _tfd(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tfd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--tiny", "--device", "cpu",
                        "--iters", "1", "--sample-batches", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_bench_gpu_tiny_schema(bench_json):
    d = json.loads(bench_json.read_text())
    assert d["schema"] == "tfd.bench_gpu/1" and d["device"] == "cpu" and d["dtype"] == "fp32" and d["tiny"] is True
    assert d["torch"] and d["peak_bf16_tflops"] is None and d["memory"] == "cpu_max_rss"
    jobs = d["jobs"]
    assert set(jobs) == {f"{b}/{k}" for b in ("imagenet64", "coco2014") for k in ("tfd", "dmd2", "onestep", "heun")
                         } | {"inception"}
    for key, rec in jobs.items():
        if rec["kind"] == "train":
            assert TRAIN_KEYS <= set(rec) and rec["flops_per_iter"] > 0 and rec["seconds_per_iter"] > 0, rec
            assert rec["mfu"] is None and rec["tflops_per_s"] > 0
        elif rec["kind"] == "sample":
            assert SAMPLE_KEYS <= set(rec) and rec["images_per_s"] > 0, rec
            assert rec["seconds_per_image_per_nfe"] == pytest.approx(rec["seconds_per_image"] / rec["nfe"])
        else:
            assert rec["kind"] == "features" and rec["images_per_s"] > 0 and rec["weights"] == "random"
    assert jobs["imagenet64/heun"]["nfe"] == 7 and jobs["imagenet64/onestep"]["nfe"] == 1
    r = _tfd("plan", "--bench", "imagenet64", "--costs", bench_json, "--gpus", "4")
    assert r.returncode == 0, r.stderr
    assert "--tiny shapes" in r.stdout and "wall time on 4 GPU(s)" in r.stdout
    assert "imagenet64/cd: not measured" in r.stdout   # cd is not benchmarked: never priced


MINI = {"benchmark": "mini", "text_benchmark": None, "modes_benchmark": None, "benchmarks": {"mini": {
    "data": {"kind": "digits"}, "num_classes": 10, "resolution": 8, "channels": 1,
    "eval": {"num_samples": 20, "shards": 2, "convergence_samples": 10},
    "table1": ["teacher_ode", "tfd", "cd", "paper_x"],
    "runs": {"teacher_ode": {"method": "heun", "sampler": {"steps": 3}},
             "tfd": {"method": "tfd", "train": {"steps": 100, "eval_every": 50}},
             "cd": {"method": "cd", "train": {"steps": 10}},
             "paper_x": {"method": "reported", "nfe": 1, "paper": {"fid": 1.0}}}}}}
COSTS = {"schema": "tfd.bench_gpu/1", "device": "made up", "dtype": "bf16", "torch": "x", "tiny": False, "jobs": {
    "mini/tfd": {"kind": "train", "bench": "mini", "run": "tfd", "method": "tfd", "seconds_per_iter": 36.0},
    "mini/onestep": {"kind": "sample", "seconds_per_image_per_nfe": 9.0},
    "mini/heun": {"kind": "sample", "seconds_per_image_per_nfe": 18.0},
    "inception": {"kind": "features", "seconds_per_image": 3.6}}}


@pytest.fixture
def mini(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(MINI))
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    return tmp_path


def test_plan_arithmetic_by_hand(mini):
    cfg = load_config(mini / "config.yaml")
    plan = make_plan(jobs_from_config(cfg, ["mini"]), COSTS, gpus=2)
    # distill tfd: 100 it x 36 s + convergence 2 points x 10 images x (1 NFE x 9 s + 3.6 s) = 3852 s;
    # cd: not measured (left out).
    assert plan.hours["distill"] == pytest.approx((100 * 36 + 2 * 10 * (9 + 3.6)) / 3600)
    # samples: teacher_ode 20 images x 5 NFE (3 Heun steps) x 18 s; tfd and cd 20 x 1 x 9 s; 2 shards each
    assert plan.counts["sample"] == 6
    assert plan.hours["sample"] == pytest.approx((20 * 5 * 18 + 20 * 9 + 20 * 9) / 3600)
    # scores: three rows x 20 images x 3.6 s (the reported row has no jobs)
    assert plan.counts["score"] == 3 and plan.hours["score"] == pytest.approx(3 * 20 * 3.6 / 3600)
    total = (3852 + 1800 + 180 + 180 + 216) / 3600
    assert plan.total_h == pytest.approx(total)
    assert plan.unmeasured == {"distill": 1, "sample": 0, "score": 0, "teacher pairs": 0, "positives": 0}
    assert list(plan.missing) == ["mini/cd"]
    # wall: longest chain tfd = 3852 + 90 (a shard: 10 x 9 s) + 72 s; total / 2 = 3114 s
    assert plan.wall_h == pytest.approx(max(total / 2, (3852 + 90 + 72) / 3600))
    # 7 ranks per distill job: 7x its GPU-hours, the same wall time
    plan7 = make_plan(jobs_from_config(cfg, ["mini"], distill_gpus=7), COSTS, gpus=2)
    assert plan7.hours["distill"] == pytest.approx(7 * plan.hours["distill"])
    assert plan7.wall_h == pytest.approx(max(plan7.total_h / 2, (3852 + 90 + 72) / 3600))
    text = format_plan(plan, COSTS, "mini")
    assert f"mini/cd: {NOT_MEASURED}" in text and f"{total:.1f}" in text


def test_train_record_prices_a_run_by_itself_else_by_its_method():
    rec = {k: {"kind": "train", "bench": "b", "run": k[2:], "method": m, "seconds_per_iter": s}
           for k, m, s in (("b/tfd", "tfd", 1.0), ("b/tfd_el", "tfd", 2.0), ("b/cd_l2", "cd", 3.0))}
    costs = {"jobs": {**rec, "c/tfd": {**rec["b/tfd"], "bench": "c"}}}
    assert train_record(costs, "b", "tfd_el@s1", "tfd") is rec["b/tfd_el"]       # a replica: its run's record
    assert train_record(costs, "b", "feature_noise__0.5", "tfd") is rec["b/tfd"]  # a sweep value: the method's run
    assert train_record(costs, "b", "cd_huber", "cd") is rec["b/cd_l2"]           # any run of the method
    assert train_record(costs, "b", "dmd", "dmd") is None and train_record(None, "b", "tfd", "tfd") is None


def test_plan_from_dry_run_equals_config(mini):
    cfg = load_config(mini / "config.yaml")
    blocks = []
    for j in jobs_from_config(cfg, ["mini"]):
        rule = {"distill": "distill", "sample": "sample_shard", "score": "score"}[j.kind]
        wc = f"bench=mini, method=x, run={j.run}" + (", k={}, n={}".format(*j.shard.split("of")) if j.shard else "")
        blocks.append(f"rule {rule}:\n    input: a\n    output: b\n    jobid: 1\n    wildcards: {wc}\n"
                      f"    resources: tmpdir=<TBD>, gpu=1\n")
    blocks.append("localrule table1:\n    input: a\n    jobid: 9\n")
    jobs, other = jobs_from_dry_run(cfg, parse_dry_run("\n".join(blocks) + "\nJob stats:\n"))
    assert other == 1
    # text rules have no bench wildcard: it comes from the output path
    text = ("rule positives_shard:\n    input: x\n    output: results/coco2014/positives/abc/shard0of2.safetensors\n"
            "    jobid: 3\n    wildcards: key=abc, k=0, n=2\n")
    assert parse_dry_run(text) == [("positives_shard", {"key": "abc", "k": "0", "n": "2", "bench": "coco2014"})]
    assert make_plan(jobs, COSTS, 2) == make_plan(jobs_from_config(cfg, ["mini"]), COSTS, 2)


def test_plan_without_costs_says_not_measured(mini):
    r = _tfd("plan", "--config", mini / "config.yaml", cwd=mini)
    assert r.returncode == 0, r.stderr
    assert NOT_MEASURED in r.stdout and "distill" in r.stdout and "n/a" in r.stdout
    r = _tfd("plan", "--config", mini / "config.yaml", "--costs", mini / "costs.json", "--gpus", "2", cwd=mini)
    assert r.returncode == 0 and "total" in r.stdout and "mini/cd: not measured" in r.stdout, r.stdout + r.stderr
    (mini / "bad.json").write_text('{"schema": "other"}')
    r = _tfd("plan", "--config", mini / "config.yaml", "--costs", mini / "bad.json", cwd=mini)
    assert r.returncode == 1 and "bad.json" in r.stderr and "bench_gpu" in r.stderr
    (mini / "quiet.txt").write_text("Job stats:\njob  count\n")
    r = _tfd("plan", "--config", mini / "config.yaml", "--jobs", mini / "quiet.txt", cwd=mini)
    assert r.returncode == 1 and "no jobs found" in r.stderr
