"""Tables from metric files: `results/table1.csv` (+ `.md`), measured columns and, where the
benchmark is the paper's, the paper's reported numbers in separate `paper_*` columns."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from eval.errors import BadFile, UserError
from eval.io import atomic_write_text_sealed, check_record, check_sidecar
from eval.metrics import fid_key
from eval.score import read_metric
from tfd.config import REPORTED_STATUS, Config
from tfd.runs import run_nfe
from tfd.utils import atomic_write_json, atomic_write_text, file_sha256, path_sha256, provenance


def run_dir(results_dir, bench: str, method: str, run: str) -> Path:
    return Path(results_dir) / bench / method / run


def check_protocol(rec: dict, path: Path, b, ref_stats_sha256: str | None = None) -> None:
    """Refuse a metric record computed on another protocol than benchmark `b`'s config: another
    number of samples (`eval.num_samples`), another seed range (`eval.base_seed ..`), or, for feature
    metrics when `ref_stats_sha256` is given, other reference statistics. BadFile naming the file,
    the field, the config's value and the file's."""
    n, base = b.eval.num_samples, b.eval.base_seed
    if rec["n"] != n:
        raise BadFile(path, "computed on another number of samples than the config's", key="n",
                      expected=f"{n} (eval.num_samples)", found=rec["n"], hint="rescore (snakemake reruns it)")
    prov = rec.get("provenance") or {}
    seeds = prov.get("seeds")
    if seeds is not None and list(seeds) != [base, base + n - 1]:
        raise BadFile(path, "computed on another seed range than the config's", key="provenance.seeds",
                      expected=f"[{base}, {base + n - 1}] (eval.base_seed)", found=seeds)
    theirs = prov.get("ref_stats_sha256")
    if ref_stats_sha256 and theirs and theirs != ref_stats_sha256:
        raise BadFile(path, "computed against other reference statistics than the table's",
                      key="provenance.ref_stats_sha256", expected=ref_stats_sha256[:16], found=theirs[:16])


def check_samples_of_run(rec: dict, path: Path, samples: Path) -> None:
    """Refuse a metric record that was computed on other samples than its run's own `samples.npz`
    (when the run has it): a metric file copied from another run. BadFile naming both files."""
    theirs = (rec.get("provenance") or {}).get("samples_sha256")
    if theirs and samples.is_file() and file_sha256(samples) != theirs:
        raise BadFile(path, "computed on other samples than its run's", key="provenance.samples_sha256",
                      expected=f"{file_sha256(samples)[:16]} ({samples})", found=theirs[:16],
                      hint="a metric file of another run? rescore this run")


def reference_sha256s(cfg: Config, results_dir, rows: list[str]) -> dict[str, list[str]]:
    """{reference statistics sha256: [metric files]} over every feature-metric file of `rows` (and
    their replicas): more than one key means the rows were scored against different references."""
    b = cfg.bench()
    out: dict[str, list[str]] = {}
    for row in rows:
        for rname in b.row_runs(row):
            run = b.runs[rname]
            d = run_dir(results_dir, cfg.benchmark, run.method, rname) / "metrics"
            for metric in b.eval.metrics:
                f = d / f"{metric}.json"
                if f.is_file():
                    sha = (read_metric(f, metric).get("provenance") or {}).get("ref_stats_sha256")
                    if sha:
                        out.setdefault(sha, []).append(str(f))
    return out


def _one_run(cfg: Config, results_dir, row_name: str, run_name: str, ref_stats_sha256: str | None) -> dict:
    """The measured columns of one run (a row, or one training replica of it): its metrics (each
    file read by `read_metric` and checked against the config's protocol by `check_protocol`),
    training cost and iterations to the FID thresholds."""
    b = cfg.bench()
    run = b.runs[run_name]
    d = run_dir(results_dir, cfg.benchmark, run.method, run_name)
    out = {}
    for metric in b.eval.metrics:
        f = d / "metrics" / f"{metric}.json"
        if run.missing_weights and not f.is_file():
            out[metric] = None
            continue
        rec = read_metric(f, metric)
        check_protocol(rec, f, b, ref_stats_sha256)
        check_samples_of_run(rec, f, d / "samples.npz")
        out[metric] = rec["value"]
        ci = (rec.get("provenance") or {}).get("ci95")  # FID's bootstrap over the sample images
        if ci is not None:
            out[f"{metric}{_BOOT}"] = (float(ci[1]) - float(ci[0])) / 2
    t = read_train_info(d)
    if t is not None:
        out["iters"] = t.get("iters")
        out["generator_updates"] = t.get("generator_updates")
        out["train_wall_s"] = round(t.get("train_wall_s", float("nan")), 1)
        out["ms_per_generator_update"] = round(1e3 * t.get("wall_s_per_generator_update", float("nan")), 1)
    curve = read_convergence(d, last_step=_iters(t))
    for thr in b.eval.fid_thresholds:
        out[f"iters_to_fid<={thr:g}"] = iters_to_reach(curve, thr)
    return out


_BOOT = "__bootstrap_ci95"  # per-run column: half-width of a metric's bootstrap interval (single-seed rows)


def t_interval(values) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student-t confidence interval of the mean) of
    replica values (n >= 2): `t_{0.975, n-1} * s / sqrt(n)` with `s` the sample standard
    deviation (ddof 1). n = 1: (value, nan)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def _aggregate(rows: list[dict], metrics: list[str]) -> dict:
    """One row from its replicas' columns: each metric's mean and `<metric>_ci95` (`t_interval`);
    counts and costs averaged; iterations to a threshold averaged only when every replica reached
    it (else None)."""
    out = {"seeds": len(rows)}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        if any(v is None for v in vals):
            out[key] = None
            if key in metrics:
                out[f"{key}_ci95"] = None
            continue
        mean, hw = t_interval(vals)
        out[key] = mean if key in metrics or not all(isinstance(v, int) for v in vals) else round(mean)
        if key in metrics:
            out[f"{key}_ci95"] = hw
    return out


def collect_row(cfg: Config, results_dir, run_name: str, ref_stats_sha256: str | None = None,
                replicas_out: list | None = None) -> dict:
    """One table row: run `run_name`'s measured columns (`_one_run`), or with `seeds` the mean and
    95% t-interval over its training replicas (`<run>@s<k>`, whose own columns are appended to
    `replicas_out`), NFE and the paper's numbers."""
    b = cfg.bench()
    run = b.runs[run_name]
    row = {"run": run_name, "method": run.label or run.method, "nfe": run_nfe(b, run_name)}
    if run.missing_weights:
        row["status"] = "not scored: its weights are not given (sampler.pipeline / sampler.unet)"
    if run.reported:  # the paper's numbers only: no files are read, every measured column stays empty
        row["status"] = REPORTED_STATUS
        row.update({m: None for m in b.eval.metrics})
        row.update({f"paper_{k}": v for k, v in run.paper.items()})
        return row
    members = b.row_runs(run_name)
    cols = [_one_run(cfg, results_dir, run_name, r, ref_stats_sha256) for r in members]
    cols = [{k: v for k, v in c.items() if not k.endswith(_BOOT)} for c in cols] if run_name in b.replicas else cols
    if run_name in b.replicas:
        row.update(_aggregate(cols, list(b.eval.metrics)))
        row["ci95_over"] = f"{len(members)} training seeds (t)"
        if replicas_out is not None:
            replicas_out += [{"run": run_name, "replica": r, "seed": b.runs[r].train.seed, **c}
                             for r, c in zip(members, cols)]
    else:
        one = cols[0]
        row.update({k: v for k, v in one.items() if not k.endswith(_BOOT)})
        boot = {k[:-len(_BOOT)]: v for k, v in one.items() if k.endswith(_BOOT)}
        for metric, hw in boot.items():
            row[f"{metric}_ci95"] = hw
        if boot:
            row["ci95_over"] = "sample images (bootstrap)"
    for k, v in run.paper.items():
        row[f"paper_{k}"] = v
    return row


def compare_rows(cfg: Config, rows: list[dict], replicas: list[dict]) -> dict[str, str]:
    """The comparison column: for each row, whether its FID differs from the `compare_to` row's
    beyond the spread of training seeds, by Welch's two-sided t-test at the 5% level on the
    replica values (`welch_verdict`): `lower`/`higher (p=...)`, `n.s. (p=...)`, or `n/a` where
    either row has fewer than 2 seeds."""
    b = cfg.bench()
    ref = b.compare_to
    metric = fid_key(b.eval.metrics)
    per_row: dict[str, list[float]] = {}
    for r in replicas:
        if r.get(metric) is not None:
            per_row.setdefault(r["run"], []).append(r[metric])
    return {row["run"]: "reference" if row["run"] == ref else welch_verdict(per_row.get(row["run"], []),
                                                                           per_row.get(ref, []))
            for row in rows}


def welch_verdict(a, ref) -> str:
    """Whether replica values `a` differ from `ref`'s beyond the spread of training seeds: Welch's
    two-sided t-test at the 5% level (`scipy.stats.ttest_ind(equal_var=False)`) -> `lower (p=...)`,
    `higher (p=...)` (the sign of mean(a) - mean(ref)), `n.s. (p=...)`, or `n/a` where either side
    has fewer than 2 values."""
    from scipy import stats

    if len(a) < 2 or len(ref) < 2:
        return "n/a (needs >= 2 seeds in both rows)"
    p = float(stats.ttest_ind(a, ref, equal_var=False).pvalue)
    diff = sum(a) / len(a) - sum(ref) / len(ref)
    return (("lower" if diff < 0 else "higher") if p < 0.05 else "n.s.") + f" (p={p:.3g})"


def read_convergence(d: Path, last_step: int | None = None) -> list[dict]:
    """The run's convergence record (`convergence.jsonl`: FID on a fixed sample set every K
    iterations), read and checked (the one reader of the format): [] when the run keeps none; each
    line a JSON object with an int `step` (strictly increasing) and finite values, matching its
    `record_sha256` (a changed digit); `last_step` (the run's iterations, from train.json): the record
    ends there (the trainer always records the last step, so a record cut at a line boundary is
    seen). BadFile naming the file (and line) otherwise, e.g. for an empty or non-text file. The
    records come back without their checksums."""
    f = Path(d) / "convergence.jsonl"
    if not f.is_file():
        return []
    try:
        text = f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(f, "not a convergence record (not UTF-8 text: damaged or another file)", found=e) from None
    if not text.strip():
        raise BadFile(f, "empty convergence record (the trainer writes one only with records in it)",
                      hint="retrain the run, or delete the file if the run keeps no convergence record")
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{f}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadFile(where, "not a JSON record (truncated or damaged)", found=e) from None
        if not isinstance(rec, dict):
            raise BadFile(where, "not a convergence record", expected="a JSON object", found=type(rec).__name__)
        rec = check_record(rec, where, "convergence record")
        bad = {k: v for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)}
        if not isinstance(rec.get("step"), int) or bad:
            raise BadFile(where, "not a convergence record", expected="an int step and finite values",
                          found=f"step {rec.get('step')!r}" + (f", non-finite {bad}" if bad else ""))
        if out and rec["step"] <= out[-1]["step"]:
            raise BadFile(where, "steps out of order", key="step", expected=f"> {out[-1]['step']}",
                          found=rec["step"])
        out.append(rec)
    if last_step is not None and out and out[-1]["step"] != last_step:
        raise BadFile(f, "the record does not end at the run's last iteration (cut short or from another run)",
                      key="step", expected=f"{last_step} (iters in {f.with_name('train.json').name})",
                      found=out[-1]["step"])
    return out


