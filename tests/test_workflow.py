"""End to end: the whole DAG on a tiny digits config, in a temporary directory."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    d = cfg["benchmarks"]["digits"]
    d["teacher"]["arch_overrides"] = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}
    d["teacher"]["train"].update(steps=20, batch_size=32, warmup_steps=5, log_every=5)
    d["eval"].update(num_samples=40, batch_size=20, shards=2, convergence_samples=20)
    d["runs"]["teacher_ode"]["sampler"]["steps"] = 3
    d["runs"]["teacher_sde"]["sampler"]["steps"] = 3
    for name, run in d["runs"].items():
        if run["method"] not in ("heun", "onestep"):
            run["train"].update(steps=3, checkpoint_every=2, log_every=1, warmup_steps=1, eval_every=2)
            run.setdefault("params", {})
            if run["method"] in ("tfd", "drift"):
                run["params"].update(groups=3, n_gen=2, n_pos=2)
                if "layers" in run["params"]:
                    run["params"]["layers"] = ["enc:1", "bottleneck", "dec:5"]
            else:
                run["params"]["batch_size"] = 6
    abl = d["ablations"]
    del abl["seed"]  # same code path as the others
    abl["layers"]["values"] = [["bottleneck"], ["enc:1", "bottleneck", "dec:5"]]
    abl["feature_noise"]["values"] = [0.0, 0.1]
    for a in abl.values():
        a["budgets"] = [2, 3]
    abl["lambda_anchor"].update(values=[0.0, 1.0], diversity={"classes": [0, 1], "per_class": 2})
    return cfg


def snakemake(workdir, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
                           "--cores", "2", *args], capture_output=True, text=True, env=env, timeout=1200)


@pytest.mark.slow
def test_dag_end_to_end(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    r = snakemake(tmp_path)  # rule all: table1, ablations, figures
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    df = pd.read_csv(tmp_path / "results/table1.csv")
    cfg = tiny_config()["benchmarks"]["digits"]
    assert list(df["run"]) == cfg["table1"]
    row = df.set_index("run")
    assert row.loc["teacher_ode", "nfe"] == 5 and row.loc["tfd", "nfe"] == 1
    for run in ("tfd", "dmd2", "cd_l2", "drift_randnet"):
        assert row.loc[run, "updates"] == 3
        conv = (tmp_path / "results/digits" / cfg["runs"][run]["method"] / run / "convergence.jsonl").read_text().splitlines()
        assert len(conv) == 3  # steps 0, 2 and 3 (the last is scored too)
    assert row.loc["dmd2", "generator_updates"] == 1  # steps 0 (5, 10, ...): two time-scale update
    assert df["fid_digits"].notna().all() and (df["fid_digits"] >= 0).all()
    check_ablations(tmp_path, cfg)
    check_manifest(tmp_path, cfg, df)
    check_figures(tmp_path, cfg)
    # a second run finds everything up to date
    again = snakemake(tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    check_report(tmp_path, cfg)


def check_ablations(root, cfg):
    """Variants -> runs (the base value reuses `tfd`), budgeted best FID from the convergence record."""
    noise = pd.read_csv(root / "results/ablation_feature_noise.csv", dtype={"variant": str})
    assert list(noise["variant"]) == ["0", "0.1"]
    assert list(noise["run"]) == ["feature_noise__0", "tfd"]
    for _, row in noise.iterrows():
        conv = pd.read_json(root / f"results/digits/tfd/{row['run']}/convergence.jsonl", lines=True)
        assert row["best_fid_digits@2"] == pytest.approx(conv[conv.step <= 2]["fid_digits"].min(), rel=1e-4)
        assert row["best_fid_digits@3"] == pytest.approx(conv["fid_digits"].min(), rel=1e-4)
        fid = pd.read_json(root / f"results/digits/tfd/{row['run']}/metrics/fid_digits.json", typ="series")["value"]
        assert row["final_fid_digits"] == pytest.approx(fid, rel=1e-4)
    trained = yaml.safe_load((root / "results/digits/tfd/feature_noise__0/train.json").read_text())
    assert trained["method_params"]["feature_noise"] == 0.0
    layers = pd.read_csv(root / "results/ablation_layers.csv")
    assert list(layers["run"]) == ["layers__bottleneck", "tfd"]
    curves = pd.read_csv(root / "results/ablation_lambda_anchor_curves.csv")
    assert set(curves["run"]) == {"lambda_anchor__0", "tfd"} and set(curves["step"]) == {0, 2, 3}


def check_manifest(root, cfg, df):
    import hashlib
    import json
    m = json.loads((root / "results/table1.manifest.json").read_text())
    assert m["rows"] == list(df["run"]) and set(m["runs"]) == set(df["run"])
    tfd = m["runs"]["tfd"]
    assert tfd["config"]["params"]["feature_noise"] == cfg["runs"]["tfd"]["params"]["feature_noise"]
    gen = root / tfd["files"]["generator"]["path"]
    assert tfd["files"]["generator"]["sha256"] == hashlib.sha256(gen.read_bytes()).hexdigest()
    assert tfd["metrics"]["fid_digits"]["value"] == pytest.approx(df.set_index("run").loc["tfd", "fid_digits"], rel=1e-3)
    assert tfd["seeds"]["train"] == 0 and m["runs"]["teacher_ode"]["seeds"]["train"] is None
    assert m["written_by"]["versions"]["torch"] and "teacher" in m["inputs"]
    assert (root / "results/ablation_layers.manifest.json").is_file()


def check_figures(root, cfg):
    figs = root / "results/figures"
    names = (["convergence", "diversity_lambda_anchor"] + [f"ablation_{a}" for a in cfg["ablations"]]
             + [f"samples_{r}" for r in cfg["table1"]])
    for name in names:
        assert (figs / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (figs / f"{name}.pdf").read_bytes()[:4] == b"%PDF", name


def check_report(root, cfg):
    r = snakemake(root, "--report", "results/report.html")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html = (root / "results/report.html").read_text()
    for name in ["table1.html", "ablation_layers.html", "convergence.png", "diversity_lambda_anchor.png", "samples_tfd.png"]:
        assert name in html, name


def test_bad_config_fails_before_work(tmp_path):
    cfg = tiny_config()
    cfg["benchmarks"]["digits"]["eval"]["num_sampels"] = 10
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "results/table1.csv")
    assert r.returncode != 0
    assert "num_sampels" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()
