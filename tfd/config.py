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

from eval.errors import UserError

# Rows that need no training: the teacher's Heun sampler, the teacher run once at sigma_max, a
# diffusers pipeline with its own scheduler (text-to-image teacher and published checkpoints), and
# `reported`: a method the suite does not retrain, shown with the paper's numbers only (never trained,
# sampled or scored; only `label`, `nfe` and `paper`).
REPORTED = "reported"
SAMPLER_METHODS = ("heun", "onestep", "pipeline", REPORTED)
REPORTED_STATUS = "reported by the paper, not run"


class ConfigError(UserError):
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
    if tp in (dict, list):  # bare `dict` / `list` annotations: any keys and values
        tp = dict[str, Any] if tp is dict else list[Any]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
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


def params_spec(params) -> dict:
    """`asdict(params)` of a method's Params, without each key its class lists in `NEW_DEFAULTS`
    (options added after runs were made, with the value that keeps the old behaviour) while it holds
    that value. The run specs of the DAG and the trainer's resume check use it, so adding an option
    neither reruns existing runs nor sets their checkpoints aside as stale."""
    d = dataclasses.asdict(params)
    for key, value in getattr(type(params), "NEW_DEFAULTS", {}).items():
        if key in d and d[key] == value:
            del d[key]
    return d


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# ----------------------------------------------------------------------------------------------
# The schema of config.yaml.

@dataclass
class DataCfg:
    """The real data. Class-conditional: `digits` (sklearn, embedded), `shapes` (embedded, generated:
    8x8 RGB shapes whose modes a rule reads, `eval.modes`) or `edm_zip` (EDM's dataset zip at `path`).
    Text-to-image: `digits_text` (embedded: digits with measured-attribute captions,
    written by the DAG in COCO format) or `coco` (`captions_json` = COCO-2014's
    captions_val2014.json, `images_dir` = its val2014/ folder)."""
    kind: typing.Literal["digits", "shapes", "edm_zip", "digits_text", "coco"] = "digits"
    path: Optional[str] = None            # edm_zip: EDM dataset zip (dataset.json labels + PNGs)
    captions_json: Optional[str] = None   # coco: captions_val2014.json (COCO captions format)
    images_dir: Optional[str] = None      # coco: the val2014/ image folder (the FID reference images)


@dataclass
class PromptsCfg:
    """The evaluation prompt table of a text-to-image benchmark (`results/<bench>/prompts.jsonl`):
    built once by rule `prompts` with pycocotools from the captions json (`num_prompts` images
    drawn with `seed`, one caption each), or `file` taken as given (DMD2's `all_prompts.pkl`, a
    `.txt` with one caption per line, or our `.jsonl`). Sample i gets prompt row i % num_prompts."""
    num_prompts: int = 10000
    seed: int = 0
    file: Optional[str] = None