def read_json(path: Path) -> dict:
    """A JSON object file (train.json, ...), read and checked: BadFile naming it when it is not one,
    or when its `record_sha256` (train.json has one) does not match (a changed digit). The record
    comes back without its checksum."""
    try:
        rec = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(path, "not readable JSON (truncated or damaged)", found=e) from None
    if not isinstance(rec, dict):
        raise BadFile(path, "not a JSON object", found=type(rec).__name__)
    return check_record(rec, path)


def read_train_info(d: Path) -> dict | None:
    """A run's `train.json` (`read_json`, and a training record: int `iters`), None when the run has
    none (a sampler row); BadFile naming it for another JSON object (e.g. a metric file)."""
    f = Path(d) / "train.json"
    if not f.is_file():
        return None
    t = read_json(f)
    if _iters(t) is None:
        raise BadFile(f, "not a training record (train.json of tfd distill)", key="iters",
                      expected="an int number of iterations", found=f"keys {sorted(t)[:8]}")
    return t


def _iters(train: dict | None) -> int | None:
    it = (train or {}).get("iters")
    return it if isinstance(it, int) and not isinstance(it, bool) else None


def _fid(rec: dict):
    """The record's FID value (the key chosen by `eval.metrics.fid_key`), or None."""
    key = fid_key(rec)
    return None if key is None else rec[key]


