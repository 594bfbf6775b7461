# Paths, input functions and the resolved config shared by every rule.
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError

from eval.io import atomic_write_text
from eval.modes import DATA_VERSION as SHAPES_DATA_VERSION
from tfd.datastore import STORE_VERSION
from tfd.config import Config, ConfigError, check, from_dict, input_paths, params_spec
from tfd.launch import LAUNCH_RESOURCES, distill_launch

SITE_HINT = ("Paths of the paper benchmark go in site.yaml in the working directory (a copy of "
             "workflow/site.example.yaml; the slurm profile loads it), or pass --configfile FILE.")


def _typed_config(checked: bool) -> Config:
    """The typed config (one load). `checked`: also the CLI's checks (missing paths, unknown
    methods, metric names, ...) and that every configured input file exists (`tfd.config.check`
    with files=True, the code `tfd check-config` runs), before any job: one message naming every
    config key to fix."""
    try:
        typed = from_dict(Config, config, "config")
        if checked:
            check(typed, files=True)
    except ConfigError as e:
        try:
            keys = input_paths(typed) if "typed" in locals() else {}
        except ConfigError:  # an undefined benchmark: the message says so
            keys = {}
        hint = f"\n{SITE_HINT}" if any(k in str(e) for k in keys) else ""
        raise WorkflowError(f"invalid configuration: {e}{hint}") from None
    return typed


CFG = _typed_config(checked=workflow.is_main_process)  # jobs re-parse: the main process checked
# Every active benchmark, typed once (tfd.config): each run's train/params/sampler block is a
# dataclass with its defaults, and the ablation sweeps are expanded into runs, as the CLI sees them.
BENCHES = {name: CFG.bench(name) for name in CFG.active}
# The class-conditional benchmark of Table 1 (its sweeps and figures) ...
BENCH = CFG.benchmark
BENCH_CFG = BENCHES[BENCH]
RUNS = BENCH_CFG.runs
# The sweeps of every active benchmark (Table 1's and Table 2's, e.g. the SDXL layer ablation of
# Table 7): {name: AblationCfg} and {name: benchmark}; names are unique across the benchmarks
# (each renders results/ablation_<name>.csv).
ABLATION_BENCH = {}
for _b in CFG.active:
    for _a in BENCHES[_b].ablations:
        if _a in ABLATION_BENCH:
            raise WorkflowError(f"ablation {_a!r} is defined by both {ABLATION_BENCH[_a]!r} and {_b!r}: rename one "
                                "(each renders results/ablation_<name>.csv)")
        ABLATION_BENCH[_a] = _b
ABLATIONS = {a: BENCHES[b].ablations[a] for a, b in ABLATION_BENCH.items()}
# `snakemake all` builds the sweeps with `in_all` (the default); `snakemake extended` the others (sweeps left out
# of the default DAG's time budget), beside the methods table.
ALL_ABLATIONS = [a for a, abl in ABLATIONS.items() if abl.in_all]
EXTENDED_ABLATIONS = [a for a, abl in ABLATIONS.items() if not abl.in_all]
EVAL_CFG = BENCH_CFG.eval
METRICS = EVAL_CFG.metrics
BENCH_DIR = f"results/{BENCH}"          # every artifact of a benchmark lives below results/<bench>/
# Every local job runs one thread: the embedded networks are small, so a second OpenMP thread buys
# little (the text teacher used 0.84 cores with two), while two one-thread jobs use both cores of a
# laptop. The long serial chains (the teachers; the text benchmark's VAE -> teacher -> positives) get
# this priority so that they start first and the short jobs fill the other core around them.
LONG_POLE_PRIORITY = 10
FIGURES_DIR = "results/figures"
# ... and the text-to-image benchmark of Table 2 (None: not built).
TEXT_BENCH = CFG.text_benchmark
TEXT_CFG = BENCHES.get(TEXT_BENCH)
# ... and the benchmark with known modes (data.kind shapes) of results/table_modes.csv (None: not built).
MODES_BENCH = CFG.modes_benchmark
MODES_CFG = BENCHES.get(MODES_BENCH)


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

