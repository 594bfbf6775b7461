"""End to end: the whole DAG on the tiny digits config, in a temporary directory, run as a person runs
it: config.yaml there, `--configfile .test/config.yaml` over it (see .test/config.yaml)."""
import hashlib
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from tfd.config import SAMPLER_METHODS, Config, from_dict

from tests.helpers import ROOT, TINY_CONFIG


def tiny(run_snakemake, workdir, *args):
    """`snakemake --cores 2 ARGS --configfile .test/config.yaml` in `workdir` (--configfile last: it takes
    every path that follows it)."""
    return run_snakemake(workdir, *args, "--configfile", str(TINY_CONFIG))


@pytest.fixture(scope="module")
def tiny_dag(tmp_path_factory, run_snakemake):
    """The tiny DAG (rule all: table1, ablations, figures), run once for this module's slow tests.
    -> (working directory, the CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("dag")
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    return workdir, tiny(run_snakemake, workdir)


def test_tiny_config_shrinks_every_run(tiny_config):
    """.test/config.yaml names every run of config.yaml's digits benchmark (a run added there and not
    here would train at full size in the tests), and the sweeps expand to the runs the DAG test expects."""
    d = tiny_config["benchmarks"]["digits"]
    for name, run in d["runs"].items():
        if run["method"] in SAMPLER_METHODS:
            assert run.get("sampler", {}).get("steps", 3) <= 3, name
        else:
            assert run["train"]["steps"] == 3 and run["train"]["eval_every"] == 2, name
    assert d["teacher"]["train"]["steps"] == 20 and d["eval"]["num_samples"] == 40
    bench = from_dict(Config, tiny_config, "config").bench("digits")
    added = set(bench.runs) - set(d["runs"])
    assert added == {"feature_noise__0", "layers__bottleneck", "lambda_anchor__0",  # the sweeps' variants
                     "dmd2@s0", "dmd2@s1", "cd_l2@s0", "cd_l2@s1"}, added     # and the rows' training replicas
    assert bench.ablations["seed"].variants == [("0", "tfd")]  # one value: the base run itself, no extra training
    t = tiny_config["benchmarks"]["digits_text"]
    for name, run in t["runs"].items():  # the text benchmark's rows too
        if run["method"] in SAMPLER_METHODS:
            assert run.get("sampler", {}).get("steps", 2) <= 2, name
        else:
            assert run["train"]["steps"] == 3, name
    text = from_dict(Config, tiny_config, "config").bench("digits_text")
    assert {r for r, run in text.runs.items() if run.trains} == {"tfd", "dmd2", "t2i_layers__Mid", "t2i_seed__1"}
    assert t["positives"]["steps"] <= 2 and t["positives"]["num_prompts"] <= 8


@pytest.mark.slow
def test_dag_end_to_end(tiny_dag, tiny_config, run_snakemake):
    root, r = tiny_dag
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    df = pd.read_csv(root / "results/table1.csv")
    cfg = tiny_config["benchmarks"]["digits"]
    assert list(df["run"]) == cfg["table1"]
    row = df.set_index("run")
    assert row.loc["teacher_ode", "nfe"] == 5 and row.loc["tfd", "nfe"] == 1
    for run in ("tfd", "dmd2", "cd_l2", "drift_randnet"):
        assert row.loc[run, "iters"] == 3
        seeds = cfg["runs"][run].get("seeds") or [None]  # dmd2, cd_l2: training replicas <run>@s<k>
        for k in seeds:
            name = run if k is None else f"{run}@s{k}"
            run_dir = root / "results/digits" / cfg["runs"][run]["method"] / name
            conv = (run_dir / "convergence.jsonl").read_text().splitlines()
            assert len(conv) == 3  # steps 0, 2 and 3 (the last is scored too)
    assert row.loc["dmd2", "generator_updates"] == 1  # steps 0 (5, 10, ...): two time-scale update
    # rows with seeds: mean and 95% interval over the replicas, and the Welch column against dmd2
    assert row.loc["dmd2", "seeds"] == 2 and row[["fid_digits_ci95"]].loc[["dmd2", "cd_l2"]].notna().all().all()
    assert row.loc["dmd2", "vs_dmd2"] == "reference" and row.loc["tfd", "vs_dmd2"].startswith("n/a")
    reps = pd.read_csv(root / "results/table1_replicas.csv")
    assert sorted(reps["replica"]) == ["cd_l2@s0", "cd_l2@s1", "dmd2@s0", "dmd2@s1"]
    assert df["fid_digits"].notna().all() and (df["fid_digits"] >= 0).all()
    check_ablations(root, cfg)
    check_table2(root, tiny_config)
    check_manifest(root, cfg, df)
    check_figures(root, cfg)
    # a second run finds everything up to date
    again = tiny(run_snakemake, root, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    check_report(root, run_snakemake)


def check_table2(root, tiny_config):
    """The text-to-image benchmark of rule all: Table 2's rows through the diffusers pipeline and the
    adapter, sampled with the prompt table and scored with fid_digits and the trained tiny CLIP."""
    t = tiny_config["benchmarks"][tiny_config["text_benchmark"]]
    df = pd.read_csv(root / "results/table2.csv").set_index("run")
    assert list(df.index) == t["table2"]
    assert df.loc["teacher_g6", "nfe"] == 2 * 2 and df.loc["teacher_g1", "nfe"] == 2  # guided steps count twice
    assert df.loc["teacher_heun_g6", "nfe"] == (2 * 2 - 1) * 2 and df.loc["onestep_init", "nfe"] == 1
    assert df[["fid_digits", "clip_score", "max_ssim"]].notna().all().all()
    assert (df["clip_score"].abs() <= 1).all() and not any(c.startswith("paper_") for c in df.columns)
    bench = root / "results" / tiny_config["text_benchmark"]
    table = [json.loads(line) for line in (bench / "prompts.jsonl").read_text().splitlines()]
    assert len(table) == t["prompts"]["num_prompts"]
    with np.load(bench / "pipeline/teacher_g6/samples.npz") as z:
        assert z["arr_0"].shape == (t["eval"]["num_samples"], 32, 32, 3)
        assert list(z["arr_1"]) == [table[i % len(table)]["id"] for i in range(t["eval"]["num_samples"])]
    clip = json.loads((bench / "pipeline/teacher_g6/metrics/clip_score.json").read_text())["provenance"]
    assert clip["clip_model"] == "TinyCLIP-digits" and clip["checkpoint"].endswith("TinyCLIP-digits.safetensors")
    # the distilled rows and their shared positives cache (two shards, merged; both runs read it)
    assert df.loc["tfd", "nfe"] == 1 and df.loc["dmd2", "nfe"] == 1 and df.loc["tfd", "iters"] == 3
    caches = sorted(bench.glob("positives/*/positives.safetensors"))
    assert len(caches) == 1 and not list(bench.glob("positives/*/shard*"))  # shards are temporary
    from tfd.positives import load_positives
    pos, meta = load_positives(caches[0])
    assert pos["latents"].shape[:2] == (t["positives"]["num_prompts"], t["positives"]["n_pos"])
    assert meta["shards"] == t["positives"]["shards"] and sum(
        meta["counts"][k] for k in ("all_real", "some_real", "no_real")) == t["positives"]["num_prompts"]
    assert (root / "results/figures/table2_prompts.png").is_file()
    abl = pd.read_csv(root / "results/ablation_t2i_layers.csv")
    assert list(abl["variant"]) == ["D2+Mid+U0", "Mid"] and list(abl["run"]) == ["tfd", "t2i_layers__Mid"]


@pytest.mark.slow
def test_publish_copies_what_the_readme_shows(tiny_dag, tiny_config, run_snakemake):
    """`snakemake publish` mirrors the tables, manifests and PNG figures into docs/results/ of the
    working directory (here the test's, never this checkout's): byte for byte, nothing stale left."""
    root, r = tiny_dag
    assert r.returncode == 0, "the tiny DAG failed: see test_dag_end_to_end"
    pub = root / "docs/results"
    (pub / "figures").mkdir(parents=True)
    (pub / "ablation_gone.csv").write_text("a sweep no longer in the config\n")
    (pub / "figures/samples_gone.png").write_bytes(b"old")
    committed = sorted((p, p.stat().st_mtime_ns) for p in (ROOT / "docs/results").rglob("*"))
    # publish refuses an overlay (test_publish_refuses_an_overlay_config): here the merged tiny config
    # is the working directory's config.yaml, the same settings, so nothing reruns
    full = (root / "config.yaml").read_text()
    (root / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    try:
        done = run_snakemake(root, "publish")
    finally:
        (root / "config.yaml").write_text(full)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distill" not in done.stdout + done.stderr  # nothing was retrained
    cfg = tiny_config["benchmarks"]["digits"]
    abls = list(cfg["ablations"]) + list(tiny_config["benchmarks"]["digits_text"]["ablations"])  # both tables'
    figures = (["convergence", "diversity_lambda_anchor", "table2_prompts"] + [f"ablation_{a}" for a in abls]
               + [f"samples_{r}" for r in cfg["table1"]])
    tables = ["table1", "table2"] + [f"ablation_{a}" for a in abls]
    want = ({f"{t}{x}" for t in tables for x in (".csv", ".md", ".html", ".manifest.json", "_replicas.csv")}
            | {"convergence.csv"}
            | {f"ablation_{a}_curves.csv" for a in abls} | {f"figures/{f}.png" for f in figures})
    got = {f.relative_to(pub).as_posix() for f in pub.rglob("*") if f.is_file()}
    assert got == want, (got - want, want - got)
    for f in want:
        assert (pub / f).read_bytes() == (root / "results" / f).read_bytes(), f
    shown = set(re.findall(r"docs/results/([\w/.]+\.(?:png|md|csv))", (ROOT / "README.md").read_text()))
    # every file the README shows, on the tiny config's runs; the known-modes table, which the tiny config
    # turns off (modes_benchmark: null), is published by the default run, and the methods table by
    # `snakemake extended`: those must be committed
    assert tiny_config.get("modes_benchmark") is None
    modes = {f for f in shown if re.fullmatch(r"(table_modes\w*\.\w+|figures/modes_\w+\.png|table_methods\w*\.\w+)", f)}
    assert shown and shown - modes <= want, shown - modes - want
    assert all((ROOT / "docs/results" / f).is_file() for f in modes), modes
    assert sorted((p, p.stat().st_mtime_ns) for p in (ROOT / "docs/results").rglob("*")) == committed


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
    m = json.loads((root / "results/table1.manifest.json").read_text())
    members = [m_ for r in df["run"] for m_ in ([f"{r}@s{k}" for k in cfg["runs"][r].get("seeds") or []] or [r])]
    assert m["rows"] == members and set(m["runs"]) == set(members)  # a row with seeds: its replicas
    tfd = m["runs"]["tfd"]
    assert tfd["config"]["params"]["feature_noise"] == cfg["runs"]["tfd"]["params"]["feature_noise"]
    gen = root / tfd["files"]["generator"]["path"]
    assert tfd["files"]["generator"]["sha256"] == hashlib.sha256(gen.read_bytes()).hexdigest()
    fid = df.set_index("run").loc["tfd", "fid_digits"]
    assert tfd["metrics"]["fid_digits"]["value"] == pytest.approx(fid, rel=1e-3)
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


def check_report(root, run_snakemake):
    r = tiny(run_snakemake, root, "--report", "results/report.html")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html = (root / "results/report.html").read_text()
    for name in ["table1.html", "ablation_layers.html", "convergence.png", "diversity_lambda_anchor.png",
                 "samples_tfd.png"]:
        assert name in html, name


def test_bad_config_fails_before_work(tmp_path, tiny_config, run_snakemake):
    cfg = tiny_config
    cfg["benchmarks"]["digits"]["eval"]["num_sampels"] = 10
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_snakemake(tmp_path, "results/table1.csv")
    assert r.returncode != 0
    assert "num_sampels" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_publish_refuses_an_overlay_config(tmp_path, run_snakemake):
    """`publish` mirrors the default benchmark into docs/results/: a run that merges the tiny
    overlay (or any --configfile) over config.yaml is refused when the DAG is built, before any job."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    r = run_snakemake(tmp_path, "-n", "publish", "--configfile", str(TINY_CONFIG))
    assert r.returncode != 0 and "refusing" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert not (tmp_path / "docs").exists() and not (tmp_path / "results").exists()