def iters_to_reach(curve: list[dict], threshold: float):
    """First training iteration at which the recorded FID is <= threshold (None: never, or no record)."""
    for rec in curve:
        fid = _fid(rec)
        if fid is not None and fid <= threshold:
            return rec["step"]
    return None


def best_within(curve: list[dict], budget: int):
    """Best (lowest) recorded FID no later than `budget` iterations: the paper's budgeted FID
    (Tables 4-7, "the best FID observed no later than the specified update budget")."""
    fids = [_fid(r) for r in curve if r["step"] <= budget and _fid(r) is not None]
    return min(fids) if fids else None


def write_csv(df: pd.DataFrame, out) -> None:
    """A table as csv (no index), atomically, with its checksum sidecar `<name>.sha256`
    (`eval.io.atomic_write_text_sealed`), verified by `read_csv`."""
    atomic_write_text_sealed(out, df.to_csv(index=False))


def read_csv(path) -> pd.DataFrame:
    """Read a table csv written by `write_csv` (the one reader of the suite's csv tables; the figures
    read theirs here): FileNotFoundError naming a missing file; BadFile naming the file when it does
    not match its sidecar `<name>.sha256` (truncated, a changed digit, replaced), is not UTF-8 text,
    is empty, is cut mid-line (`to_csv` ends every line) or does not parse as csv. A csv without a
    sidecar (written by hand or by another tool) is read unverified."""
    import io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "table csv not found", str(path))
    check_sidecar(path, "table csv")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(path, "not a csv table (not UTF-8 text: damaged or another file)", found=e) from None
    if not text.strip():
        raise BadFile(path, "empty csv table", hint="rebuild it (tfd table / tfd ablation)")
    if not text.endswith("\n"):
        raise BadFile(path, "csv table cut mid-line (truncated)", hint="rebuild it (tfd table / tfd ablation)")
    try:
        return pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise BadFile(path, "not a readable csv table", found=f"{type(e).__name__}: {e}") from None