def run_dir(run, bench=None):
    bench = bench or BENCH
    return f"results/{bench}/{BENCHES[bench].runs[run].method}/{run}"


# -- What each job reads from the config, as its params (Snakemake's default `params` rerun trigger):
# editing a setting reruns exactly the jobs whose output it shapes, and what depends on them
# (tests/test_workflow_rerun.py). Such a param is a value or a function of the wildcards alone: Snakemake
# does not record one that takes `input` or `output`. Settings that only batch or split the work are in
# none (per-image and per-prompt seeds: the files do not depend on them): eval.batch_size, eval.shards,
# eval.score_batch_size,
# positives.shards, a teacher's train.log_every; the shard counts still name the shard files, so
# changing one reruns the merge (its input list changed). A configured file is an input instead
# (teacher.checkpoint, eval.ref_stats, eval.feature_extractor_weights_path, ...): its path and its mtime.
EVAL_WORK_KEYS = ("batch_size", "shards", "score_batch_size")


def _spec(d) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def run_block(run) -> dict:
    """A run's resolved block as a dict, as runs made before an option existed recorded it: `addons`
    only when the run has some, and method options added later left out while they keep their old
    behaviour (`tfd.config.params_spec`)."""
    d = dataclasses.asdict(run)
    if d.get("addons") is None:
        d.pop("addons", None)
    if run.params is not None:
        d["params"] = params_spec(run.params)
    if run.train is not None:  # train keys added later (bucket_cap_mb, shard) likewise
        d["train"] = params_spec(run.train)
    return d


def run_spec(wildcards):
    """The run's resolved config block as a param: editing it reruns that run only (its label, paper
    numbers and nfe are the tables' business, its positives overrides reach it as the positives cache)."""
    spec = run_block(BENCHES[wildcards.bench].runs[wildcards.run])
    return _spec({k: v for k, v in spec.items() if k not in ("label", "paper", "nfe", "positives")})


TEACHER_KEYS = {"train": ("arch", "arch_overrides", "train"),
                "train_t2i": ("arch_overrides", "caption_dropout", "train")}


def teacher_settings(b) -> dict:
    """The teacher block without what only logs (train.log_every: stats.jsonl beside the teacher)."""
    t = dataclasses.asdict(b.teacher)
    t["train"].pop("log_every")
    return t


def teacher_spec(bench):
    """The settings that shape the trained teacher, a param of train_teacher / train_t2i_teacher:
    editing one reruns it (and what depends on it), editing another key does not. The class teacher
    also reads the data and the number of classes; the text teacher's VAE is its input (train_vae)."""
    b = BENCHES[bench]
    t = teacher_settings(b)
    spec = {k: t[k] for k in TEACHER_KEYS[t["kind"]]}
    if t["kind"] == "train":
        spec.update(data=dataclasses.asdict(b.data), num_classes=b.num_classes)
        if b.data.kind == "shapes":  # generated data: a change to how they are drawn reruns the teacher
            spec["data_version"] = SHAPES_DATA_VERSION
    return _spec(spec)


def extractor_settings(b) -> dict:
    """The FID feature network (its weights file is an input: `feature_weights_file`)."""
    return {"feature_extractor": b.eval.feature_extractor, "digits_input_size": b.resolution}


def ref_stats_spec(wildcards):
    """ref_stats: the feature network, and the real images (class: the data; text: the prompt table's
    images, input, at eval.resolution)."""
    b = BENCHES[wildcards.bench]
    spec = extractor_settings(b)
    if b.task == "text":
        spec["image_size"] = b.eval.resolution or b.resolution
    else:
        spec["data"] = dataclasses.asdict(b.data)
    return _spec(spec)