@dataclass
class PositivesCfg:
    """Teacher positive generation of a text-to-image benchmark (TFD paper Sec. 4.2, Table 3): for
    every training prompt, `n_pos` positives (latents): prompt-matched real images of the paired
    image set when at least `n_pos` exist; otherwise all matched real images topped up with
    teacher samples; with none, all from the teacher (`steps` denoising steps of the teacher's own
    diffusers pipeline with classifier-free guidance `guidance`; seed per prompt and slot, from
    `seed`). Built once per distinct setting by rules `train_prompts`, `latents`, `positives_shard`
    (`shards` jobs) and `merge_positives` under `results/<bench>/positives/<key>/`, and shared by
    every run and sweep with the same settings (`tfd.positives`).

    Training prompts: `prompts_file` (a LAION-style prompt list: `.txt`, `.pkl` or a prompt-table
    `.jsonl`), else `num_prompts` distinct captions drawn with `prompts_seed` from the benchmark's
    captions (`data`). Paired image set: a COCO-format captions file + image folder
    (`paired_captions_json`, `paired_images_dir`; default: the embedded `digits_text` data; on
    `coco` none, so all positives come from the teacher: the COCO-2014 val images are the
    evaluation reference and never training data), of which a `paired_fraction` of the images
    (drawn with `prompts_seed`) is kept; a prompt matches an image when one of its captions is the
    same text up to case, whitespace and a final period."""
    n_pos: int = 4
    steps: int = 50
    guidance: float = 6.0
    scheduler: Optional[str] = None       # diffusers scheduler class (None: the teacher folder's own)
    seed: int = 0
    shards: int = 1
    num_prompts: int = 10000
    prompts_seed: int = 0
    prompts_file: Optional[str] = None
    paired_captions_json: Optional[str] = None
    paired_images_dir: Optional[str] = None
    paired_fraction: float = 1.0

    def __post_init__(self):
        for key in ("n_pos", "steps", "shards", "num_prompts"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.paired_fraction <= 1.0:
            raise UserError(f"paired_fraction must be in [0, 1], got {self.paired_fraction}")


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
class VaeTrainCfg:
    """Training of the embedded text-to-image benchmark's tiny `AutoencoderKL` (`tfd train-vae`)."""
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-4
    seed: int = 0
    arch_overrides: dict[str, Any] = field(default_factory=dict)   # over tfd.t2i_tiny.tiny_vae_config()


@dataclass
class TeacherCfg:
    """The teacher. `train`: the embedded EDM teacher trained by the DAG; `edm`: EDM's checkpoint
    (`checkpoint`: its .pkl or the safetensors of `tfd convert-edm`); `diffusers`: a local
    StableDiffusionXLPipeline folder (`checkpoint`: the folder, e.g. SDXL base 1.0), wrapped as an
    EDM-style denoiser (`tfd.diffusers_denoiser`); `train_t2i`: the embedded text-to-image teacher
    (a tiny SDXL-topology UNet in a tiny VAE's latent space) trained by the DAG."""
    kind: typing.Literal["train", "edm", "diffusers", "train_t2i"] = "train"
    arch: str = "digits"                   # preset for kind=train ("digits")
    arch_overrides: dict[str, Any] = field(default_factory=dict)   # train: EDM arch; train_t2i: UNet config
    checkpoint: Optional[str] = None       # edm: safetensors / .pkl; diffusers: the pipeline folder
    precision: typing.Literal["fp32", "bf16"] = "fp32"   # diffusers/train_t2i: the frozen UNet's weights
    caption_dropout: float = 0.1           # train_t2i: share of captions replaced by the zero embedding (CFG)
    train: TeacherTrainCfg = field(default_factory=TeacherTrainCfg)
    vae: VaeTrainCfg = field(default_factory=VaeTrainCfg)           # train_t2i only


@dataclass
class ClipTrainCfg:
    """The tiny open_clip model of an embedded text benchmark's clip_score (`tfd train-clip`,
    `eval.tiny_clip.train_tiny_clip`)."""
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass
class EvalCfg:
    RENAMED_KEYS: typing.ClassVar[dict[str, str]] = {"feature_net": "feature_extractor"}
    num_samples: int = 1000
    base_seed: int = 0
    batch_size: int = 250
    shards: int = 1
    score_batch_size: Optional[int] = None               # images per feature-network call (None: the extractor's)
    feature_extractor: typing.Literal["digits", "shapes", "inception", "clean-fid", "dinov2",
                                      "cmmd_clip"] = "digits"   # the FID feature network (eval.features)
    metrics: list[str] = field(default_factory=lambda: ["fid_digits", "precision_digits", "recall_digits", "max_ssim",
                                                        "class_acc"])   # names from eval.metrics.METRICS
    ref_stats: Optional[str] = None                      # None: computed by the DAG from the data
    feature_extractor_weights_path: Optional[str] = None  # its weights (inception: torch-fidelity's file)
    fid_thresholds: list[float] = field(default_factory=list)  # table: iterations to reach each FID (Fig. 2)
    convergence_samples: int = 500                       # samples per point of a convergence record (train.eval_every)
    bootstrap: int = 100                                 # FID's interval over the sample images: resamples (0: none)
    diversity_per_condition: int = 0                     # diversity_* metrics (DP-DMD): first R samples of each
                                                         # condition in seed order (0: all; DP-DMD uses R = 9)
    # text-to-image (DMD2's COCO protocol): generated and real images centre-cropped and LANCZOS-resized
    # to `resolution` before FID (None: as generated); CLIP score with open_clip from a local checkpoint
    resolution: Optional[int] = None
    clip_model: str = "ViT-g-14"
    clip_checkpoint: Optional[str] = None                # None on an embedded benchmark: the DAG trains one
    clip_model_config: Optional[str] = None              # open_clip model-config JSON of a custom architecture
    clip_resize: int = 256
    clip_train: ClipTrainCfg = field(default_factory=ClipTrainCfg)   # embedded benchmark: its tiny CLIP
    # cluster metrics (not on the digits benchmarks): local transformers checkpoint folders
    dinov2_checkpoint: Optional[str] = None     # extractor dinov2 -> fd_dinov2 (facebook/dinov2-large)
    cmmd_clip_checkpoint: Optional[str] = None  # extractor cmmd_clip -> cmmd (openai/clip-vit-large-patch14-336)

    # the config key holding each extractor's weights (the others: feature_extractor_weights_path)
    WEIGHTS_KEYS: typing.ClassVar[dict[str, str]] = {"dinov2": "dinov2_checkpoint", "cmmd_clip": "cmmd_clip_checkpoint"}

    @property
    def weights_key(self) -> str:
        """The `eval.*` key naming the configured feature extractor's weights (a file or a folder)."""
        return self.WEIGHTS_KEYS.get(self.feature_extractor, "feature_extractor_weights_path")

    @property
    def extractor_weights(self) -> Optional[str]:
        """The configured feature extractor's weights path (`weights_key`), None when not set."""
        return getattr(self, self.weights_key)


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
    gradient_checkpointing: bool = False  # recompute the trainable networks' activations in backward
                                          # (diffusers UNets: enable_gradient_checkpointing; SDXL scale)
    # options added after runs were made: at these values they leave run specs and checkpoints as they
    # were (`params_spec(train)`); both only say how the ranks share the work, not what is computed
    NEW_DEFAULTS: typing.ClassVar[dict] = {"bucket_cap_mb": 25.0, "shard": "none"}
    bucket_cap_mb: float = 25.0           # gradient all-reduce bucket size (MB, DDP's default) under torchrun
    shard: typing.Literal["none", "fsdp"] = "none"   # fsdp: FSDP2 `fully_shard` of the trainable networks

    def __post_init__(self):
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"train.bucket_cap_mb must be > 0 (MB), got {self.bucket_cap_mb}")


