"""Training replicas (`seeds:` on a run or a sweep): config expansion, the table's mean and 95%
t-interval over seeds, the per-replica csv, the Welch comparison column, and the DAG's jobs."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tfd.config import ConfigError, load_config
from tfd.tables import read_csv, t_interval, write_table

from tests.helpers import ROOT


def _cfg(runs=None, **bench):
    over = {"text_benchmark": None, "benchmarks": {"digits": {"runs": runs or {}, **bench}}}
    return load_config(ROOT / "config.yaml", over)


def test_seeds_expand_into_replicas_sharing_everything_but_the_training_seed():
    b = _cfg({"dmd2": {"seeds": [3, 1]}, "tfd": {"seeds": None}}).bench()
    assert b.row_runs("dmd2") == ["dmd2@s3", "dmd2@s1"] and b.row_runs("tfd") == ["tfd"]
    base = b.runs["dmd2"]
    for name, seed in (("dmd2@s3", 3), ("dmd2@s1", 1)):
        r = b.runs[name]
        assert r.train.seed == seed and r.seeds is None
        assert r.params == base.params and r.method == base.method
        assert {k: v for k, v in vars(r.train).items() if k != "seed"} == \
               {k: v for k, v in vars(base.train).items() if k != "seed"}


def test_a_sweep_with_seeds_replicates_every_variant():
    b = _cfg().bench()
    name = next(iter(b.ablations))
    abl = {name: {"seeds": [0, 1]}}
    b = _cfg(ablations=abl).bench()
    for _, variant in b.ablations[name].variants:
        assert b.row_runs(variant) == [f"{variant}@s0", f"{variant}@s1"]


@pytest.mark.parametrize("runs,bench,match", [
    ({"teacher_ode": {"seeds": [0, 1]}}, {}, "sampler row"),
    ({"tfd": {"seeds": [0, 0]}}, {}, "repeats a seed"),
    ({}, {"compare_to": "nope"}, "compare_to: run 'nope' is not defined"),
])
def test_bad_seed_configs_name_the_key(runs, bench, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(runs, **bench)


def test_t_interval_is_students():
    v = [10.0, 12.0, 11.5, 9.0]
    mean, hw = t_interval(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))  # scipy's own interval
    assert mean == pytest.approx(np.mean(v)) and hw == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert math.isnan(t_interval([4.0])[1])


def _metric(d, metric, value, n):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{metric}.json").write_text(json.dumps({"metric": metric, "value": value, "n": n}))


def test_table_reports_mean_interval_replicas_and_welch(tmp_path):
    cfg = _cfg({"dmd2": {"seeds": [0, 1, 2]}, "tfd": {"seeds": [0, 1, 2]}}, table1=["dmd2", "tfd", "teacher_ode"],
               compare_to="dmd2", ablations={})
    b = cfg.bench()
    n = b.eval.num_samples
    fids = {"dmd2": [30.0, 31.0, 29.5], "tfd": [10.0, 11.0, 10.5], "teacher_ode": [5.0]}
    for row, values in fids.items():
        for run, v in zip(b.row_runs(row), values):
            for m in b.eval.metrics:
                _metric(tmp_path / "digits" / b.runs[run].method / run / "metrics", m, v if m == "fid_digits" else 0.5,
                        n)
    df = write_table(cfg, tmp_path, tmp_path / "table1.csv").set_index("run")
    mean, hw = t_interval(fids["tfd"])
    assert df.loc["tfd", "fid_digits"] == pytest.approx(round(mean, 4)) and df.loc["tfd", "seeds"] == 3
    assert df.loc["tfd", "fid_digits_ci95"] == pytest.approx(round(hw, 4))
    assert pd.isna(df.loc["teacher_ode", "fid_digits_ci95"]) and df.loc["teacher_ode", "fid_digits"] == 5.0
    p = stats.ttest_ind(fids["tfd"], fids["dmd2"], equal_var=False).pvalue
    # Welch's test written out: t and Welch-Satterthwaite degrees of freedom
    a, c = np.array(fids["tfd"]), np.array(fids["dmd2"])
    va, vc = a.var(ddof=1) / len(a), c.var(ddof=1) / len(c)
    t = (a.mean() - c.mean()) / np.sqrt(va + vc)
    dof = (va + vc) ** 2 / (va ** 2 / (len(a) - 1) + vc ** 2 / (len(c) - 1))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), dof), rel=1e-10)
    assert df.loc["tfd", "vs_dmd2"] == f"lower (p={p:.3g})" and df.loc["dmd2", "vs_dmd2"] == "reference"
    assert df.loc["teacher_ode", "vs_dmd2"].startswith("n/a")
    reps = pd.read_csv(tmp_path / "table1_replicas.csv")
    assert sorted(reps["replica"]) == sorted(b.row_runs("dmd2") + b.row_runs("tfd"))
    assert reps.set_index("replica").loc["tfd@s1", "fid_digits"] == 11.0
    md = (tmp_path / "table1.md").read_text()
    assert "95% Student-t interval" in md and "Welch" in md and "never best-of" in md


def test_tiny_dag_trains_replicas_not_the_base(run_snakemake, tmp_path):
    """The tiny DAG's `dmd2` row has seeds [0, 1]: its replicas are distilled, sampled and scored,
    the base run is not, and table1 reads both replicas."""
    import shutil
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    r = run_snakemake(tmp_path, "results/table1.csv", "-n", "--forceall", "--configfile", ROOT / ".test/config.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    jobs = re.findall(r"rule distill:\n(?:.*\n)*?    wildcards: bench=digits, method=(\w+), run=([^\s,]+)", out)
    runs = {run for _, run in jobs}
    assert {"dmd2@s0", "dmd2@s1"} <= runs and "dmd2" not in runs, runs


def test_fid_bootstrap_equals_an_independent_resampling():
    """The sample-set interval: the same resamples (numpy default_rng(0)) scored by an independent
    Frechet computation (np.cov + scipy.linalg.sqrtm written out) give the same percentiles."""
    import scipy.linalg

    from eval.metrics import fid, fid_bootstrap
    rng = np.random.default_rng(5)
    ref_f = rng.normal(size=(400, 6))
    feats = rng.normal(0.3, 1.1, size=(300, 6))
    ref = {"mu": ref_f.mean(0), "sigma": np.cov(ref_f, rowvar=False)}
    got = fid_bootstrap(feats, ref, 30, seed=0)

    def frechet(f):
        mu, s = f.mean(0), np.cov(f, rowvar=False)
        covmean = scipy.linalg.sqrtm(s @ ref["sigma"]).real
        return float(((mu - ref["mu"]) ** 2).sum() + np.trace(s + ref["sigma"] - 2 * covmean))

    r = np.random.default_rng(0)
    want = np.percentile([frechet(feats[r.integers(0, 300, 300)]) for _ in range(30)], [2.5, 97.5])
    assert got["ci95"] == pytest.approx(list(want), rel=1e-8)
    value, details = fid(feats, ref, bootstrap=30)
    assert details["ci95"] == got["ci95"] and details["ci95"][0] < value < details["ci95"][1]
    assert "ci95" not in fid(feats, ref)[1]  # the convergence record's FID: no bootstrap


def test_single_seed_rows_show_the_bootstrap_interval(tmp_path):
    cfg = _cfg({"tfd": {"seeds": None}}, table1=["tfd"], ablations={})
    b = cfg.bench()
    d = tmp_path / "digits" / "tfd" / "tfd" / "metrics"
    for m in b.eval.metrics:
        _metric(d, m, 7.0, b.eval.num_samples)
    rec = json.loads((d / "fid_digits.json").read_text())
    rec["provenance"] = {"ci95": [6.0, 9.0]}
    (d / "fid_digits.json").write_text(json.dumps(rec))
    (tmp_path / "t_replicas.csv").write_text("run,replica,seed,fid_digits\ntfd,tfd@s0,0,5.0\n")  # an earlier config's
    df = write_table(cfg, tmp_path, tmp_path / "t.csv").set_index("run")
    assert df.loc["tfd", "fid_digits_ci95"] == 1.5 and df.loc["tfd", "ci95_over"] == "sample images (bootstrap)"
    assert "percentile-bootstrap" in (tmp_path / "t.md").read_text()
    # the replicas file is one of the table's fixed outputs: header only here, the stale rows gone
    reps = read_csv(tmp_path / "t_replicas.csv")
    assert list(reps.columns) == ["run", "replica", "seed"] and reps.empty


def test_ablation_with_seeds_tests_each_variant_against_the_base(tmp_path):
    """A sweep with seeds: per variant the mean and interval over its replicas, and `vs_base_<col>`
    Welch's test of the variant's replica values against the base run's (here lambda_anchor 1.0 =
    the `tfd` row) for the final FID, the best FID within the largest budget and `compare` metrics."""
    from eval.io import seal_record
    from tfd.tables import write_ablation

    abl = {"lambda_anchor": {"title": "anchor", "base": "tfd", "key": "params.lambda_anchor", "values": [0.0, 1.0],
                             "budgets": [100, 200], "compare": ["max_ssim"]}}
    cfg = _cfg({"tfd": {"seeds": [0, 1, 2], "train": {"steps": 200}}}, ablations=abl, table1=["tfd"])
    b = cfg.bench()
    (l0, r0), (l1, r1) = b.ablations["lambda_anchor"].variants
    assert r1 == "tfd" and b.row_runs(r0) == [f"{r0}@s{k}" for k in (0, 1, 2)]
    final = {r0: [9.0, 9.5, 9.2], r1: [7.0, 7.4, 7.1]}
    ssim = {r0: [0.90, 0.91, 0.90], r1: [0.90, 0.905, 0.91]}
    for row in (r0, r1):
        for k, run in enumerate(b.row_runs(row)):
            d = tmp_path / "digits" / "tfd" / run
            for m in b.eval.metrics:
                v = final[row][k] if m == "fid_digits" else ssim[row][k] if m == "max_ssim" else 0.5
                _metric(d / "metrics", m, v, b.eval.num_samples)
            (d / "train.json").write_text(json.dumps(seal_record({"iters": 200})))
            recs = [seal_record({"step": s, "fid_digits": final[row][k] + 1 + (200 - s) / 10}) for s in (0, 100, 200)]
            (d / "convergence.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    df = write_ablation(cfg, tmp_path, "lambda_anchor", tmp_path / "abl.csv").set_index("run")
    p = stats.ttest_ind(final[r0], final[r1], equal_var=False).pvalue
    assert df.loc[r0, "vs_base_final_fid_digits"] == f"higher (p={p:.3g})" and p < 0.05
    assert df.loc[r1, "vs_base_final_fid_digits"] == "base"
    best = [v + 1 for v in final[r0]], [v + 1 for v in final[r1]]
    p_best = stats.ttest_ind(*best, equal_var=False).pvalue
    assert df.loc[r0, "vs_base_best_fid_digits@200"] == f"higher (p={p_best:.3g})"
    p_ssim = stats.ttest_ind(ssim[r0], ssim[r1], equal_var=False).pvalue
    assert df.loc[r0, "vs_base_final_max_ssim"] == f"n.s. (p={p_ssim:.3g})" and p_ssim > 0.05
    assert df.loc[r0, "final_fid_digits"] == pytest.approx(round(np.mean(final[r0]), 4))
    assert "Welch" in (tmp_path / "abl.md").read_text()


def test_ablation_compare_names_a_metric_of_the_benchmark():
    abl = {"x": {"base": "tfd", "key": "params.lambda_anchor", "values": [0.0], "compare": ["nope"]}}
    from tfd.config import check
    with pytest.raises(ConfigError, match=r"ablations.x.compare: 'nope' is not one of eval.metrics"):
        check(_cfg(ablations=abl))