def distill_spec(wildcards):
    """distill, besides its run block: the data (class) or the teacher's weight precision (text), and
    for a run with a convergence record (train.eval_every) its sample set and feature network."""
    b, run = BENCHES[wildcards.bench], BENCHES[wildcards.bench].runs[wildcards.run]
    spec = {"teacher_precision": b.teacher.precision} if b.task == "text" else \
        {"data": dataclasses.asdict(b.data), "num_classes": b.num_classes}
    if run.train.eval_every:
        spec["convergence"] = {**extractor_settings(b), "samples": b.eval.convergence_samples,
                               "base_seed": b.eval.base_seed}
    return _spec(spec)


def sample_spec(wildcards):
    """sample_shard, besides its run block: how many images, their seeds and conditions (image i: seed
    base + i, condition i % len), and on a text benchmark the teacher's precision (teacher rows
    through the adapter) or the resolution (diffusers pipeline rows)."""
    b, run = BENCHES[wildcards.bench], BENCHES[wildcards.bench].runs[wildcards.run]
    spec = {"num_samples": b.eval.num_samples, "base_seed": b.eval.base_seed}
    if b.task != "text":
        spec.update(num_classes=b.num_classes, shape=[b.channels, b.resolution])  # the files' checked spec
    elif run.method in ("heun", "onestep"):
        spec["teacher_precision"] = b.teacher.precision
    elif run.method == "pipeline":
        spec["resolution"] = b.resolution
    return _spec(spec)


def score_spec(wildcards):
    """score: the feature network, the image size FID sees, and the CLIP model's settings (its
    checkpoint is an input). The metric list is the rule's outputs: a new metric is a missing file."""
    b = BENCHES[wildcards.bench]
    spec = {**extractor_settings(b), "resolution": b.eval.resolution, "bootstrap": b.eval.bootstrap,
            "diversity_per_condition": b.eval.diversity_per_condition}  # always: dropping a metric reruns nothing
    if "clip_score" in b.eval.metrics:
        spec["clip"] = {"model": b.eval.clip_model, "resize": b.eval.clip_resize}
    return _spec(spec)


def table_spec(bench, runs, **extra):
    """A table and its manifest: every row's run block (label and paper numbers included), the eval
    and teacher blocks the manifest records (less what only batches or logs), and `extra`."""
    b = BENCHES[bench]
    ev = {k: v for k, v in dataclasses.asdict(b.eval).items() if k not in EVAL_WORK_KEYS}
    return _spec({"rows": list(runs), "runs": {r: run_block(b.runs[r]) for r in runs}, "eval": ev,
                  "teacher": teacher_settings(b), **extra})


def text_table_spec(bench, runs):
    """table2: also the prompt settings and the data kind its note names."""
    b = BENCHES[bench]
    return table_spec(bench, runs, prompts=dataclasses.asdict(b.prompts), data=b.data.kind)


def ablation_spec(wildcards):
    """An ablation table: its runs, and the sweep (its diversity figure's settings are the figure's)."""
    name = wildcards.ablation
    abl = {k: v for k, v in dataclasses.asdict(ABLATIONS[name]).items() if k != "diversity"}
    return table_spec(ABLATION_BENCH[name], ablation_runs(name), ablation=abl)


def prompts_spec(bench):
    """The prompt table: the given file (an input), or the draw from the captions."""
    p = BENCHES[bench].prompts
    return _spec({"file": p.file} if p.file else {"num_prompts": p.num_prompts, "seed": p.seed})


def teacher_file(bench=None):
    """The teacher the runs of `bench` use: trained or converted by the DAG, or the configured file/folder."""
    bench = bench or BENCH
    t = BENCHES[bench].teacher
    if t.kind == "train" or str(t.checkpoint or "").endswith(".pkl"):
        return f"results/{bench}/teacher/teacher.safetensors"  # trained, or converted by rule convert_edm
    if t.kind == "train_t2i":
        return f"results/{bench}/teacher/pipeline"  # a diffusers folder, rule train_t2i_teacher
    return t.checkpoint


def bench_teacher(wildcards):
    return teacher_file(wildcards.bench)