HTML_STYLE = ("body{font-family:sans-serif;font-size:13px;margin:12px} p{max-width:60em} "
              "table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:3px 6px;text-align:left} "
              "th{background:#eee}")


def _write_csv_md(df: pd.DataFrame, out, note: str) -> None:
    """`out` (csv), and beside it `.md` and `.html` (the report shows the html) with the note."""
    import html

    for c in df.columns:
        if c in ("nfe", "iters", "generator_updates") or c.startswith("iters_to_"):
            df[c] = df[c].astype("Int64")  # counts with gaps stay integers: 200, not 200.0
        elif df[c].dtype == float and c not in ("train_wall_s",):
            df[c] = df[c].round(4)
    out = Path(out)
    write_csv(df, out)
    atomic_write_text(out.with_suffix(".md"), note + "\n\n" + df.to_markdown(index=False) + "\n")
    atomic_write_text(out.with_suffix(".html"),
                      f"<!doctype html><meta charset='utf-8'><title>{html.escape(out.name)}</title>"
                      f"<style>{HTML_STYLE}</style><p>{html.escape(note)}</p>"
                      + df.to_html(index=False, na_rep="", border=0) + "\n")


def write_table(cfg: Config, results_dir, out, table: str = "table1", ref_stats=None) -> pd.DataFrame:
    """`results/table1.csv` or `table2.csv` (+ `.md`, `.html`): one row per run of the benchmark's
    `table1`/`table2` list (table1 default: every run) with its metrics, NFE and training cost;
    the paper's numbers in `paper_*` columns. ValueError for a table the benchmark does not have;
    BadFile / FileNotFoundError for a missing, damaged or other-protocol metric file (`ref_stats`:
    the reference statistics every feature metric must have used)."""
    b = cfg.bench()
    rows = table_rows(b, table)
    if not rows:
        raise UserError(f"benchmark {cfg.benchmark!r} has no {table} rows (benchmarks.{cfg.benchmark}.{table})")
    ref_sha = file_sha256(ref_stats) if ref_stats else None
    if ref_sha is None:  # no reference named: the rows must at least agree with one another
        refs = reference_sha256s(cfg, results_dir, rows)
        if len(refs) > 1:
            (a, fa), (c, fc) = list(refs.items())[:2]
            raise BadFile(fc[0], "scored against other reference statistics than other rows of the table",
                          key="provenance.ref_stats_sha256", expected=f"{a[:16]} (as {fa[0]})", found=c[:16],
                          hint="rescore with one reference, or pass --ref-stats to name the right one")
    replicas: list[dict] = []
    records = [collect_row(cfg, results_dir, r, ref_sha, replicas) for r in rows]
    if b.compare_to is not None:
        vs = compare_rows(cfg, records, replicas)
        for rec in records:
            rec[f"vs_{b.compare_to}"] = vs[rec["run"]]
    df = pd.DataFrame(records)
    note = (f"Benchmark `{cfg.benchmark}`. Measured by this suite"
            + ("; `paper_*` columns are the TFD paper's reported numbers, not measured here." if any(
                c.startswith("paper_") for c in df.columns) else "."))
    if "status" in df.columns and (df["status"] == REPORTED_STATUS).any():
        note += (f" Rows with status `{REPORTED_STATUS}`: methods this suite does not retrain; only their "
                 "`paper_*` numbers (as the TFD paper reports them), no measured values.")
    if replicas:
        note += (" Rows with `seeds` > 1: mean over their training replicas (the final generator of a fixed "
                 "budget each, never best-of); `<metric>_ci95`: half-width of the 95% Student-t interval of the "
                 "mean; per-replica values in `_replicas.csv`.")
    if "ci95_over" in df.columns and (df["ci95_over"] == "sample images (bootstrap)").any():
        note += (" Rows of one training seed: `<fid>_ci95` is the half-width of the 95% percentile-bootstrap "
                 f"interval over the sample images (eval.bootstrap = {b.eval.bootstrap} resamples): the sample-set "
                 "part of the uncertainty only; `ci95_over` says which interval a row has.")
    if b.compare_to is not None:
        note += (f" `vs_{b.compare_to}`: Welch's two-sided t-test of the row's "
                 f"{fid_key(b.eval.metrics)} against row `{b.compare_to}` over training seeds, 5% level.")
    if b.data.kind == "shapes":
        from eval.modes import RARE, RARE_MAX_FREQ
        note += (" Modes read by an exact rule (eval.modes.read_modes), 48 = 4 classes x 12 sub-modes with Zipf "
                 "frequencies: `modes_covered` share of modes with >= 1 sample of their class; `mode_tv` mean over "
                 "classes of the total variation distance between the sample sub-mode histogram (+ an off bin) and "
                 f"the true frequencies; `rare_recall` share of the {int(RARE.sum())} rare modes (true frequency <= "
                 f"{RARE_MAX_FREQ:.2%}) hit; `off_mode` share of samples not read as a mode of their class.")
    if b.task == "text":
        clip = f"open_clip `{b.eval.clip_model}`" + (" trained on this benchmark's captions by the workflow, not the "
                                                    "paper's ViT-g-14" if b.data.kind == "digits_text" else "")
        note += (f" FID features: `{b.eval.feature_extractor}`; `clip_score`: mean raw cosine of {clip}."
                 " `nfe`: UNet forward passes per image, a classifier-free-guided step counting two (the paper's FP). "
                 f"Image i gets prompt i % {b.prompts.num_prompts} and seed base + i, whatever the batch size or "
                 "number of shards (DMD2 seeds per batch).")
    _write_csv_md(df, out, note)
    write_replicas(replicas, out, ["run", "replica", "seed"])
    return df


