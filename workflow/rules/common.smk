# Paths, input functions and the resolved config shared by every rule.
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError

from eval.io import atomic_write_text
from tfd.config import Config, ConfigError, check, from_dict

SITE_HINT = ("Paths of the paper benchmark go in site.yaml in the working directory (a copy of "
             "workflow/site.example.yaml; the slurm profile loads it), or pass --configfile FILE.")


def _typed_config(checked: bool) -> Config:
    """The typed config (one load). `checked`: also the CLI's checks (missing paths, unknown
    methods, metric names, ...) and that every configured input file exists, before any job: one
    message naming the config keys."""
    b, w = config["benchmarks"].get(config["benchmark"], {}), f"benchmarks.{config['benchmark']}"
    files = {f"{w}.teacher.checkpoint": b.get("teacher", {}).get("checkpoint"),
             f"{w}.data.path": b.get("data", {}).get("path"),
             f"{w}.eval.ref_stats": b.get("eval", {}).get("ref_stats"),
             f"{w}.eval.feature_extractor_weights_path": b.get("eval", {}).get("feature_extractor_weights_path")}
    try:
        typed = from_dict(Config, config, "config")
        if not checked:
            return typed
        check(typed)
    except ConfigError as e:
        hint = f"\n{SITE_HINT}" if any(k in str(e) for k in files) else ""
        raise WorkflowError(f"invalid configuration: {e}{hint}") from None
    gone = [f"  - {k}: no such file: {v}" for k, v in files.items() if v and not Path(v).is_file()]
    if gone:
        raise WorkflowError("configured files not found:\n" + "\n".join(gone) + f"\n{SITE_HINT}")
    return typed


BENCH = config["benchmark"]
# The typed config, resolved once (tfd.config): every run's train/params/sampler block is a
# dataclass with its defaults, and the ablation sweeps are expanded into runs, as the CLI sees them.
BENCH_CFG = _typed_config(checked=workflow.is_main_process).bench(BENCH)  # jobs re-parse: the main process checked
RUNS = BENCH_CFG.runs
ABLATIONS = BENCH_CFG.ablations
EVAL_CFG = BENCH_CFG.eval
METRICS = EVAL_CFG.metrics
BENCH_DIR = f"results/{BENCH}"          # every artifact of the active benchmark lives below this
FIGURES_DIR = "results/figures"


def _resolved_config_file():
    """The resolved config (after --config/--configfile) as a content-addressed file the CLI reads,
    so every rule's `tfd` call sees exactly the config Snakemake validated."""
    text = yaml.safe_dump(config, sort_keys=True)
    path = Path("resources/config") / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        atomic_write_text(path, text)
    return str(path)


CONFIG_FILE = _resolved_config_file()


# ----------------------------------------------------------------------------------------------
# Paths and input functions (every rule file uses these; Snakemake's linter wants them here).

def run_dir(run):
    return f"{BENCH_DIR}/{RUNS[run].method}/{run}"


def run_spec(wildcards):
    """The run's resolved config block as a param: editing it reruns that run only."""
    return json.dumps(dataclasses.asdict(RUNS[wildcards.run]), sort_keys=True, default=str)


def teacher_spec():
    """The teacher block as a param of the rule that trains it."""
    return json.dumps(dataclasses.asdict(BENCH_CFG.teacher), sort_keys=True, default=str)


def teacher_file():
    t = BENCH_CFG.teacher
    if t.kind == "train" or str(t.checkpoint or "").endswith(".pkl"):
        return f"{BENCH_DIR}/teacher/teacher.safetensors"  # trained, or converted by rule convert_edm
    return t.checkpoint


def feature_weights_file():
    """The FID feature network's weights when the DAG builds them (the digits network), else []."""
    return f"{BENCH_DIR}/feature_net/digits_net.safetensors" if EVAL_CFG.feature_extractor == "digits" else []


def ref_stats_file():
    return EVAL_CFG.ref_stats or f"{BENCH_DIR}/ref_stats.npz"


def generator_input(wildcards):
    if not RUNS[wildcards.run].trains:
        return []
    return f"{run_dir(wildcards.run)}/generator.safetensors"


def shard_files(wildcards):
    """The `eval.shards` sample shards of a run, merged in seed order by merge_samples."""
    n = EVAL_CFG.shards
    return [f"{run_dir(wildcards.run)}/samples/shard{k}of{n}.npz" for k in range(n)]


def convergence_inputs(wildcards):
    """The feature weights and reference statistics, only for runs that keep a convergence record."""
    run = RUNS[wildcards.run]
    if not (run.trains and run.train.eval_every):
        return {}
    fweights = feature_weights_file()
    return {"ref": ref_stats_file(), **({"fweights": fweights} if fweights else {})}


def metric_files(run):
    return [f"{run_dir(run)}/metrics/{m}.json" for m in METRICS]


def table1_runs():
    return BENCH_CFG.table1 or list(RUNS)


def ablation_runs(name):
    return list(dict.fromkeys(run for _, run in ABLATIONS[name].variants))


def run_outputs(runs):
    """A table's inputs: each run's metric files and, for training runs, train.json."""
    return ([f for r in runs for f in metric_files(r)]
            + [f"{run_dir(r)}/train.json" for r in runs if RUNS[r].trains])


def manifest_inputs(wildcards, input):
    return " ".join(f"--{k.replace('_', '-')} {input[k]}" for k in ("teacher", "ref_stats", "feature_weights")
                    if k in input.keys() and input[k])


def diversity_ablations():
    return [n for n, a in ABLATIONS.items() if a.diversity is not None]


def diversity_samples(wildcards):
    return {label: f"{run_dir(run)}/samples.npz" for label, run in ABLATIONS[wildcards.ablation].variants}


def all_figures():
    return ([f"{FIGURES_DIR}/convergence.png", f"{FIGURES_DIR}/convergence.pdf"]
            + [f"{FIGURES_DIR}/samples_{r}.{ext}" for r in table1_runs() for ext in ("png", "pdf")]
            + [f"{FIGURES_DIR}/ablation_{a}.{ext}" for a in ABLATIONS for ext in ("png", "pdf")]
            + [f"{FIGURES_DIR}/diversity_{a}.{ext}" for a in diversity_ablations() for ext in ("png", "pdf")])


def out_stem(wildcards, output):
    """A figure rule's output path without `.png` (tfd figure writes <stem>.png and <stem>.pdf)."""
    return output.png[:-len(".png")]


def published_inputs(wildcards):
    """The files to publish; refuses (when the DAG is built, before any job runs) a run whose
    config merges an overlay over ./config.yaml, e.g. the tiny .test/config.yaml: its numbers are
    not the README's."""
    overlays = ([str(f) for f in workflow.overwrite_configfiles]  # --configfile (its keys also land below)
                or [f"--config {k}=..." for k in (workflow.config_settings.overwrite_config or {})])
    if overlays:
        raise WorkflowError(f"publish copies the benchmark of ./config.yaml into {PUBLISH_DIR}/, but this run "
                            f"merges {', '.join(overlays)} over it; refusing (run `snakemake --cores 2 all "
                            "publish` with the config file alone)")
    return PUBLISHED  # defined in publish.smk



wildcard_constraints:
    method="|".join(sorted({re.escape(r.method) for r in RUNS.values()})),
    run="|".join(sorted(map(re.escape, RUNS))),
    ablation="|".join(sorted(map(re.escape, ABLATIONS))) or "^$",
    k=r"\d+",
    n=r"\d+",