def feature_weights_file(bench=None):
    """The FID feature network's weights: built by the DAG (the digits network, or the same network on
    the shapes data), else the configured eval.feature_extractor_weights_path (an input: editing the
    path or replacing the file reruns)."""
    bench = bench or BENCH
    e = BENCHES[bench].eval
    if e.feature_extractor in FEATURE_NETS:
        return f"results/{bench}/feature_net/{e.feature_extractor}_net.safetensors"
    return e.extractor_weights or []  # eval.feature_extractor_weights_path, or dinov2/cmmd_clip_checkpoint


FEATURE_NETS = ("digits", "shapes")  # domain feature networks the DAG trains (rules digits_/shapes_feature_net)


def dataset_store(bench):
    """The dataset store the jobs of a class benchmark with data.kind edm_zip read instead of its zip
    (made once from data.path by the prepare_data job, tfd.datastore), else None."""
    b = BENCHES[bench]
    return f"results/{bench}/data/store" if b.task != "text" and b.data.kind == "edm_zip" and b.data.path else None


def dataset_input(bench):
    """A class benchmark's dataset store as a named input (`data_store`, CLI --data-store), else {}."""
    store = dataset_store(bench)
    return {"data_store": store} if store else {}


def prepare_data_input(wildcards):
    """The EDM dataset zip (data.path) that rule prepare_data converts into the benchmark's store."""
    b = BENCHES[wildcards.bench]
    if dataset_store(wildcards.bench) is None:
        raise WorkflowError(f"benchmark {wildcards.bench!r} has no EDM dataset zip (data.kind edm_zip, data.path)")
    return b.data.path


def ref_stats_file(bench=None):
    bench = bench or BENCH
    return BENCHES[bench].eval.ref_stats or f"results/{bench}/ref_stats.npz"


def prompts_file(bench):
    """A text benchmark's prompt table (rule prompts), else []."""
    return f"results/{bench}/prompts.jsonl" if BENCHES[bench].task == "text" else []


def text_data(bench, images: bool = True, captions: bool = True):
    """A text benchmark's data as named inputs: the embedded folder written by rule text_data
    (`data`: captions.json + images/, CLI --data-dir), or the site's `captions` json and `images`
    folder (CLI --captions-json, --images-dir), each only when asked for and configured."""
    b = BENCHES[bench]
    if b.data.kind == "digits_text":
        return {"data": f"results/{bench}/data"}
    return {k: v for k, v, want in (("captions", b.data.captions_json, captions), ("images", b.data.images_dir, images))
            if v and want}


def prompts_inputs(bench):
    """The inputs of rule prompts (the given prompt file, or the captions json and the images, checked to exist)."""
    b = BENCHES[bench]
    if b.prompts.file:
        return {"file": b.prompts.file}
    return text_data(bench, images=not b.eval.ref_stats)


def clip_files(bench):
    """The CLIP model of clip_score: trained by the DAG on an embedded benchmark (rule train_clip), else the
    configured checkpoint (+ model config)."""
    b = BENCHES[bench]
    if b.task != "text" or "clip_score" not in b.eval.metrics:
        return {}
    if b.data.kind == "digits_text" and not b.eval.clip_checkpoint:
        stem = f"results/{bench}/clip/{b.eval.clip_model}"  # eval.tiny_clip's file names
        return {"clip": f"{stem}.safetensors", "clip_config": f"{stem}.json"}
    return {k: v for k, v in (("clip", b.eval.clip_checkpoint), ("clip_config", b.eval.clip_model_config)) if v}


# -- positives of a text benchmark (tfd.positives): three caches keyed by the settings that shape them
PROMPT_KEYS = ("prompts_file", "num_prompts", "prompts_seed")
PAIRED_KEYS = ("paired_captions_json", "paired_images_dir", "paired_fraction", "prompts_seed")


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def positives_settings(bench):
    """{positives key: (first run using it, PositivesCfg)} over the training runs of a text benchmark
    (a run may override the benchmark's block; runs with equal settings share one cache)."""
    from tfd.positives import positives_key
    b, out = BENCHES[bench], {}
    if b.task != "text":
        return out
    for name, run in b.runs.items():
        if run.trains:
            p = b.positives_for(name)
            out.setdefault(positives_key(p), (name, p))
    return out


