"""GPU-hours of the paper protocol before it runs (`tfd plan`): work counted from the config (or the
jobs of a Snakemake dry run) times measured unit costs from `benchmarks/bench_gpu.py`'s JSON.

Work per GPU job (rules with `resources: gpu`; the others run on CPUs and are not costed):

* distill `<run>`: `train.steps` iterations x `"<bench>/<run>".seconds_per_iter` when that run was measured
  (`bench_gpu.py --runs`), else the method's config run's `"<bench>/<method>"` (`tfd`, `dmd2`: variants such
  as `dmd2_nogan`, few-step rows and sweep values are priced at it), plus its convergence
  record (`steps // train.eval_every` points x `eval.convergence_samples` images, each one generator call
  `"<bench>/onestep"` + Inception features `"inception"`); x `distill_gpus` ranks (torchrun: the per-rank
  batch is the measured one, so a G-rank job costs G GPUs for the same wall time);
* sample shard: its images x NFE (`tfd.runs.run_nfe`; a guided step counts two) x the per-image-per-NFE
  cost of `"<bench>/heun"` (teacher rows: Heun and diffusers pipelines) or `"<bench>/onestep"` (trained
  generators and the one-step teacher row);
* score `<run>`: `eval.num_samples` x `"inception".seconds_per_image` (CLIP score is not measured, not counted);
* teacher pairs shard (DMD): pairs x Heun NFE (`2 pairs_steps - 1`) x `"<bench>/heun"`;
* positives shard (text): prompts x `n_pos` x `steps` x (2 with guidance) x `"<bench>/heun"`, an upper bound
  (prompts with matching real images need fewer teacher samples).

A job whose unit cost is absent from the costs file (or recorded with an `error`) is listed as not
measured and left out of the totals: no number is invented. Wall time on N GPUs is a lower bound:
max(total / N, the longest run's distill -> sample shard -> score chain), dependencies otherwise ignored.
Sources: the workflow rules (workflow/rules/*.smk) and `tfd.config`; costs schema: benchmarks/bench_gpu.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from eval.errors import BadFile, UserError

COSTS_SCHEMA = "tfd.bench_gpu/1"
NOT_MEASURED = "not measured: run benchmarks/bench_gpu.py on the target GPU (then tfd plan --costs FILE)"
NOT_COUNTED = ("not counted: CPU rules (ref_stats, merges, tables), CLIP score, latents; positives are an upper "
               "bound (prompts with matching real images need fewer teacher samples)")
KINDS = ("distill", "sample", "score", "teacher pairs", "positives")
SCORE_RULES = ("score", "score_text", "score_modes")


@dataclass
class Job:
    """One GPU job: `kind` (one of `KINDS`), benchmark, run, and the work it does as
    {cost key: units}: units are iterations (`<bench>/<method>`), images (`inception`) or image-NFEs
    (`<bench>/heun`, `<bench>/onestep`). `gpus`: GPUs the job holds at once."""
    kind: str
    bench: str
    run: str
    work: dict[str, float] = field(default_factory=dict)
    gpus: int = 1
    shard: str = ""
    method: str = ""                  # distill: the run's method (its work key is `<bench>/<method>`)


def _run_jobs(b, bench: str, name: str, distill_gpus: int) -> list[Job]:
    """distill (training runs), `eval.shards` sample shards and score of one run of benchmark `b`."""
    from eval.sample import shard_indices
    run, ev = b.runs[name], b.eval
    jobs = []
    if run.trains:
        jobs.append(distill_job(b, bench, name, distill_gpus))
    for k in range(ev.shards):
        jobs.append(sample_job(b, bench, name, len(shard_indices(ev.num_samples, k, ev.shards)), f"{k}of{ev.shards}"))
    jobs.append(Job("score", bench, name, {"inception": ev.num_samples}))
    return jobs


def distill_job(b, bench: str, name: str, gpus: int = 1) -> Job:
    """The distill job of training run `name`: iterations, and the convergence record's image-NFEs + images."""
    run, ev = b.runs[name], b.eval
    work = {f"{bench}/{run.method}": run.train.steps}
    if run.train.eval_every > 0:
        n = run.train.steps // run.train.eval_every * ev.convergence_samples
        work.update({f"{bench}/onestep": n * run_nfe_of(b, name), "inception": n})
    return Job("distill", bench, name, work, gpus=gpus, method=run.method)


