"""Reruns follow the config (issue 15): every setting that shapes a file is a param (or an input) of the
rule that makes it, so editing it makes Snakemake rerun exactly the jobs that read it and what depends on
them, and editing a setting that shapes no file (eval.batch_size: per-image seeds) reruns nothing.

The completed state costs no job: every output of the tiny DAG is created empty (a folder for a
directory() output) and `snakemake --touch --forceall` records each job's metadata (params, input list,
code) through the same `persistence.finished` a real run calls (Snakemake 9;
`test_touch_records_what_a_real_run_records` compares the two on a real run). Each case dry-runs with one
overlay config more and compares the jobs Snakemake schedules with the jobs that read the edited key,
closed over the DAG (everything downstream of them)."""
from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, TINY_CONFIG, run_snakemake

D, T = "digits", "digits_text"  # the tiny config's two benchmarks (Table 1's and Table 2's)
DIGITS_ABLATIONS = ("feature_noise", "layers", "lambda_anchor", "seed")
TEXT_ABLATIONS = ("t2i_layers", "t2i_seed")


@dataclass
class Job:
    rule: str
    wildcards: dict
    outputs: list = field(default_factory=list)
    inputs: list = field(default_factory=list)

    @property
    def id(self) -> str:
        w = ", ".join(f"{k}={v}" for k, v in self.wildcards.items())
        return f"{self.rule}[{w}]" if w else self.rule


def parse_jobs(text: str) -> list[Job]:
    """The jobs of a `snakemake -n` printout (rule, wildcards, outputs, inputs)."""
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?: {4}.*\n?)*)", text, re.M):
        fields = dict(re.findall(r"^ {4}(\w+): (.*)$", m.group(2), re.M))
        wc = dict(kv.split("=", 1) for kv in fields["wildcards"].split(", ")) if "wildcards" in fields else {}
        outputs, inputs = ([] if k not in fields else fields[k].split(", ") for k in ("output", "input"))
        jobs.append(Job(m.group(1), wc, outputs, inputs))
    return jobs


def dry_run(workdir: Path, *args, edit: dict | None = None) -> list[Job]:
    """`snakemake -n ARGS` on the tiny config (plus the overlay `edit`) -> the jobs it would run."""
    files = [str(TINY_CONFIG)]
    if edit is not None:
        (workdir / "edit.yaml").write_text(yaml.safe_dump(edit))
        files.append(str(workdir / "edit.yaml"))
    r = run_snakemake(workdir, "-n", *args, "--configfile", *files)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return parse_jobs(r.stdout)