def positives_paths(bench, run):
    """The caches a training run of a text benchmark reads: train prompts, paired latents (or None:
    no paired set) and the merged positives."""
    p = BENCHES[bench].positives_for(run)
    from tfd.positives import positives_key
    d = dataclasses.asdict(p)
    paired = bool(p.paired_captions_json) or BENCHES[bench].data.kind == "digits_text"
    return {"train_prompts": f"results/{bench}/train_prompts/{_key({k: d[k] for k in PROMPT_KEYS})}.jsonl",
            "latents": (f"results/{bench}/latents/{_key({k: d[k] for k in PAIRED_KEYS})}.safetensors"
                        if paired and p.paired_fraction > 0 else None),
            "positives": f"results/{bench}/positives/{positives_key(p)}/positives.safetensors"}


def positives_run(bench, kind, path):
    """The first training run whose `kind` cache ('train_prompts', 'latents', 'positives') is `path`
    (for 'positives', any file in its folder): the CLI reads that run's positives settings."""
    for name, run in BENCHES[bench].runs.items():
        mine = positives_paths(bench, name)[kind] if run.trains else None
        if mine and (mine == path or (kind == "positives" and Path(mine).parent == Path(path).parent)):
            return name
    raise WorkflowError(f"no training run of {bench} reads the {kind} cache {path}")


def train_prompts_inputs(wildcards):
    """The inputs of train_prompts (the training prompt table): the prompt list of the runs' positives settings, or the benchmark's captions."""
    tb = TEXT_BENCH
    path = f"results/{tb}/train_prompts/{wildcards.pkey}.jsonl"
    p = BENCHES[tb].positives_for(positives_run(tb, "train_prompts", path))
    return {"file": p.prompts_file} if p.prompts_file else text_data(tb, images=False)


def latents_inputs(wildcards):
    """What latents reads: the teacher (its VAE) and the paired image set (positives.paired_*, else the
    embedded data)."""
    tb = TEXT_BENCH
    p = BENCHES[tb].positives_for(positives_run(tb, "latents", f"results/{tb}/latents/{wildcards.lkey}.safetensors"))
    if p.paired_captions_json:
        paired = {"paired_captions": p.paired_captions_json, "paired_images": p.paired_images_dir}
    else:
        paired = text_data(tb) if BENCHES[tb].data.kind == "digits_text" else {}
    return {"teacher": teacher_file(tb), **paired}


def positives_shard_inputs(wildcards):
    """What one positives shard of the text benchmark reads: teacher, training prompts, paired latents."""
    tb = TEXT_BENCH
    run = positives_run(tb, "positives", f"results/{tb}/positives/{wildcards.key}/positives.safetensors")
    paths = positives_paths(tb, run)
    return {"teacher": teacher_file(tb), "train_prompts": paths["train_prompts"],
            **({"latents": paths["latents"]} if paths["latents"] else {})}


def positives_shards(wildcards):
    """The shards merge_positives joins (the `shards` of the runs' positives settings)."""
    tb = TEXT_BENCH
    run = positives_run(tb, "positives", f"results/{tb}/positives/{wildcards.key}/positives.safetensors")
    n = BENCHES[tb].positives_for(run).shards
    return [f"results/{tb}/positives/{wildcards.key}/shard{k}of{n}.safetensors" for k in range(n)]


# -- teacher pairs of DMD runs (tfd.pairs): one cache per distinct pair settings, shared by every run using it
def needs_pairs(run) -> bool:
    from tfd.methods import METHODS
    return run.trains and getattr(METHODS.get(run.method), "needs_pairs", False)