def test_extended_sweeps_stay_out_of_all(tmp_path, run_snakemake):
    """config.yaml's sweeps with `in_all: false` (the default DAG's time budget) are built by
    `snakemake extended`, not `all`; publish copies one only once it was built."""
    from tfd.config import load_config
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    cfg = load_config(ROOT / "config.yaml")
    extended = [a for b in cfg.active for a, abl in cfg.bench(b).ablations.items() if not abl.in_all]
    assert {"layers", "t2i_layers", "t2i_seed"} == set(extended)

    def dry(*targets):
        r = run_snakemake(tmp_path, "-n", *targets)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout + r.stderr

    out = dry("all")
    assert "ablation_feature_noise.csv" in out and "ablation_lambda_anchor.csv" in out
    for a in extended:
        assert f"ablation_{a}." not in out and f"/{a}__" not in out, a
    out = dry("extended")
    for a in extended:
        assert f"results/ablation_{a}.csv" in out and f"results/figures/ablation_{a}.png" in out, a
    assert "/layers__bottleneck_dec_6@s2/generator.safetensors" in out and "/t2i_seed__2/generator" in out

    def published(*targets):  # the publish job's inputs: what it copies
        m = re.search(r"rule publish:\n\s+input: ([^\n]+)", dry(*targets))
        assert m, targets
        return set(m.group(1).split(", "))

    assert not any("ablation_layers" in f or "table_methods" in f for f in published("publish"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results/ablation_layers.csv").write_text("variant\n")  # built by `extended`: published
    got = published("publish")
    assert {"results/ablation_layers.manifest.json", "results/figures/ablation_layers.png"} <= got
    assert not any("t2i_seed" in f or "table_methods" in f for f in got)
    got = published("extended", "publish")  # in one command: publish waits for what `extended` makes
    assert {"results/table_methods.md", "results/ablation_t2i_seed_curves.csv"} <= got