@dataclass
class RunCfg:
    """One row of the table: a teacher sampler (`method: heun` / `onestep` / `pipeline`) or a
    distillation run.

    Typed once, when the config is loaded (`resolve`): `train` becomes a `TrainCfg`, `params` the
    method's own `Params` dataclass, `sampler` a `tfd.sampling.HeunCfg` (heun rows) or a
    `tfd.pipeline_sampler.PipelineCfg` (pipeline rows: diffusers' own pipeline); the blocks a
    row does not use are None. Every default lives in those dataclasses only."""
    method: str
    nfe: Optional[int] = None
    sampler: Any = None                   # heun: HeunCfg (steps, S_churn, ...); pipeline: PipelineCfg
    train: Any = None                     # overrides of TrainCfg (training runs)
    params: Any = None                    # method hyperparameters (the method's Params dataclass)
    label: Optional[str] = None                              # row label in the tables
    paper: dict[str, float] = field(default_factory=dict)   # the paper's reported numbers (shown as paper_*)
    positives: dict[str, Any] = field(default_factory=dict)  # text runs: overrides of the benchmark's positives
    seeds: Optional[list[int]] = None     # training replicas `<run>@s<k>` (train.seed = k); tables: mean and 95% CI
    addons: Any = None                    # training runs: generator-loss add-ons (tfd.addons.AddonsCfg: el_style)

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
        if self.method == REPORTED:  # the paper's numbers only: nothing to train, sample or score
            problems += [f"{where}.{k}: a 'reported' row (the paper's numbers, not run) takes no {k} "
                         "(only label, nfe and paper)"
                         for k in ("seeds", "train", "params", "sampler", "addons", "positives")
                         if getattr(self, k) not in (None, {}, [])]
            if not self.paper:
                problems.append(f"{where}.paper: a 'reported' row needs the paper's numbers (e.g. paper: {{fid: ...}})")
            if problems:
                raise ConfigError("\n  - ".join(problems))
        if self.method == "pipeline":
            from tfd.pipeline_sampler import PipelineCfg as sampler_cls
        else:
            sampler_cls = HeunCfg
        for name, cls, used in (("sampler", sampler_cls, self.method in ("heun", "pipeline")),
                                ("train", TrainCfg, trains), ("params", params_cls, trains)):
            try:
                typed[name] = block(name, cls, used)
            except ConfigError as e:
                problems.append(str(e))
        if self.addons in (None, {}):
            self.addons = None
        elif not trains:
            problems.append(f"{where}.addons: a {self.method!r} row takes no addons (only training runs)")
        elif isinstance(self.addons, dict):
            from tfd.addons import AddonsCfg
            try:
                self.addons = from_dict(AddonsCfg, self.addons, f"{where}.addons")
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("\n  - ".join(problems))
        self.sampler, self.train, self.params = typed["sampler"], typed["train"], typed["params"]
        return self

    @property
    def missing_weights(self) -> bool:
        """A published-checkpoint pipeline row (`sampler.published`) whose weights are not given
        (`sampler.pipeline` and `sampler.unet` unset): Table 2 shows its paper numbers only."""
        s = self.sampler
        return self.method == "pipeline" and bool(getattr(s, "published", False)) and not (s.pipeline or s.unet)

    @property
    def reported(self) -> bool:
        """A row of the paper's numbers only (`method: reported`): never trained, sampled or scored."""
        return self.method == REPORTED

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
    seeds: Optional[list[int]] = None                          # training replicas of each variant (default: base's)
    compare: list[str] = field(default_factory=list)           # metrics also tested against the base run
    in_all: bool = True                                        # built by `snakemake all`; false: by `extended`
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
        raise UserError(f"{w}.base: run {abl.base!r} is not defined in runs")
    base = runs[abl.base]
    if base.method in SAMPLER_METHODS:
        raise UserError(f"{w}.base: {abl.base!r} is a sampler row ({base.method}), not a training run")
    section, _, leaf = abl.key.partition(".")
    if section not in ("params", "train") or not leaf or "." in leaf:
        raise UserError(f"{w}.key: {abl.key!r} must be params.<name> or train.<name>")
    if abl.labels and len(abl.labels) != len(abl.values):
        raise UserError(f"{w}.labels: {len(abl.labels)} labels for {len(abl.values)} values")
    if not abl.values:
        raise UserError(f"{w}.values: empty")
    unknown = sorted(set(abl.overrides) - {"train", "params"})
    if unknown:
        raise UserError(f"{w}.overrides: unknown key {unknown[0]!r} (valid keys: params, train)")
    by_key = {_run_key(r): n for n, r in runs.items()}
    out = []
    for i, value in enumerate(abl.values):
        label = abl.labels[i] if abl.labels else _value_label(value)
        block = deep_update(dataclasses.asdict(base), abl.overrides)
        block[section] = {**block[section], leaf: value}
        block.update(label=f"{abl.title or name}: {label}", paper={})
        if abl.seeds is not None:
            block["seeds"] = list(abl.seeds)
        run = from_dict(RunCfg, block, f"{w}.values[{i}]").resolve(f"{w}.values[{i}]")
        rname = by_key.get(_run_key(run))
        if rname is None:
            stem = f"{name}__" + (re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") or str(i))
            rname = stem if stem not in runs else f"{stem}_{i}"
            runs[rname] = run
            by_key[_run_key(run)] = rname
        out.append((label, rname))
    return out


def replica_name(run: str, seed: int) -> str:
    """The name of training replica `seed` of `run`: `<run>@s<seed>`."""
    return f"{run}@s{seed}"


def expand_replicas(runs: dict[str, "RunCfg"]) -> dict[str, list[str]]:
    """Add one run per seed of every training run with `seeds` to `runs` (`<run>@s<k>`: the same
    block with `train.seed = k` and no `seeds`); -> {run: [replica names]}. Sampling seeds stay
    per image (`eval.base_seed + i`): replicas differ only in their training randomness."""
    out = {}
    for name, run in list(runs.items()):
        if not run.seeds:
            continue
        if not run.trains:
            raise ConfigError(f"runs.{name}.seeds: {name!r} is a sampler row ({run.method}); only training runs "
                              "have training seeds")
        if len(set(run.seeds)) != len(run.seeds):
            raise ConfigError(f"runs.{name}.seeds: {run.seeds} repeats a seed")
        out[name] = []
        for k in run.seeds:
            rname = replica_name(name, int(k))
            runs[rname] = dataclasses.replace(run, seeds=None, train=dataclasses.replace(run.train, seed=int(k)))
            out[name].append(rname)
    return out


@dataclass
class BenchmarkCfg:
    """One benchmark: `task` class (class-conditional, Table 1) or text (text-to-image, Table 2)."""
    task: typing.Literal["class", "text"] = "class"
    data: DataCfg = field(default_factory=DataCfg)
    prompts: PromptsCfg = field(default_factory=PromptsCfg)
    positives: PositivesCfg = field(default_factory=PositivesCfg)   # text: TFD/DMD2 training positives
    num_classes: int = 10
    resolution: int = 8
    channels: int = 1
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    runs: dict[str, RunCfg] = field(default_factory=dict)
    table1: list[str] = field(default_factory=list)         # run names, in table order
    table2: list[str] = field(default_factory=list)         # text benchmarks: Table 2's rows
    # class benchmarks: rows of results/table_methods.csv, built by `snakemake methods` (not by `all`: the
    # default DAG's time budget); every method beside its parent
    table_methods: list[str] = field(default_factory=list)
    ablations: dict[str, AblationCfg] = field(default_factory=dict)   # sweeps -> ablation tables
    compare_to: Optional[str] = None    # tables: each row tested against this row (Welch's t-test over seeds)
    # run -> its training replicas `<run>@s<k>` (runs with `seeds`), filled in by the expansion (not a config key)
    replicas: dict[str, list[str]] = field(default_factory=dict, init=False)

    def row_runs(self, name: str) -> list[str]:
        """The runs a table row `name` is made of: its training replicas (`seeds`), or itself."""
        return self.replicas.get(name, [name])

    def positives_for(self, run_name: str) -> PositivesCfg:
        """The positives settings of a run: the benchmark's block with the run's `positives` overrides."""
        run = self.runs[run_name]
        if not run.positives:
            return self.positives
        return from_dict(PositivesCfg, deep_update(dataclasses.asdict(self.positives), run.positives),
                         f"runs.{run_name}.positives")

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
        self.replicas = expand_replicas(self.runs)
        if self.compare_to is not None and self.compare_to not in self.runs:
            raise ConfigError(f"compare_to: run {self.compare_to!r} is not defined (defined: {sorted(self.runs)})")


@dataclass
class Config:
    """`benchmark`: the class-conditional benchmark of Table 1 (and the default of every `tfd`
    command); `text_benchmark`: the text-to-image benchmark of Table 2 (None: none);
    `modes_benchmark`: the class benchmark with known modes (data.kind `shapes`) of
    results/table_modes.csv (None: none)."""
    benchmark: str = "digits"
    text_benchmark: Optional[str] = None
    modes_benchmark: Optional[str] = None
    benchmarks: dict[str, BenchmarkCfg] = field(default_factory=dict)

    def __post_init__(self):
        if self.text_benchmark in ("", "null", "none", "None"):  # `--config text_benchmark=null` is a string
            self.text_benchmark = None
        if self.modes_benchmark in ("", "null", "none", "None"):
            self.modes_benchmark = None

    @property
    def active(self) -> list[str]:
        """The benchmarks the workflow builds: `benchmark`, `text_benchmark` and `modes_benchmark` (when set)."""
        return list(dict.fromkeys([self.benchmark] + [b for b in (self.text_benchmark, self.modes_benchmark) if b]))

    def bench(self, name: Optional[str] = None) -> BenchmarkCfg:
        name = name or self.benchmark
        if name not in self.benchmarks:
            raise ConfigError(f"benchmark: {name!r} is not defined (defined: {sorted(self.benchmarks)})")
        return self.benchmarks[name]


def input_paths(cfg: Config, name: Optional[str] = None) -> dict[str, Optional[str]]:
    """The user-supplied input files/folders of benchmark `name` (default: every active one), as
    {config key: path or None}: what a site file fills in and `check(..., files=True)` verifies."""
    out: dict[str, Optional[str]] = {}
    for n in ([name] if name else cfg.active):
        b, w = cfg.bench(n), f"benchmarks.{n}"
        out.update({f"{w}.teacher.checkpoint": b.teacher.checkpoint, f"{w}.data.path": b.data.path,
                    f"{w}.data.captions_json": b.data.captions_json, f"{w}.data.images_dir": b.data.images_dir,
                    f"{w}.prompts.file": b.prompts.file, f"{w}.eval.ref_stats": b.eval.ref_stats,
                    f"{w}.positives.prompts_file": b.positives.prompts_file,
                    f"{w}.positives.paired_captions_json": b.positives.paired_captions_json,
                    f"{w}.positives.paired_images_dir": b.positives.paired_images_dir,
                    f"{w}.eval.feature_extractor_weights_path": b.eval.feature_extractor_weights_path,
                    f"{w}.eval.dinov2_checkpoint": b.eval.dinov2_checkpoint,
                    f"{w}.eval.cmmd_clip_checkpoint": b.eval.cmmd_clip_checkpoint,
                    f"{w}.eval.clip_checkpoint": b.eval.clip_checkpoint,
                    f"{w}.eval.clip_model_config": b.eval.clip_model_config})
        for r, run in b.runs.items():
            if run.positives and run.trains and b.task == "text":  # a run's own positives files
                try:
                    p = b.positives_for(r)
                except ConfigError:
                    p = None  # reported by _check_bench
                if p is not None:
                    out.update({f"{w}.runs.{r}.positives.{k}": getattr(p, k)
                                for k in ("prompts_file", "paired_captions_json", "paired_images_dir")})
            if run.trains and getattr(run.params, "lpips_weights", None):  # DMD's local LPIPS module
                out[f"{w}.runs.{r}.params.lpips_weights"] = run.params.lpips_weights
            if run.method == "pipeline":
                out.update({f"{w}.runs.{r}.sampler.pipeline": run.sampler.pipeline,
                            f"{w}.runs.{r}.sampler.unet": run.sampler.unet})
    return out


def _check_bench(cfg: Config, name: str) -> list[str]:
    b, w = cfg.bench(name), f"benchmarks.{name}"
    problems = []

    def need(key: str, value, why: str):
        if not value:
            problems.append(f"{w}.{key}: required {why}")

    text = b.task == "text"
    data_kinds, teacher_kinds = (("digits_text", "coco"), ("diffusers", "train_t2i")) if text else \
        (("digits", "shapes", "edm_zip"), ("train", "edm"))
    if b.data.kind not in data_kinds:
        problems.append(f"{w}.data.kind: {b.data.kind!r} is not a {b.task} benchmark's data "
                        f"(use one of {list(data_kinds)}, or set {w}.task)")
    if b.teacher.kind not in teacher_kinds:
        problems.append(f"{w}.teacher.kind: {b.teacher.kind!r} is not a {b.task} benchmark's teacher "
                        f"(use one of {list(teacher_kinds)})")
    if b.teacher.kind == "edm":
        need("teacher.checkpoint", b.teacher.checkpoint, "for teacher.kind 'edm' (edm-imagenet-64x64-cond-adm.pkl, "
             "or the safetensors `tfd convert-edm` makes from it)")
    if b.teacher.kind == "diffusers":
        need("teacher.checkpoint", b.teacher.checkpoint, "for teacher.kind 'diffusers' (a local "
             "StableDiffusionXLPipeline folder, e.g. stable-diffusion-xl-base-1.0)")
    if b.teacher.kind == "train_t2i" and b.data.kind != "digits_text":
        problems.append(f"{w}.teacher.kind: 'train_t2i' trains the embedded teacher on data.kind 'digits_text'")
    if b.data.kind == "edm_zip":
        need("data.path", b.data.path, "for data.kind 'edm_zip' (EDM dataset zip made by EDM's dataset_tool.py)")
    if b.data.kind == "coco":
        if not b.prompts.file:
            need("data.captions_json", b.data.captions_json, "for data.kind 'coco' (COCO-2014 captions_val2014.json; "
                 "or set prompts.file to DMD2's all_prompts.pkl)")
        if not b.eval.ref_stats:
            need("data.images_dir", b.data.images_dir, "for data.kind 'coco' (the COCO-2014 val2014/ folder: the "
                 "FID reference images; or set eval.ref_stats)")
    if b.eval.feature_extractor in ("inception", "clean-fid"):
        file = ("torch-fidelity's weights-inception-2015-12-05-6726825d.pth" if b.eval.feature_extractor == "inception"
                else "clean-fid's inception-2015-12-05.pt")
        need("eval.feature_extractor_weights_path", b.eval.feature_extractor_weights_path,
             f"for feature_extractor {b.eval.feature_extractor!r} ({file})")
    if b.eval.feature_extractor in EvalCfg.WEIGHTS_KEYS:
        need(f"eval.{b.eval.weights_key}", b.eval.extractor_weights,
             f"for feature_extractor {b.eval.feature_extractor!r} (a local transformers folder: "
             + ("facebook/dinov2-large)" if b.eval.feature_extractor == "dinov2" else
                "openai/clip-vit-large-patch14-336)"))
    if "clip_score" in b.eval.metrics:
        if not text:
            problems.append(f"{w}.eval.metrics: clip_score needs captions (a text benchmark)")
        elif b.data.kind == "coco":
            need("eval.clip_checkpoint", b.eval.clip_checkpoint, "for clip_score (open_clip ViT-g-14 "
                 "laion2b_s12b_b42k weights, open_clip_pytorch_model.bin)")
    from eval.metrics import MODE_METRICS, check_metric_names  # the registry: unknown or inapplicable names
    problems += [f"{w}.eval.metrics: {p}" for p in check_metric_names(b.eval.metrics, b.eval.feature_extractor)]
    for a, abl in b.ablations.items():
        problems += [f"{w}.ablations.{a}.compare: {m!r} is not one of eval.metrics ({', '.join(b.eval.metrics)})"
                     for m in abl.compare if m not in b.eval.metrics]
    problems += _check_shapes(b, w, [m for m in b.eval.metrics if m in MODE_METRICS])
    for table in ("table1", "table2", "table_methods"):
        for r in getattr(b, table):
            if r not in b.runs:
                problems.append(f"{w}.{table}: run {r!r} is not defined in {w}.runs")
    if b.table2 and not text:
        problems.append(f"{w}.table2: only a text benchmark (task: text) has Table 2 rows")
    if b.table_methods and text:
        problems.append(f"{w}.table_methods: only a class benchmark has the methods table (Table 2 is the text one)")
    for r, run in b.runs.items():
        if run.method == "pipeline" and not text:
            problems.append(f"{w}.runs.{r}.method: 'pipeline' rows need a text benchmark (a diffusers teacher)")
    if not text and b.positives != PositivesCfg():
        problems.append(f"{w}.positives: only a text benchmark has teacher positives (its task is {b.task!r})")
    seen = set()
    for r, run in b.runs.items():
        if run.positives and not (text and run.trains):
            problems.append(f"{w}.runs.{r}.positives: only a text benchmark's training runs take positives settings")
            continue
        if not (text and run.trains):
            if run.trains and (getattr(run.params, "generator_timestep", None) is not None
                               or getattr(run.params, "sigma_grid", "karras") == "discrete"):
                problems.append(f"{w}.runs.{r}.params: generator_timestep / sigma_grid 'discrete' need a "
                                "discrete-time teacher (a text benchmark's diffusers UNet)")
            continue
        try:
            p = b.positives_for(r)
        except ConfigError as e:
            if str(e) not in seen:  # ablation variants copy their base run's overrides: say it once
                seen.add(str(e))
                problems.append(f"{w}.{e}")
            continue
        where = f"{w}.runs.{r}" if run.positives else f"{w}"
        if bool(p.paired_captions_json) != bool(p.paired_images_dir):
            problems.append(f"{where}.positives: paired_captions_json and paired_images_dir go together "
                            "(the paired image set)")
        if b.data.kind == "coco" and not p.prompts_file:
            problems.append(f"{where}.positives.prompts_file: required for training runs on COCO (your training "
                            "prompt list, e.g. LAION prompts; the COCO-2014 val captions are the evaluation set)")
        t = getattr(run.params, "generator_timestep", None)
        if t is not None and not 0 <= t < 1000:
            problems.append(f"{w}.runs.{r}.params.generator_timestep: {t} is outside the teacher's timesteps 0..999")
        g = getattr(run.params, "real_guidance", None)
        if g is not None and g <= 0:
            problems.append(f"{w}.runs.{r}.params.real_guidance: {g} must be > 0 (or null: no guidance)")
        n = getattr(run.params, "n_pos", None)
        if n is not None and n > p.n_pos:
            problems.append(f"{w}.runs.{r}.params.n_pos: {n} positives per prompt, but the positives cache holds "
                            f"{p.n_pos} (positives.n_pos)")
        if p.shards > p.num_prompts and not p.prompts_file:
            problems.append(f"{where}.positives.shards: {p.shards} shards for {p.num_prompts} prompts")
    problems = list(dict.fromkeys(problems))  # a benchmark-level problem met through several runs: once
    for aname, abl in b.ablations.items():
        for bud in abl.budgets:
            if bud < 0:
                problems.append(f"{w}.ablations.{aname}.budgets: {bud} is negative")
    return problems


def _check_shapes(b: "BenchmarkCfg", w: str, mode_metrics: list[str]) -> list[str]:
    """A `shapes` benchmark's fixed geometry (`eval.modes`: 4 classes, 8x8, 3 channels), and mode
    metrics only where a rule reads the modes (data.kind `shapes`). Problems, [] if none."""
    from eval import modes
    problems = []
    if mode_metrics and b.data.kind != "shapes":
        problems.append(f"{w}.eval.metrics: {', '.join(mode_metrics)} read the modes of data.kind 'shapes' "
                        f"images (eval.modes), but data.kind is {b.data.kind!r}")
    if b.eval.feature_extractor == "shapes" and b.data.kind != "shapes":
        problems.append(f"{w}.eval.feature_extractor: 'shapes' is the feature network of data.kind 'shapes'")
    if b.data.kind == "shapes":
        want = {"num_classes": modes.NUM_CLASSES, "resolution": modes.RESOLUTION, "channels": modes.CHANNELS}
        problems += [f"{w}.{k}: data.kind 'shapes' has {v}, got {getattr(b, k)}" for k, v in want.items()
                     if getattr(b, k) != v]
    return problems


def check(cfg: Config, files: bool = False) -> Config:
    """Cross-field checks that a schema cannot express, for the active benchmarks (`benchmark` and
    `text_benchmark`); every problem is listed in one ConfigError (e.g. all the paths a
    paper-protocol user still has to fill in). `files`: also that every configured input path
    (`input_paths`) exists (`tfd check-config` and the workflow's parse-time check)."""
    problems = []
    if cfg.text_benchmark is not None:
        if cfg.text_benchmark not in cfg.benchmarks:
            raise ConfigError(f"text_benchmark: {cfg.text_benchmark!r} is not defined "
                              f"(defined: {sorted(cfg.benchmarks)})")
        if cfg.benchmarks[cfg.text_benchmark].task != "text":
            problems.append(f"text_benchmark: {cfg.text_benchmark!r} is not a text benchmark (its task is "
                            f"{cfg.benchmarks[cfg.text_benchmark].task!r})")
    if cfg.modes_benchmark is not None:
        if cfg.modes_benchmark not in cfg.benchmarks:
            raise ConfigError(f"modes_benchmark: {cfg.modes_benchmark!r} is not defined "
                              f"(defined: {sorted(cfg.benchmarks)})")
        if cfg.benchmarks[cfg.modes_benchmark].data.kind != "shapes":
            problems.append(f"modes_benchmark: {cfg.modes_benchmark!r} is not a benchmark with known modes (its "
                            f"data.kind is {cfg.benchmarks[cfg.modes_benchmark].data.kind!r}, not 'shapes')")
    for name in cfg.active:
        problems += _check_bench(cfg, name)
    if files:
        problems += [f"{k}: no such file or folder: {v}" for k, v in input_paths(cfg).items()
                     if v and not Path(v).exists()]
        for name in cfg.active:  # a diffusers teacher must be a whole StableDiffusionXLPipeline folder
            t = cfg.bench(name).teacher
            if t.kind == "diffusers" and t.checkpoint and Path(t.checkpoint).is_dir():
                from tfd.diffusers_denoiser import PIPELINE_SUBFOLDERS
                gone = [s for s in PIPELINE_SUBFOLDERS if not (Path(t.checkpoint) / s).is_dir()]
                if gone:
                    problems.append(f"benchmarks.{name}.teacher.checkpoint: {t.checkpoint} is not a "
                                    f"StableDiffusionXLPipeline folder (no {', '.join(f'{g}/' for g in gone)})")
        for name in cfg.active:
            problems += _check_ref_stats_file(cfg.bench(name), f"benchmarks.{name}")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))
    return cfg