def pairs_path(bench, run):
    """The teacher pairs cache a DMD run reads: results/<bench>/pairs/<key>/pairs.safetensors."""
    from tfd.pairs import pairs_key, pairs_settings
    return f"results/{bench}/pairs/{pairs_key(pairs_settings(BENCHES[bench].runs[run].params))}/pairs.safetensors"


def pairs_run(bench, pkey):
    """The first run of `bench` whose pairs cache is results/<bench>/pairs/<pkey>/ (its settings are read)."""
    for name, run in BENCHES[bench].runs.items():
        if needs_pairs(run) and Path(pairs_path(bench, name)).parent.name == pkey:
            return name
    raise WorkflowError(f"no training run of {bench} reads the teacher pairs cache {pkey}")


def pairs_spec(wildcards):
    """teacher_pairs: the pair settings (they name the cache), and the benchmark's conditions."""
    from tfd.pairs import pairs_settings
    b = BENCHES[wildcards.bench]
    return _spec({**pairs_settings(b.runs[pairs_run(wildcards.bench, wildcards.pkey)].params),
                  "num_classes": b.num_classes})


def pairs_shards(wildcards):
    """The shards merge_teacher_pairs joins (`params.pairs_shards` of the first run using the cache)."""
    n = BENCHES[wildcards.bench].runs[pairs_run(wildcards.bench, wildcards.pkey)].params.pairs_shards
    return [f"results/{wildcards.bench}/pairs/{wildcards.pkey}/shard{k}of{n}.safetensors" for k in range(n)]


def distill_inputs(wildcards):
    """A text run's positives cache, training prompts and evaluation prompts (convergence record); a
    class run's dataset file, and a DMD run's teacher pairs."""
    b = wildcards.bench
    if BENCHES[b].task != "text":
        run = BENCHES[b].runs[wildcards.run]
        return {**dataset_input(b), **({"pairs": pairs_path(b, wildcards.run)} if needs_pairs(run) else {})}
    paths = positives_paths(b, wildcards.run)
    return {"positives": paths["positives"], "train_prompts": paths["train_prompts"], "prompts": prompts_file(b)}


def generator_input(wildcards):
    if not BENCHES[wildcards.bench].runs[wildcards.run].trains:
        return []
    return f"{run_dir(wildcards.run, wildcards.bench)}/generator.safetensors"


def shard_files(wildcards):
    """The `eval.shards` sample shards of a run, merged in seed order by merge_samples."""
    n = BENCHES[wildcards.bench].eval.shards
    return [f"{run_dir(wildcards.run, wildcards.bench)}/samples/shard{k}of{n}.npz" for k in range(n)]


def sample_inputs(wildcards):
    """What sample_shard reads: the teacher, the run's generator, a text benchmark's prompt table, and a
    pipeline row's own weights (sampler.pipeline / sampler.unet; the CLI reads them from the config)."""
    b = wildcards.bench
    sampler = BENCHES[b].runs[wildcards.run].sampler
    own = {k: getattr(sampler, k, None) for k in ("pipeline", "unet")}
    return {"teacher": teacher_file(b), "generator": generator_input(wildcards), "prompts": prompts_file(b),
            **{k: v for k, v in own.items() if v}}


def score_inputs(wildcards):
    """What score reads: samples, reference statistics, feature weights, prompt table and CLIP model."""
    b = wildcards.bench
    return {"samples": f"{run_dir(wildcards.run, b)}/samples.npz", "ref": ref_stats_file(b),
            "fweights": feature_weights_file(b), "prompts": prompts_file(b), **clip_files(b)}


def input_flags(wildcards, input):
    """CLI flags for the optional inputs a rule was given (named inputs that are present)."""
    flags = {"generator": "--generator", "prompts": "--prompts", "fweights": "--feature-weights",
             "clip": "--clip-checkpoint", "clip_config": "--clip-model-config", "ref": "--ref-stats",
             "images": "--images-dir", "captions": "--captions-json", "data": "--data-dir", "file": "--prompts-file",
             "data_store": "--data-store"}
    return " ".join(f"{flag} {input[k]}" for k, flag in flags.items() if k in input.keys() and input[k])