def table_rows(b, table: str) -> list[str]:
    """The rows of `table` (table1 / table2) of benchmark `b`: its list, or for table1 every run
    that is not a training replica of another."""
    listed = getattr(b, table)
    if listed or table != "table1":
        return list(listed)
    members = {m for reps in b.replicas.values() for m in reps}
    return [r for r in b.runs if r not in members]


def replicas_path(out) -> Path:
    """`<table>_replicas.csv` beside `<table>.csv`: the per-replica values of rows with seeds."""
    out = Path(out)
    return out.with_name(out.stem + "_replicas.csv")


def write_replicas(replicas: list[dict], out, key_columns: list[str]) -> None:
    """Write `replicas_path(out)` always, so a table's outputs are one fixed set (the workflow declares
    it and `publish` copies it): a table without rows of several seeds gets the header only
    (`key_columns`), never a stale file from an earlier configuration."""
    df = pd.DataFrame(replicas) if replicas else pd.DataFrame(columns=key_columns)
    write_csv(df, replicas_path(out))


def write_convergence(cfg: Config, results_dir, out) -> pd.DataFrame:
    """All runs' convergence records in one long table (run, label, step, generator_updates, wall, fid)."""
    b = cfg.bench()
    rows = []
    for row in table_rows(b, "table1"):
        for name in b.row_runs(row):  # a row with seeds: one record per training replica
            run = b.runs[name]
            for rec in read_convergence(run_dir(results_dir, cfg.benchmark, run.method, name)):
                rows.append({"run": name, "label": run.label or name, **rec})
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run", "label", "step"])  # no run keeps one
    write_csv(df, out)
    return df