def run_nfe_of(b, name: str) -> int:
    """Network evaluations per image of row `name` (`tfd.runs.run_nfe`)."""
    from tfd.runs import run_nfe
    return run_nfe(b, name)


def sample_job(b, bench: str, name: str, images: int, shard: str) -> Job:
    """A sample shard of `images` images of row `name`: image-NFEs of the teacher or of the generator."""
    run = b.runs[name]
    key = f"{bench}/heun" if run.method in ("heun", "pipeline") else f"{bench}/onestep"
    return Job("sample", bench, name, {key: images * run_nfe_of(b, name)}, shard=shard)


def pairs_job(b, bench: str, name: str, pairs: int, shard: str) -> Job:
    """A teacher-pairs shard of DMD run `name`: `pairs` Heun ODE samples of `pairs_steps` steps."""
    return Job("teacher pairs", bench, name, {f"{bench}/heun": pairs * (2 * b.runs[name].params.pairs_steps - 1)},
               shard=shard)


def positives_job(b, bench: str, name: str, prompts: int, shard: str) -> Job:
    """A positives shard of text run `name`: at most `prompts` x n_pos teacher samples (pipeline NFEs)."""
    p = b.positives_for(name)
    nfe = p.steps * (2 if p.guidance not in (None, 0, 1) else 1)
    return Job("positives", bench, name, {f"{bench}/heun": prompts * p.n_pos * nfe}, shard=shard)


def jobs_from_config(cfg, benches: list[str], distill_gpus: int = 1) -> list[Job]:
    """The GPU jobs of the tables' rows (training replicas included) and sweeps of `benches`, as the
    workflow builds them: per run distill / sample shards / score, per distinct pairs or positives
    setting its shards. Reported-only rows and published rows without their weights have none."""
    from eval.sample import shard_indices
    from tfd.pairs import pairs_key, pairs_settings
    from tfd.positives import positives_key
    jobs: list[Job] = []
    for bench in benches:
        b = cfg.bench(bench)
        rows = [r for row in (b.table2 if b.task == "text" else b.table1) for r in b.row_runs(row)]
        rows += [r for a in b.ablations.values() for _, v in a.variants for r in b.row_runs(v)]
        shared: set[str] = set()
        for name in dict.fromkeys(rows):
            run = b.runs[name]
            if run.reported or run.missing_weights:  # paper numbers only; a published row without its weights
                continue
            jobs += _run_jobs(b, bench, name, distill_gpus)
            if run.trains and getattr(run.params, "pairs_num", None):
                key, n = pairs_key(pairs_settings(run.params)), run.params.pairs_shards
                if key not in shared:
                    shared.add(key)
                    jobs += [pairs_job(b, bench, name, len(shard_indices(run.params.pairs_num, k, n)), f"{k}of{n}")
                             for k in range(n)]
            if run.trains and b.task == "text":
                p = b.positives_for(name)
                if positives_key(p) not in shared:
                    shared.add(positives_key(p))
                    jobs += [positives_job(b, bench, name, len(shard_indices(p.num_prompts, k, p.shards)),
                                           f"{k}of{p.shards}") for k in range(p.shards)]
    return jobs