def ref_stats_inputs(wildcards):
    """What ref_stats reads: the feature weights, and for a text benchmark its prompt table and real images."""
    b = wildcards.bench
    if BENCHES[b].task != "text":
        return {"fweights": feature_weights_file(b), **dataset_input(b)}
    return {"fweights": feature_weights_file(b), "prompts": prompts_file(b), **text_data(b, captions=False)}


def convergence_inputs(wildcards):
    """The feature weights and reference statistics, only for runs that keep a convergence record."""
    run = BENCHES[wildcards.bench].runs[wildcards.run]
    if not (run.trains and run.train.eval_every):
        return {}
    fweights = feature_weights_file(wildcards.bench)
    return {"ref": ref_stats_file(wildcards.bench), **({"fweights": fweights} if fweights else {})}


def metric_files(run, bench=None):
    bench = bench or BENCH
    return [f"{run_dir(run, bench)}/metrics/{m}.json" for m in BENCHES[bench].eval.metrics]


def table1_runs():
    return BENCH_CFG.table1 or list(RUNS)


def scored_rows(runs, bench=None):
    """`runs` less the `reported` rows (method: reported, the paper's numbers only): the rows with files."""
    return [r for r in runs if not BENCHES[bench or BENCH].runs[r].reported]


def ablation_runs(name):
    return list(dict.fromkeys(run for _, run in ABLATIONS[name].variants))


def ablation_inputs(wildcards):
    """What an ablation table reads: its runs' outputs (in its benchmark) and the files of the manifest."""
    b = ABLATION_BENCH[wildcards.ablation]
    return {"runs": run_outputs(ablation_runs(wildcards.ablation), b), "teacher": teacher_file(b),
            "ref_stats": ref_stats_file(b), "feature_weights": feature_weights_file(b), "prompts": prompts_file(b),
            **dataset_input(b)}


def table2_runs():
    """Table 2's rows that are scored: a published row whose weights are not given shows the paper's numbers only."""
    return [r for r in scored_rows(TEXT_CFG.table2, TEXT_BENCH) if not TEXT_CFG.runs[r].missing_weights] \
        if TEXT_CFG else []


def run_outputs(runs, bench=None):
    """A table's inputs: each row's metric files and, for training runs, train.json; a row with
    `seeds` stands for its training replicas `<run>@s<k>` (tfd.config.expand_replicas). A `reported`
    row (the paper's numbers only) has none: nothing is trained, sampled or scored for it."""
    bench = bench or BENCH
    members = [m for r in scored_rows(runs, bench) for m in BENCHES[bench].row_runs(r)]
    return ([f for r in members for f in metric_files(r, bench)]
            + [f"{run_dir(r, bench)}/train.json" for r in members if BENCHES[bench].runs[r].trains])


def sample_run(run, bench=None):
    """The run whose samples show row `run` in the figures: its first training replica, or itself."""
    return BENCHES[bench or BENCH].row_runs(run)[0]


def manifest_inputs(wildcards, input):
    return " ".join(f"--{k.replace('_', '-')} {input[k]}"
                    for k in ("teacher", "ref_stats", "feature_weights", "prompts", "clip_checkpoint", "data_store")
                    if k in input.keys() and input[k])


def diversity_ablations(names=None):
    """The sweeps among `names` (default: every sweep) with a diversity figure (class benchmarks only)."""
    return [n for n in (ABLATIONS if names is None else names)
            if ABLATIONS[n].diversity is not None and BENCHES[ABLATION_BENCH[n]].task != "text"]


def ablation_figures(names):
    """The figures of the sweeps `names`: ablation_<name>.png/.pdf, and diversity_<name>.png/.pdf where asked."""
    return ([f"{FIGURES_DIR}/ablation_{a}.{ext}" for a in names for ext in ("png", "pdf")]
            + [f"{FIGURES_DIR}/diversity_{a}.{ext}" for a in diversity_ablations(names) for ext in ("png", "pdf")])