def ablation_compare_keys(b, abl) -> list[str]:
    """The ablation table's columns tested against the base run's (`vs_base_<column>`): the final
    FID, the best FID within the largest budget, and the sweep's `compare` metrics (`final_<metric>`)."""
    fid = fid_key(b.eval.metrics)
    budgets = abl.budgets or sorted({b.runs[r].train.steps for _, r in abl.variants})
    keys = [f"final_{fid}"] + ([f"best_{fid}@{max(budgets)}"] if budgets else [])
    return keys + [f"final_{m}" for m in abl.compare if f"final_{m}" not in keys]


def ablation_budgets(cfg: Config, name: str) -> list[int]:
    b = cfg.bench()
    abl = b.ablations[name]
    return abl.budgets or sorted({b.runs[r].train.steps for _, r in abl.variants})


def write_ablation(cfg: Config, results_dir, name: str, out, curves_out=None) -> pd.DataFrame:
    """`results/ablation_<name>.csv` (+ .md): per variant the best FID of its convergence record no
    later than each update budget (the paper's Tables 4-7), then the final generator's metrics on
    the full evaluation set; `curves_out`: the variants' convergence records (long format)."""
    b = cfg.bench()
    if name not in b.ablations:
        raise UserError(f"unknown ablation {name!r} (configured: {', '.join(sorted(b.ablations)) or 'none'})")
    abl = b.ablations[name]
    budgets = ablation_budgets(cfg, name)
    rows, curves = [], []
    replicas: list[dict] = []
    for label, rname in abl.variants:
        cols = []
        for member in b.row_runs(rname):  # the variant's training replicas (`seeds`), or itself
            run = b.runs[member]
            d = run_dir(results_dir, cfg.benchmark, run.method, member)
            train = read_train_info(d)
            curve = read_convergence(d, last_step=_iters(train))
            fid_name = fid_key((k for r in curve for k in r), "fid")
            col = {f"best_{fid_name}@{bud}": best_within(curve, bud) for bud in budgets}
            col["iters"] = train.get("iters") if train is not None else None
            for metric in b.eval.metrics:
                f = d / "metrics" / f"{metric}.json"
                rec = read_metric(f, metric)
                check_protocol(rec, f, b)
                col[f"final_{metric}"] = rec["value"]
            cols.append(col)
            curves += [{"ablation": name, "variant": label, "run": member, **rec} for rec in curve]
        row = {"ablation": name, "variant": label, "run": rname}
        if rname in b.replicas:
            measured = [k for k in cols[0] if k != "iters"]
            row.update(_aggregate(cols, measured))
            replicas += [{"ablation": name, "variant": label, "replica": m, **c}
                         for m, c in zip(b.row_runs(rname), cols)]
        else:
            row.update(cols[0])
        row["_values"] = cols
        rows.append(row)
    base_row = next((r for r in rows if r["run"] == abl.base), None)
    for key in (ablation_compare_keys(b, abl) if base_row is not None else []):
        ref = [c[key] for c in base_row["_values"] if c.get(key) is not None]
        for r in rows:
            r[f"vs_base_{key}"] = "base" if r is base_row else welch_verdict(
                [c[key] for c in r["_values"] if c.get(key) is not None], ref)
    for r in rows:
        del r["_values"]
    df = pd.DataFrame(rows)
    seeds = sorted({len(b.row_runs(r)) for _, r in abl.variants})
    conv_n = b.eval.convergence_samples
    note = (f"Ablation `{name}` ({abl.title or abl.key}), benchmark `{cfg.benchmark}`, base run `{abl.base}`, "
            f"varying `{abl.key}`. Measured by this suite. `best_<fid>@N`: the lowest FID of the run's "
            f"convergence record ({conv_n} samples, every train.eval_every iterations) no later than N iterations, "
            f"as the paper reports its ablations; `final_*`: the final generator on eval.num_samples "
            f"= {b.eval.num_samples} samples. " + (
                "One training seed per variant." if seeds == [1] else
                f"Mean over {'/'.join(map(str, seeds))} training seeds per variant, `*_ci95`: half-width of the "
                "95% Student-t interval of the mean; per-replica values in `_replicas.csv`."))
    if base_row is not None and seeds != [1]:
        note += (f" `vs_base_<column>`: Welch's two-sided t-test of the variant's replica values against the base "
                 f"run's (`{abl.base}`) at the 5% level (lower / higher / n.s., with the p-value).")
    _write_csv_md(df, out, note)
    write_replicas(replicas, out, ["ablation", "variant", "replica"])
    if curves_out:
        write_csv(pd.DataFrame(curves), curves_out)
    return df