def parse_dry_run(text: str, where: str = "dry run") -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job block (`rule NAME:` ... `wildcards: k=v, ...`) in the output of
    `snakemake -n` (without --quiet); a job without a `bench` wildcard (the text rules) gets the one of
    its output path `results/<bench>/...`. UserError naming `where` when there is no job."""
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\S+):\n((?:[ \t]+.*\n?)*)", text, re.M):
        wc = re.search(r"^\s+wildcards: (.*)$", m.group(2), re.M)
        pairs = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        out = re.search(r"^\s+output: results/([^/\s]+)/", m.group(2), re.M)
        if "bench" not in pairs and out:
            pairs["bench"] = out.group(1)
        jobs.append((m.group(1), {k.strip(): v.strip() for k, v in pairs.items()}))
    if not jobs:
        raise UserError(f"{where}: no jobs found; give the output of `snakemake -n TARGETS` (without --quiet)")
    return jobs


SAME_CONFIG = "give tfd plan the config files the dry run used (e.g. --config config.yaml --config site.yaml)"


def _find_run(b, bench: str, what: str, pred) -> str:
    """The first training run of `b` for which `pred(name, run)` holds; UserError naming `what` otherwise."""
    name = next((n for n, r in b.runs.items() if r.trains and pred(n, r)), None)
    if name is None:
        raise UserError(f"dry run: {what} of {bench} matches no training run of the config: {SAME_CONFIG}")
    return name


def jobs_from_dry_run(cfg, dry: list[tuple[str, dict[str, str]]], distill_gpus: int = 1) -> tuple[list[Job], int]:
    """GPU jobs of a parsed dry run (`parse_dry_run`) with their work from the config; -> (jobs,
    number of jobs of other rules, which are not costed)."""
    from eval.sample import shard_indices
    from tfd.pairs import pairs_key, pairs_settings
    from tfd.positives import positives_key
    jobs, other = [], 0
    for rule, wc in dry:
        bench = wc.get("bench")
        if bench is None or bench not in cfg.benchmarks:  # a CPU rule without one (tables), or not a benchmark
            other += 1
            continue
        b = cfg.bench(bench)
        if "run" in wc and wc["run"] not in b.runs:
            raise UserError(f"dry run: run {wc['run']!r} of {bench} is not in the config: {SAME_CONFIG}")
        if rule == "distill":
            jobs.append(distill_job(b, bench, wc["run"], distill_gpus))
        elif rule == "sample_shard":
            jobs.append(sample_job(b, bench, wc["run"], len(shard_indices(b.eval.num_samples, int(wc["k"]),
                                                                          int(wc["n"]))), f"{wc['k']}of{wc['n']}"))
        elif rule in SCORE_RULES:
            jobs.append(Job("score", bench, wc["run"], {"inception": b.eval.num_samples}))
        elif rule == "teacher_pairs":
            name = _find_run(b, bench, f"teacher pairs cache {wc['pkey']}", lambda n, r: getattr(
                r.params, "pairs_num", None) and pairs_key(pairs_settings(r.params)) == wc["pkey"])
            n = len(shard_indices(b.runs[name].params.pairs_num, int(wc["k"]), int(wc["n"])))
            jobs.append(pairs_job(b, bench, name, n, f"{wc['k']}of{wc['n']}"))
        elif rule == "positives_shard":
            name = _find_run(b, bench, f"positives cache {wc['key']}",
                             lambda n, r: positives_key(b.positives_for(n)) == wc["key"])
            p = b.positives_for(name)
            n = len(shard_indices(p.num_prompts, int(wc["k"]), int(wc["n"])))
            jobs.append(positives_job(b, bench, name, n, f"{wc['k']}of{wc['n']}"))
        else:
            other += 1
    return jobs, other


def load_costs(path: str | Path) -> dict:
    """The JSON written by `benchmarks/bench_gpu.py --out`; BadFile naming the file when it is not one."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadFile(path, "costs file not found", expected="the --out file of benchmarks/bench_gpu.py") from None
    except (OSError, ValueError) as e:
        raise BadFile(path, "costs file is not readable JSON", found=str(e)) from None
    if not isinstance(d, dict) or d.get("schema") != COSTS_SCHEMA or not isinstance(d.get("jobs"), dict):
        raise BadFile(path, "not a benchmarks/bench_gpu.py results file",
                      expected=f"schema {COSTS_SCHEMA!r}", found=repr(d.get("schema") if isinstance(d, dict) else d))
    return d


def train_record(costs: dict | None, bench: str, run: str, method: str) -> Optional[dict]:
    """The measured training record that prices run `run` (method `method`) of `bench`: its own
    (`<bench>/<run>`, replicas `<run>@s<k>` included), else the method's config run `<bench>/<method>`,
    else any measured run of that method; None when none is."""
    jobs = (costs or {}).get("jobs", {})
    same = {k: r for k, r in sorted(jobs.items())
            if r.get("kind") == "train" and r.get("bench") == bench and r.get("method") == method}
    for key in (f"{bench}/{run.split('@', 1)[0]}", f"{bench}/{method}", *same):
        if key in same:
            return same[key]
    return None


def unit_seconds(costs: dict | None, key: str, rec: Optional[dict] = None) -> Optional[float]:
    """Seconds per unit of cost key `key` (per iteration, per image-NFE, per image), or of the record
    `rec` when given; None when not measured or when its measurement failed."""
    rec = rec if rec is not None else (costs or {}).get("jobs", {}).get(key)
    if not rec or rec.get("error"):
        return None
    if rec["kind"] == "train":
        return float(rec["seconds_per_iter"])
    if rec["kind"] == "sample":
        return float(rec["seconds_per_image_per_nfe"])
    return float(rec["seconds_per_image"])