def ablation_outputs(names):
    """The tables (results/ablation_<name>.csv/.html) and figures of the sweeps `names`."""
    return [f"results/ablation_{a}.{ext}" for a in names for ext in ("csv", "html")] + ablation_figures(names)


def diversity_samples(wildcards):
    return {label: f"{run_dir(sample_run(run))}/samples.npz" for label, run in ABLATIONS[wildcards.ablation].variants}


def modes_rows():
    """The rows of results/table_modes.csv: the modes benchmark's `table1` list, or every run that is
    not a training replica of another (as tfd.tables.table_rows)."""
    from tfd.tables import table_rows
    return table_rows(MODES_CFG, "table1") if MODES_CFG is not None else []


def modes_samples(wildcards):
    """What the modes figure reads: each row's samples (its first training replica's)."""
    return {r: f"{run_dir(sample_run(r, MODES_BENCH), MODES_BENCH)}/samples.npz" for r in scored_rows(modes_rows(), MODES_BENCH)}


def all_figures():
    return ([f"{FIGURES_DIR}/convergence.png", f"{FIGURES_DIR}/convergence.pdf"]
            + ([f"{FIGURES_DIR}/modes_{MODES_BENCH}.{ext}" for ext in ("png", "pdf")] if MODES_CFG is not None else [])
            + [f"{FIGURES_DIR}/samples_{r}.{ext}" for r in scored_rows(table1_runs()) for ext in ("png", "pdf")]
            + ablation_figures(ALL_ABLATIONS)
            + ([f"{FIGURES_DIR}/table2_prompts.{ext}" for ext in ("png", "pdf")] if TEXT_CFG is not None else []))


def out_stem(wildcards, output):
    """A figure rule's output path without `.png` (tfd figure writes <stem>.png and <stem>.pdf)."""
    return output.png[:-len(".png")]


TABLE_FILES = (".csv", ".md", ".html", ".manifest.json", "_replicas.csv")  # _replicas: tfd.tables.write_replicas


def published_files():
    """What `publish` copies: the default DAG's tables (+ manifests, per-replica values, curves) and
    PNG figures, and what `snakemake extended` makes (the methods table, the `in_all: false` sweeps)
    once built, or when `extended` is a target of the same command (`snakemake extended publish`):
    a built one is an input, so publish reruns what changed."""
    targets = getattr(getattr(workflow, "dag_settings", None), "targets", None) or ()
    built = lambda f: "extended" in targets or os.path.exists(f)  # noqa: E731
    tables = (["table1"] + (["table2"] if TEXT_BENCH else []) + (["table_modes"] if MODES_BENCH else [])
              + (["table_methods"] if BENCH_CFG.table_methods and built("results/table_methods.csv") else []))
    extra = [a for a in EXTENDED_ABLATIONS if built(f"results/ablation_{a}.csv")]
    return ([f"results/{t}{x}" for t in tables for x in TABLE_FILES]
            + ["results/convergence.csv"]
            + [f"results/ablation_{a}{x}" for a in ALL_ABLATIONS + extra for x in (*TABLE_FILES, "_curves.csv")]
            # the README shows the PNGs (the PDFs stay in results/)
            + [f for f in all_figures() + ablation_figures(extra) if f.endswith(".png")])


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
    return published_files()



wildcard_constraints:
    bench="|".join(sorted(map(re.escape, BENCHES))),
    method="|".join(sorted({re.escape(r.method) for b in BENCHES.values() for r in b.runs.values()})),
    run="|".join(sorted({re.escape(r) for b in BENCHES.values() for r in b.runs})),
    ablation="|".join(sorted(map(re.escape, ABLATIONS))) or "^$",
    k=r"\d+",
    n=r"\d+",
    key=r"[0-9a-f]{12}",
    pkey=r"[0-9a-f]{12}",
    lkey=r"[0-9a-f]{12}",