def directory_rules() -> set[str]:
    """Rules whose output is a directory() (text_data, train_vae, train_t2i_teacher), from the rule files."""
    found = set()
    for f in (ROOT / "workflow/rules").glob("*.smk"):
        blocks = re.split(r"^\s*rule (\w+):\n", f.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            out = re.search(r"^\s*output:\n(.*?)^\s*(?:params|log|shell|run|threads|resources|input):", body,
                            re.M | re.S)
            if out and "directory(" in out.group(1):
                found.add(name)
    return found


def make_outputs(workdir: Path, jobs: list[Job]) -> None:
    """Every output of `jobs`, empty (a folder for a directory() output)."""
    dirs = directory_rules()
    assert {"text_data", "train_vae", "train_t2i_teacher"} <= dirs, dirs
    for job in jobs:
        for o in job.outputs:
            p = workdir / o
            if job.rule in dirs:
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()


def complete(workdir: Path, *targets) -> list[Job]:
    """The completed state of `targets` (default: rule all) without running a job -> the DAG's jobs."""
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    jobs = dry_run(workdir, "--forceall", *targets)
    make_outputs(workdir, jobs)
    r = run_snakemake(workdir, "--touch", "--forceall", *targets, "--configfile", str(TINY_CONFIG))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return jobs


def downstream(dag: list[Job], seeds: list[Job]) -> set[str]:
    """The ids of `seeds` and of every job of `dag` that depends on one of them."""
    producer = {o: j for j in dag for o in j.outputs}
    consumers: dict[str, list[Job]] = {}
    for j in dag:
        for i in j.inputs:
            if i in producer:
                consumers.setdefault(producer[i].id, []).append(j)
    todo, seen = list(seeds), set()
    while todo:
        j = todo.pop()
        if j.id not in seen:
            seen.add(j.id)
            todo += consumers.get(j.id, [])
    return seen


def selected(dag: list[Job], readers) -> list[Job]:
    """The jobs of `dag` matching any (rule, {wildcard: value or tuple of values}) of `readers`."""
    def match(j, rule, want):
        return j.rule == rule and all(j.wildcards.get(k) in (v if isinstance(v, tuple) else (v,))
                                      for k, v in want.items())
    return [j for j in dag if any(match(j, rule, want) for rule, want in readers)]


def metadata(workdir: Path, keys) -> dict:
    """Snakemake's metadata record of every output file in `workdir`: {file: {key: value}}."""
    out = {}
    for f in (workdir / ".snakemake/metadata").rglob("*"):
        if f.is_file():
            name = "".join(p.lstrip("@") for p in f.relative_to(workdir / ".snakemake/metadata").parts)
            rec = json.loads(f.read_text())
            out[base64.urlsafe_b64decode(name).decode()] = {k: rec.get(k) for k in keys}
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A working directory holding the tiny DAG (rule all) as completed -> (directory, its jobs)."""
    workdir = tmp_path_factory.mktemp("rerun")
    dag = complete(workdir)
    assert len(dag) > 100 and {j.rule for j in dag} >= {"train_teacher", "distill", "positives_shard", "table2"}
    return workdir, dag


def bench(name, **block):
    return {"benchmarks": {name: block}}


def case(id, edit, readers, new_paths=False, slow=True):
    """An edit and the jobs that read it: (rule, {wildcard: value}) selectors. `new_paths`: the edit
    renames outputs (a cache keyed by its settings), so the edited config's DAG has jobs the completed
    one has not: they run too."""
    return pytest.param(edit, readers, new_paths, id=id, marks=[pytest.mark.slow] if slow else [])


CASES = [
    # settings that shape no file (per-image seeds; the teacher's stats.jsonl is no output): nothing reruns
    case("eval.batch_size+teacher.train.log_every",
         {"benchmarks": {D: {"eval": {"batch_size": 7}, "teacher": {"train": {"log_every": 3}}},
                         T: {"eval": {"batch_size": 3}, "teacher": {"train": {"log_every": 3}}}}}, [], slow=False),
    # samples: how many, their seeds, the sampler
    case("digits.eval.num_samples", bench(D, eval={"num_samples": 30}), [("sample_shard", {"bench": D})], slow=False),
    case("digits.eval.base_seed", bench(D, eval={"base_seed": 1}),  # every tiny digits run keeps a convergence record
         [("sample_shard", {"bench": D}), ("distill", {"bench": D}), ("table1", {}),
          ("ablation_table", {"ablation": DIGITS_ABLATIONS})]),
    case("digits_text.eval.base_seed", bench(T, eval={"base_seed": 1}),
         [("sample_shard", {"bench": T}), ("distill", {"bench": T})]),
    case("digits_text.runs.teacher_g1.sampler", bench(T, runs={"teacher_g1": {"sampler": {"guidance": 2.0}}}),
         [("sample_shard", {"bench": T, "run": "teacher_g1"})]),
    # convergence records (train.eval_every) and the tables' thresholds
    case("digits.eval.convergence_samples", bench(D, eval={"convergence_samples": 10}),
         [("distill", {"bench": D}), ("table1", {}), ("ablation_table", {"ablation": DIGITS_ABLATIONS})]),
    case("digits_text.eval.convergence_samples", bench(T, eval={"convergence_samples": 10}),
         [("distill", {"bench": T})]),
    case("digits.runs.dmd2.train.eval_every", bench(D, runs={"dmd2": {"train": {"eval_every": 1}}}),
         [("distill", {"bench": D, "run": "dmd2@s0"}), ("distill", {"bench": D, "run": "dmd2@s1"})]),  # replicas
    case("digits.eval.fid_thresholds", bench(D, eval={"fid_thresholds": [30]}),  # the manifests record eval
         [("table1", {}), ("figure_convergence", {}), ("ablation_table", {"ablation": DIGITS_ABLATIONS})]),
    # a run's block: that run only; its label, paper numbers, nfe and the table's rows: tables and figures
    case("digits.runs.dmd2.params", bench(D, runs={"dmd2": {"params": {"gan_weight_g": 1e-3}}}),
         [("distill", {"bench": D, "run": "dmd2@s0"}), ("distill", {"bench": D, "run": "dmd2@s1"})]),
    case("digits.runs.dmd2.label", bench(D, runs={"dmd2": {"label": "DMD2 (renamed)"}}),
         [("table1", {}), ("figure_samples", {"run": "dmd2"})], slow=False),
    case("digits.runs.dmd2.paper+nfe+table1", bench(D, runs={"dmd2": {"paper": {"fid_digits": 1.0}, "nfe": 2}},
                                                    table1=["teacher_ode", "tfd", "teacher_sde", "onestep_init", "dmd2",
                                                            "cd_l2", "drift_randnet"]),  # config.yaml's rows, reordered
         [("table1", {})]),
    case("digits_text.runs.tfd.label", bench(T, runs={"tfd": {"label": "TFD (renamed)"}}),
         [("table2", {}), ("figure_prompts", {}), ("ablation_table", {"ablation": TEXT_ABLATIONS})]),
    # metrics and sweeps
    case("digits.eval.metrics", bench(D, eval={"metrics": ["fid_digits", "precision_digits", "recall_digits",
                                                           "max_ssim"]},  # compare: kept metrics only
                                      ablations={"lambda_anchor": {"compare": ["max_ssim", "recall_digits"]}}),
         [("table1", {}), ("ablation_table", {"ablation": DIGITS_ABLATIONS})]),
    case("digits.ablations.feature_noise.budgets+title",
         bench(D, ablations={"feature_noise": {"budgets": [1, 3], "title": "Noise"}}),
         [("ablation_table", {"ablation": "feature_noise"}), ("figure_ablation", {"ablation": "feature_noise"})]),
    case("digits.ablations.lambda_anchor.diversity",
         bench(D, ablations={"lambda_anchor": {"diversity": {"per_class": 3}}}),
         [("figure_diversity", {"ablation": "lambda_anchor"})]),
    # teachers
    case("digits.teacher.train.steps", bench(D, teacher={"train": {"steps": 21}}), [("train_teacher", {})]),
    case("digits_text.teacher.train.steps", bench(T, teacher={"train": {"steps": 11}}), [("train_t2i_teacher", {})]),
    case("digits_text.teacher.vae", bench(T, teacher={"vae": {"kl_weight": 1e-3}}), [("train_vae", {})]),
    case("digits_text.teacher.precision", bench(T, teacher={"precision": "bf16"}),  # the teacher through the adapter
         [("distill", {"bench": T}), ("sample_shard", {"bench": T, "run": ("teacher_heun_g6", "onestep_init")})]),
    # the text benchmark's prompt table, positives, reference statistics and CLIP model
    case("digits_text.prompts.num_prompts", bench(T, prompts={"num_prompts": 7}), [("prompts", {})]),
    case("digits_text.positives.n_pos", bench(T, positives={"n_pos": 3}), [], new_paths=True),
    case("digits_text.eval.resolution", bench(T, eval={"resolution": 16}),
         [("ref_stats", {"bench": T}), ("score_text", {})]),
    case("digits_text.eval.clip_resize", bench(T, eval={"clip_resize": 16}), [("train_clip", {}), ("score_text", {})]),
]


def test_nothing_edited_reruns_nothing(done):
    workdir, _ = done
    assert [j.id for j in dry_run(workdir)] == []


@pytest.mark.parametrize("edit, readers, new_paths", CASES)
def test_edit_reruns_exactly_its_readers(done, edit, readers, new_paths):
    """Editing the key schedules the jobs that read it and everything downstream, and nothing else."""
    workdir, dag = done
    scheduled = dry_run(workdir, edit=edit)
    seeds = selected(dag, readers)
    assert len(seeds) >= len(readers), f"a selector matches no job of the DAG: {readers}"
    if new_paths:  # jobs whose outputs the completed DAG does not have, and what depends on them
        old = {o for j in dag for o in j.outputs}
        dag = dry_run(workdir, "--forceall", edit=edit)
        new = [j for j in dag if not set(j.outputs) <= old]
        assert new, "the edit renames no output"
        seeds = selected(dag, readers) + new
    want = downstream(dag, seeds)
    got = {j.id for j in scheduled}
    assert got == want, f"scheduled but not reading the key: {sorted(got - want)}\nnot scheduled: {sorted(want - got)}"


@pytest.mark.slow
def test_touch_records_what_a_real_run_records(tmp_path):
    """The completed state above is `--touch`ed: here a few jobs (teacher, two sample shards, merge) really
    run, the same jobs are touched in another directory, and both record the same metadata per output
    (rule, params, inputs, code, shell command) and schedule the same jobs after an edit."""
    target = "results/digits/heun/teacher_ode/samples.npz"
    real, touched = tmp_path / "real", tmp_path / "touched"
    real.mkdir()
    touched.mkdir()
    shutil.copy(ROOT / "config.yaml", real / "config.yaml")
    r = run_snakemake(real, target, "--configfile", str(TINY_CONFIG))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    jobs = complete(touched, target)
    assert sorted(j.rule for j in jobs) == ["merge_samples", "sample_shard", "sample_shard", "train_teacher"]
    keys = ("rule", "input", "log", "params", "code", "shellcmd", "incomplete", "record_format_version")
    records = [metadata(d, keys) for d in (real, touched)]
    assert set(records[0]) == {o for j in jobs for o in j.outputs}
    assert records[0] == records[1]
    assert all(records[0][o]["params"] for j in jobs if j.rule != "merge_samples" for o in j.outputs)
    for d in (real, touched):
        assert dry_run(d, target) == []
    edit = bench(D, eval={"num_samples": 30})
    rerun = [sorted(j.id for j in dry_run(d, target, edit=edit)) for d in (real, touched)]
    assert rerun[0] == rerun[1]
    assert [i.split("[")[0] for i in rerun[0]] == ["merge_samples", "sample_shard", "sample_shard"], rerun[0]