def _check_ref_stats_file(b: "BenchmarkCfg", w: str) -> list[str]:
    """The configured reference statistics (`eval.ref_stats`, when the file exists) against the
    metrics asked for: readable and finite, and storing reference features when a metric of
    `eval.metrics` needs them (precision/recall, KID, density/coverage: EDM's `imagenet-64x64.npz`
    holds only mu/sigma). Problems, [] if none."""
    path = b.eval.ref_stats
    if not path or not Path(path).is_file():
        return []
    from eval.fid import check_ref_stats
    from eval.metrics import METRICS, metric_names, needs_ref_features
    generic = metric_names(b.eval.feature_extractor)  # generic names (precision, kid, ...) -> this extractor's
    pr = [m for m in b.eval.metrics if generic.get(m, m) in METRICS and needs_ref_features(generic.get(m, m))]
    try:
        check_ref_stats(path, [generic.get(m, m) for m in pr])
    except UserError as e:
        both = f" and {w}.eval.metrics ({', '.join(pr)})" if pr and "features" in str(e) else ""
        return [f"{w}.eval.ref_stats{both}: {e}"]
    return []


def read_yaml(p: str | Path) -> dict:
    """One YAML config file as a dict; ConfigError naming the file, line and column of a syntax
    error, or the file when its top level is not a mapping. The Snakefile reads `config.yaml`
    through it first, since Snakemake's own loader does not say where a YAML error is."""
    p = Path(p)
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(p)
        what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e})") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty (or only comments); a config needs at least `benchmark:` and "
                          "`benchmarks:` (see config.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (benchmark:, benchmarks:, ...), "
                          f"found a {type(data).__name__}")
    return data


def load_config(path: str | Path | list = "config.yaml", overrides: Optional[dict] = None) -> Config:
    """Load, type and check a config. `path` may be a list: later files are merged key by key over
    earlier ones (lists replaced), as `snakemake --configfile` merges an overlay such as
    `.test/config.yaml` over `config.yaml`. ConfigError names a missing file or a bad key."""
    data: dict = {}
    for p in ([path] if isinstance(path, (str, Path)) else list(path)):
        p = Path(p)
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; --config takes a YAML file (e.g. config.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = deep_update(data, read_yaml(p))
    if overrides:
        data = deep_update(data, overrides)
    return check(from_dict(Config, data, "config"))


def deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