def _file_entry(path: Path) -> dict:
    """{path, sha256, bytes} of a file; of a folder (a diffusers pipeline) the sha256 of its
    files' relative paths and hashes, in order; of a dataset store (`tfd.datastore`) its recorded
    identity, count and source zip (its arrays were hashed when it was built; they are not read
    again); {path, exists: False} when there is nothing."""
    if path.is_dir() and (path / "store.json").is_file():
        from tfd.datastore import open_store
        meta = open_store(path).meta
        return {"path": str(path), "sha256": meta["sha256"], "count": meta["count"], "source": meta["source"],
                "arrays": {k: {f: v[f] for f in ("shape", "dtype", "sha256")} for k, v in meta["arrays"].items()}}
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        return {"path": str(path), "sha256": path_sha256(path), "files": len(files),
                "bytes": sum(f.stat().st_size for f in files)}
    if not path.is_file():
        return {"path": str(path), "exists": False}
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _made_by(prov: dict | None, keys=("git_commit", "versions", "host", "time")) -> dict | None:
    """The part of a record's provenance (`eval.io.provenance`) that says what made it: `keys` that
    it has, with the compute environment (`versions.compute`: CPU capability and model, thread
    counts, determinism flags, GPUs and CUDA / cuDNN versions) lifted out of `versions` as
    `compute` (None for records made before it was recorded). None for no provenance."""
    if not prov:
        return None
    out = {k: prov.get(k) for k in keys if k in prov}
    versions = dict(out.get("versions") or {})
    out["compute"] = versions.pop("compute", None)
    if "versions" in out:
        out["versions"] = versions
    return out


