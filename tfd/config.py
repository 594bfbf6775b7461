"""Typed configuration: `config.yaml` -> dataclasses, with unknown keys and wrong types as errors.

The same file is validated by Snakemake against `workflow/schemas/config.schema.yaml`; this module
is what the `tfd` CLI uses, so a misspelt key fails before any work, naming the key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Rows that need no training: the teacher's Heun sampler and the teacher run once at sigma_max.
SAMPLER_METHODS = ("heun", "onestep")


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Generic dataclass loading.

def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from `data`, recursing into nested dataclasses, lists and dicts."""
    return _convert(cls, data, where or cls.__name__)


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        renamed = getattr(tp, "RENAMED_KEYS", {})  # old key -> new key: say so instead of "unknown"
        for old in (k for k in unknown if k in renamed):
            raise ConfigError(f"{where}.{old} was renamed to {where}.{renamed[old]}")
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(names))})")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            if f.name in value:
                kwargs[f.name] = _convert(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {f.name!r}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# ----------------------------------------------------------------------------------------------
# The schema of config.yaml.

@dataclass
class DataCfg:
    kind: typing.Literal["digits", "edm_zip"] = "digits"
    path: Optional[str] = None            # edm_zip: EDM dataset zip (dataset.json labels + PNGs)


@dataclass
class TeacherTrainCfg:
    """Training of the embedded teacher with the EDM loss (`tfd train-teacher`)."""
    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_halflife_steps: float = 300.0
    seed: int = 0
    log_every: int = 100


@dataclass
class TeacherCfg:
    kind: typing.Literal["train", "edm"] = "train"
    arch: str = "digits"                   # preset for kind=train ("digits")
    arch_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None       # kind=edm: safetensors from `tfd convert-edm`
    train: TeacherTrainCfg = field(default_factory=TeacherTrainCfg)


@dataclass
class EvalCfg:
    RENAMED_KEYS: typing.ClassVar[dict[str, str]] = {"feature_net": "feature_extractor"}
    num_samples: int = 1000
    base_seed: int = 0
    batch_size: int = 250
    shards: int = 1
    feature_extractor: typing.Literal["digits", "inception"] = "digits"   # the FID feature network's kind
    metrics: list[str] = field(default_factory=lambda: ["fid_digits", "precision_digits", "recall_digits", "max_ssim",
                                                        "class_acc"])   # names from eval.metrics.METRICS
    ref_stats: Optional[str] = None                      # None: computed by the DAG from the data
    feature_extractor_weights_path: Optional[str] = None  # its weights (inception: torch-fidelity's file)
    fid_thresholds: list[float] = field(default_factory=list)  # table: iterations to reach each FID (Fig. 2)
    convergence_samples: int = 500                       # samples per point of a convergence record (train.eval_every)


@dataclass
class TrainCfg:
    """The shared trainer's settings (`runs.<run>.train`; `tfd.trainer.Trainer`)."""
    steps: int = 1000                     # training iterations (each calls train_step once)
    lr: float = 1e-4
    lr_by_network: dict[str, float] = field(default_factory=dict)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 100               # linear warm-up, then constant (paper Table 3)
    grad_clip: float = 10.0               # max global grad norm per network; 0 disables
    precision: typing.Literal["fp32", "bf16", "fp16"] = "fp32"
    ema_halflife_steps: float = 0.0       # EMA of the generator; 0 disables (exports the online weights)
    checkpoint_every: int = 200           # iterations between checkpoints
    log_every: int = 20                   # iterations between stats.jsonl records
    eval_every: int = 0                   # convergence record: every K iterations (0: off)
    seed: int = 0


@dataclass
class RunCfg:
    """One row of the table: a teacher sampler (`method: heun` / `onestep`) or a distillation run.

    Typed once, when the config is loaded (`resolve`): `train` becomes a `TrainCfg`, `params` the
    method's own `Params` dataclass, `sampler` a `tfd.sampling.HeunCfg` (heun rows); the blocks a
    row does not use are None. Every default lives in those dataclasses only."""
    method: str
    nfe: Optional[int] = None
    sampler: Any = None                   # heun: steps, S_churn, ... (tfd.sampling.HeunCfg)
    train: Any = None                     # overrides of TrainCfg (training runs)
    params: Any = None                    # method hyperparameters (the method's Params dataclass)
    label: Optional[str] = None                              # row label in the tables
    paper: dict[str, float] = field(default_factory=dict)   # the paper's reported numbers (shown as paper_*)

    def resolve(self, where: str) -> "RunCfg":
        """Type the `sampler` / `train` / `params` blocks in place; ConfigError naming `where.<block>`."""
        from tfd.methods import METHODS  # late import: the methods import torch
        from tfd.sampling import HeunCfg

        def block(name, cls, used: bool):
            value = getattr(self, name)
            if not used:
                if value not in (None, {}):
                    raise ConfigError(f"{where}.{name}: a {self.method!r} row takes no {name} settings")
                return None
            if value is None or isinstance(value, dict):
                return from_dict(cls, value or {}, f"{where}.{name}")
            if not isinstance(value, cls):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            return value

        if self.method in SAMPLER_METHODS:
            params_cls = None
        elif self.method in METHODS:
            params_cls = METHODS[self.method].Params
        else:
            raise ConfigError(f"{where}.method: unknown method {self.method!r} "
                              f"(known: {', '.join(sorted(SAMPLER_METHODS) + sorted(METHODS))})")
        problems, typed = [], {}
        trains = params_cls is not None
        for name, cls, used in (("sampler", HeunCfg, self.method == "heun"), ("train", TrainCfg, trains),
                                ("params", params_cls, trains)):
            try:
                typed[name] = block(name, cls, used)
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("\n  - ".join(problems))
        self.sampler, self.train, self.params = typed["sampler"], typed["train"], typed["params"]
        return self

    @property
    def trains(self) -> bool:
        """True for a distillation run (it has a trainer and a generator), False for a sampler row."""
        return self.method not in SAMPLER_METHODS


@dataclass
class DiversityCfg:
    """Sample-diversity figure of an ablation (the paper's Figure 3): for each class, the first
    `per_class` samples of every variant, titled with their max pairwise SSIM."""
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    per_class: int = 8


@dataclass
class AblationCfg:
    """A sweep over one setting of a run (the TFD paper's Tables 4-7 and Figure 4). The DAG trains
    one run per value and renders `results/ablation_<name>.csv` (best FID no later than each update
    budget, from the runs' convergence records, as the paper reports) and a figure of the curves.
    A variant whose settings equal an existing run's (e.g. the base value) reuses that run."""
    base: str                                                  # the run whose block is varied
    key: str                                                   # params.<name> or train.<name>
    values: list[Any]
    labels: list[str] = field(default_factory=list)            # one per value (default: the value)
    budgets: list[int] = field(default_factory=list)           # budgets in iterations (default: the runs' steps)
    overrides: dict[str, Any] = field(default_factory=dict)    # {train: {...}, params: {...}} for every variant
    title: Optional[str] = None
    diversity: Optional[DiversityCfg] = None
    # [(label, run name)] per value, filled in by the expansion (not a config key)
    variants: list[tuple[str, str]] = field(default_factory=list, init=False)


def _value_label(v) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def _run_key(run: "RunCfg") -> str:
    """What makes two runs the same training run (not their label or paper numbers)."""
    import json
    d = dataclasses.asdict(run)
    d.pop("label"), d.pop("paper")
    return json.dumps(d, sort_keys=True, default=str)


def expand_ablation(runs: dict[str, "RunCfg"], name: str, abl: AblationCfg) -> list[tuple[str, str]]:
    """Add one run per value of the sweep to `runs` (named `<ablation>__<value>`), reusing any
    run with the same settings; -> [(label, run name)]."""
    w = f"ablations.{name}"
    if abl.base not in runs:
        raise ValueError(f"{w}.base: run {abl.base!r} is not defined in runs")
    base = runs[abl.base]
    if base.method in SAMPLER_METHODS:
        raise ValueError(f"{w}.base: {abl.base!r} is a sampler row ({base.method}), not a training run")
    section, _, leaf = abl.key.partition(".")
    if section not in ("params", "train") or not leaf or "." in leaf:
        raise ValueError(f"{w}.key: {abl.key!r} must be params.<name> or train.<name>")
    if abl.labels and len(abl.labels) != len(abl.values):
        raise ValueError(f"{w}.labels: {len(abl.labels)} labels for {len(abl.values)} values")
    if not abl.values:
        raise ValueError(f"{w}.values: empty")
    unknown = sorted(set(abl.overrides) - {"train", "params"})
    if unknown:
        raise ValueError(f"{w}.overrides: unknown key {unknown[0]!r} (valid keys: params, train)")
    by_key = {_run_key(r): n for n, r in runs.items()}
    out = []
    for i, value in enumerate(abl.values):
        label = abl.labels[i] if abl.labels else _value_label(value)
        block = deep_update(dataclasses.asdict(base), abl.overrides)
        block[section] = {**block[section], leaf: value}
        block.update(label=f"{abl.title or name}: {label}", paper={})
        run = from_dict(RunCfg, block, f"{w}.values[{i}]").resolve(f"{w}.values[{i}]")
        rname = by_key.get(_run_key(run))
        if rname is None:
            stem = f"{name}__" + (re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") or str(i))
            rname = stem if stem not in runs else f"{stem}_{i}"
            runs[rname] = run
            by_key[_run_key(run)] = rname
        out.append((label, rname))
    return out


@dataclass
class BenchmarkCfg:
    data: DataCfg = field(default_factory=DataCfg)
    num_classes: int = 10
    resolution: int = 8
    channels: int = 1
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    runs: dict[str, RunCfg] = field(default_factory=dict)
    table1: list[str] = field(default_factory=list)         # run names, in table order
    ablations: dict[str, AblationCfg] = field(default_factory=dict)   # sweeps -> ablation tables

    def __post_init__(self):
        problems = []
        for name, run in self.runs.items():  # typed blocks, resolved once; every problem listed
            try:
                run.resolve(f"runs.{name}")
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else "\n  - " + "\n  - ".join(problems))
        for name, abl in self.ablations.items():  # adds the sweeps' runs to `runs`
            abl.variants = expand_ablation(self.runs, name, abl)


@dataclass
class Config:
    benchmark: str = "digits"
    benchmarks: dict[str, BenchmarkCfg] = field(default_factory=dict)

    def bench(self, name: Optional[str] = None) -> BenchmarkCfg:
        name = name or self.benchmark
        if name not in self.benchmarks:
            raise ConfigError(f"benchmark: {name!r} is not defined (defined: {sorted(self.benchmarks)})")
        return self.benchmarks[name]


def check(cfg: Config) -> Config:
    """Cross-field checks that a schema cannot express, for the active benchmark; every problem
    is listed in one ConfigError (e.g. all the paths a paper-protocol user still has to fill in)."""
    name = cfg.benchmark
    b = cfg.bench(name)
    w = f"benchmarks.{name}"
    problems = []
    if b.teacher.kind == "edm" and not b.teacher.checkpoint:
        problems.append(f"{w}.teacher.checkpoint: required for teacher.kind 'edm' (edm-imagenet-64x64-cond-adm.pkl, "
                        "or the safetensors `tfd convert-edm` makes from it)")
    if b.data.kind == "edm_zip" and not b.data.path:
        problems.append(f"{w}.data.path: required for data.kind 'edm_zip' "
                        "(EDM dataset zip made by EDM's dataset_tool.py)")
    if b.eval.feature_extractor == "inception" and not b.eval.feature_extractor_weights_path:
        problems.append(f"{w}.eval.feature_extractor_weights_path: required for feature_extractor 'inception' "
                        "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    from eval.metrics import check_metric_names  # the metric registry: unknown or inapplicable names
    problems += [f"{w}.eval.metrics: {p}" for p in check_metric_names(b.eval.metrics, b.eval.feature_extractor)]
    for r in b.table1:
        if r not in b.runs:
            problems.append(f"{w}.table1: run {r!r} is not defined in {w}.runs")
    for aname, abl in b.ablations.items():
        for bud in abl.budgets:
            if bud < 0:
                problems.append(f"{w}.ablations.{aname}.budgets: {bud} is negative")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(path: str | Path | list = "config.yaml", overrides: Optional[dict] = None) -> Config:
    """Load, type and check a config. `path` may be a list: later files are merged key by key over
    earlier ones (lists replaced), as `snakemake --configfile` merges an overlay such as
    `.test/config.yaml` over `config.yaml`. ConfigError names a missing file or a bad key."""
    data: dict = {}
    for p in ([path] if isinstance(path, (str, Path)) else list(path)):
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = deep_update(data, yaml.safe_load(p.read_text()) or {})
    if overrides:
        data = deep_update(data, overrides)
    return check(from_dict(Config, data, "config"))


def deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