def job_hours(job: Job, costs: dict | None) -> tuple[Optional[float], list[str]]:
    """(GPU-hours of `job`, the cost keys it lacks); hours None when any is missing. GPU-hours are
    wall hours x `job.gpus`."""
    secs, missing = 0.0, []
    for key, units in job.work.items():
        train = job.kind == "distill" and key == f"{job.bench}/{job.method}"
        s = unit_seconds(costs, key, train_record(costs, job.bench, job.run, job.method) if train else None)
        if s is None:
            missing.append(key)
        else:
            secs += units * s
    return (None if missing else secs / 3600 * job.gpus), missing


@dataclass
class Plan:
    """GPU-hours per kind and in total (measured jobs only), job counts and unmeasured job counts per
    kind, unmeasured jobs by missing cost key, and the wall-time lower bound on `gpus` GPUs (hours;
    None without any measured job)."""
    hours: dict[str, float]
    counts: dict[str, int]
    unmeasured: dict[str, int]
    missing: dict[str, list[str]]
    total_h: float
    wall_h: Optional[float]
    gpus: int


def make_plan(jobs: list[Job], costs: dict | None, gpus: int) -> Plan:
    """Sum `jobs` with `costs` (None: nothing measured) for `gpus` GPUs (module docstring)."""
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    hours = {k: 0.0 for k in KINDS}
    counts = {k: 0 for k in KINDS}
    unmeasured = {k: 0 for k in KINDS}
    missing: dict[str, list[str]] = {}
    chain: dict[tuple[str, str], dict[str, float]] = {}
    for j in jobs:
        counts[j.kind] += 1
        h, miss = job_hours(j, costs)
        for key in miss:
            missing.setdefault(key, []).append(f"{j.kind} {j.bench}/{j.run}" + (f" {j.shard}" if j.shard else ""))
        if h is None:
            unmeasured[j.kind] += 1
            continue
        hours[j.kind] += h
        c = chain.setdefault((j.bench, j.run), {})
        c[j.kind] = max(c.get(j.kind, 0.0), h / j.gpus)
    total = sum(hours.values())
    longest = max((c.get("distill", 0) + c.get("sample", 0) + c.get("score", 0) for c in chain.values()), default=None)
    wall = None if longest is None else max(total / gpus, longest)
    return Plan(hours, counts, unmeasured, missing, total, wall, gpus)


def format_plan(plan: Plan, costs: dict | None, source: str) -> str:
    """The plan as text: a table of jobs and GPU-hours per kind, the total, the wall time, then what
    is not measured (every line says so; no number stands in for a missing one)."""
    head = f"GPU cost plan of {source}"
    if costs:
        head += (f"; unit costs: {costs['device']}, {costs['dtype']}, torch {costs['torch']}"
                 + (" (--tiny shapes: NOT the paper's sizes)" if costs.get("tiny") else ""))
    lines = [head, f"{'job kind':<16}{'jobs':>7}{'GPU-hours':>14}"]
    for k in KINDS:
        if plan.counts[k]:
            val = "n/a" if costs is None else f"{plan.hours[k]:.1f}"
            note = f"  ({plan.unmeasured[k]} job(s) not measured)" if costs is not None and plan.unmeasured[k] else ""
            lines.append(f"{k:<16}{plan.counts[k]:>7}{val:>14}{note}")
    if costs is None:
        lines.append(f"GPU-hours: {NOT_MEASURED}")
        return "\n".join(lines)
    lines.append(f"{'total':<16}{sum(plan.counts.values()):>7}{plan.total_h:>14.1f}"
                 + (" (measured jobs only)" if plan.missing else ""))
    if plan.wall_h is not None:
        lines.append(f"wall time on {plan.gpus} GPU(s): >= {plan.wall_h:.1f} h "
                     "(max of total / GPUs and the longest distill -> sample -> score chain)")
    for key, who in sorted(plan.missing.items()):
        err = costs["jobs"].get(key, {}).get("error")
        why = f"measurement failed ({err})" if err else NOT_MEASURED
        lines.append(f"{key}: {why}; left out of the totals: {len(who)} job(s), e.g. {who[0]}")
    lines.append(NOT_COUNTED)
    return "\n".join(lines)