def _teacher_made_by(path: Path) -> dict | None:
    """`_made_by` of the teacher at `path`: the record `tfd train-teacher` writes beside the weights
    (`teacher.json` for `teacher.safetensors`), or `tfd train-t2i-teacher` beside the pipeline
    folder (`<folder>.json`); None when there is none (a converted or downloaded teacher)."""
    info = path.with_name(path.name + ".json") if path.is_dir() else path.with_suffix(".json")
    if not info.is_file():
        return None
    return _made_by(read_json(info))


def _samples_made_by(path: Path) -> dict | None:
    """`_made_by` of a sample file: its `provenance` member (a 0-d JSON string, as reference
    statistics store theirs) when the npz has one, else None (`tfd sample` does not write one:
    a sample file records its seeds, not the machine)."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "provenance" not in z.files:
                return None
            return _made_by(json.loads(str(z["provenance"])))
    except (OSError, ValueError):  # unreadable: the table's own readers name it
        return None


def write_manifest(cfg: Config, results_dir, runs: list[str], out, *, table: str, config_file=None,
                   extra_files: dict | None = None) -> dict:
    """Provenance of a table (`<table>.manifest.json`): for every row's run its config block, seeds,
    the files it was computed from (sha256) and, per job that made them (`made_by`: `train`,
    `sample`, `metrics` = the scoring), the git commit, package versions and compute environment
    (`compute`: CPU capability and model, thread counts, determinism flags, GPUs, CUDA / cuDNN
    versions; what decides whether a rerun is byte-identical, see README "What reproduces") each
    of them recorded; the inputs (sha256; the teacher with its own `made_by`); plus the config
    file, the commit, package versions and compute environment now (`written_by`). A job whose
    files record none has `made_by[job]` None or absent."""
    from dataclasses import asdict

    b = cfg.bench()
    entries = {}
    for rname in runs:
        run = b.runs[rname]
        if run.reported:  # nothing was computed: the config block (label, paper numbers) only
            entries[rname] = {"method": run.method, "label": run.label, "status": REPORTED_STATUS,
                              "config": asdict(run)}
            continue
        d = run_dir(results_dir, cfg.benchmark, run.method, rname)
        files = {"samples": _file_entry(d / "samples.npz")}
        made_by = {}
        if run.method not in ("heun", "onestep"):
            files.update(generator=_file_entry(d / "generator.safetensors"), train=_file_entry(d / "train.json"),
                         checkpoint=_file_entry(d / "ckpt" / "training-state.pt"),
                         convergence=_file_entry(d / "convergence.jsonl"), stats=_file_entry(d / "stats.jsonl"))
            t = read_train_info(d)
            if t is not None:
                made_by["train"] = _made_by(t)
        made_by["sample"] = _samples_made_by(d / "samples.npz")
        metrics = {}
        for metric in b.eval.metrics:
            f = d / "metrics" / f"{metric}.json"
            metrics[metric] = _file_entry(f)
            if f.is_file():
                m = read_metric(f, metric)
                metrics[metric]["value"] = m.get("value")
                p = m.get("provenance", {})
                made_by.setdefault("metrics", _made_by(p, ("git_commit", "versions")))
        train_seed = run.train.seed if run.trains else None
        entries[rname] = {"method": run.method, "label": run.label, "dir": str(d), "config": asdict(run),
                          "seeds": {"train": train_seed, "eval_base_seed": b.eval.base_seed,
                                    "eval_num_samples": b.eval.num_samples,
                                    "rule": "image i: seed eval_base_seed + i, condition conditions[i % len]"},
                          "files": files, "metrics": metrics, "made_by": made_by}
    inputs = {k: _file_entry(Path(v)) for k, v in (extra_files or {}).items()}
    if "teacher" in inputs:
        inputs["teacher"]["made_by"] = _teacher_made_by(Path(extra_files["teacher"]))
    manifest = {"table": str(table), "benchmark": cfg.benchmark, "rows": list(runs),
                "config_file": _file_entry(Path(config_file)) if config_file else None,
                "teacher": asdict(b.teacher), "eval": asdict(b.eval), "inputs": inputs,
                "written_by": provenance(), "runs": entries}
    atomic_write_json(out, manifest)
    return manifest
