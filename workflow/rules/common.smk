# Paths, input functions and the resolved config shared by every rule.
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError

from tfd.config import Config, ConfigError, check, from_dict

SITE_HINT = ("Paths of the paper benchmark go in site.yaml in the working directory (a copy of "
             "workflow/site.example.yaml; the slurm profile loads it), or pass --configfile FILE.")


def _check_config():
    """The CLI's typed checks (missing paths, unknown methods, ...) and that every configured
    input file exists, before any job: one message naming the config keys."""
    b, w = config["benchmarks"].get(config["benchmark"], {}), f"benchmarks.{config['benchmark']}"
    files = {f"{w}.teacher.checkpoint": b.get("teacher", {}).get("checkpoint"),
             f"{w}.data.path": b.get("data", {}).get("path"),
             f"{w}.eval.ref_stats": b.get("eval", {}).get("ref_stats"),
             f"{w}.eval.feature_extractor_weights_path": b.get("eval", {}).get("feature_extractor_weights_path")}
    try:
        check(from_dict(Config, config, "config"))
    except ConfigError as e:
        hint = f"\n{SITE_HINT}" if any(k in str(e) for k in files) else ""
        raise WorkflowError(f"invalid configuration: {e}{hint}") from None
    gone = [f"  - {k}: no such file: {v}" for k, v in files.items() if v and not Path(v).is_file()]
    if gone:
        raise WorkflowError("configured files not found:\n" + "\n".join(gone) + f"\n{SITE_HINT}")


if workflow.is_main_process:  # jobs re-parse this file; the main process has checked (no torch import per job)
    _check_config()

BENCH = config["benchmark"]
B = config["benchmarks"][BENCH]
# the typed config expands the ablation sweeps into runs (tfd.config.expand_ablation), as the CLI does
TYPED = from_dict(Config, config, "config").bench(BENCH)
RUNS = {name: dataclasses.asdict(run) for name, run in TYPED.runs.items()}
ABLATIONS = TYPED.ablations
SAMPLER_METHODS = ("heun", "onestep")
EVAL = B.get("eval", {})
NUM_SHARDS = int(EVAL.get("shards", 1))
METRICS = EVAL.get("metrics", ["fid_digits", "precision_digits", "recall_digits", "max_ssim", "class_acc"])


def _resolved_config_file():
    """The resolved config (after --config/--configfile) as a content-addressed file the CLI reads,
    so every rule's `tfd` call sees exactly the config Snakemake validated."""
    text = yaml.safe_dump(config, sort_keys=True)
    path = Path("resources/config") / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


CFG = _resolved_config_file()

R = f"results/{BENCH}"


def run_dir(run):
    return f"{R}/{RUNS[run]['method']}/{run}"


def run_spec(wildcards):
    """The run's own config block as a param: editing it reruns that run only."""
    return json.dumps(RUNS[wildcards.run], sort_keys=True)


def teacher_file():
    t = B["teacher"]
    if t.get("kind", "train") == "train":
        return f"{R}/teacher/teacher.safetensors"
    ckpt = t.get("checkpoint")
    if ckpt and str(ckpt).endswith(".pkl"):
        return f"{R}/teacher/teacher.safetensors"  # converted by rule convert_edm
    return ckpt


def feature_net_file():
    return f"{R}/feature_net/digits_net.safetensors" if EVAL.get("feature_net", "digits") == "digits" else []


def ref_stats_file():
    return EVAL.get("ref_stats") or f"{R}/ref_stats.npz"


def generator_input(wildcards):
    if RUNS[wildcards.run]["method"] in SAMPLER_METHODS:
        return []
    return f"{run_dir(wildcards.run)}/generator.safetensors"


def metric_files(run):
    return [f"{run_dir(run)}/metrics/{m}.json" for m in METRICS]


def table1_runs():
    return B.get("table1") or list(RUNS)


def ablation_runs(name):
    return list(dict.fromkeys(run for _, run in ABLATIONS[name].variants))


wildcard_constraints:
    method="|".join(sorted({re.escape(r["method"]) for r in RUNS.values()})),
    run="|".join(sorted(map(re.escape, RUNS))),
    ablation="|".join(sorted(map(re.escape, ABLATIONS))) or "^$",
    k=r"\d+",
    n=r"\d+",
