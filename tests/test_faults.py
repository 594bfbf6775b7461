"""The project's own fault suite (issue 15, item 7): every file type the DAG writes, damaged, then
read by the next stage.

Each file is damaged five ways (cut to half its bytes, cut to 0 bytes, three bytes flipped in the
middle (XOR 1), replaced by a file of another format, and, for text formats, one digit near the
middle changed, which keeps the file valid), then the stage that reads it runs in-process through
`tfd.cli.main`. Expected, for every case: a non-zero exit, ONE line `tfd <cmd>: error: ...` naming
the damaged file, and no output written. A few cases run as real subprocesses to check stderr
itself. Beside the files: bad configs, a generator with NaN weights, `tfd distill` killed with
SIGKILL at a random step and resumed, a second `tfd distill` on a busy run folder, unwritable
output folders, and damaged training checkpoints (recovered: set aside, previous one resumed).

Inputs are built once per module with the tiny config (tests/helpers.tiny_config): the digits
teacher, feature net, reference statistics, a 3-step TFD run with its convergence record, sample
shards, metric files, tables; and the text benchmark's data, prompt tables, paired latents,
positives shards and cache, a TFD run and a tiny CLIP on a random tiny SDXL pipeline.

`test_zz_summary` (last) prints the counts and the file type x fault table (`pytest -s`) and
asserts that no fault went unnoticed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from tests.helpers import ROOT, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")

# ------------------------------------------------------------------------------------------------
# outcomes, counted over the module

ERROR = "one-line error"          # non-zero exit, one line `tfd <cmd>: error: ...` naming the file/cause
RECOVERED = "recovered"           # (checkpoints) set aside with a warning naming it, previous one resumed
SILENT = "SILENT"                 # exit 0 after reading the damaged file, or an output written from it
TRACEBACK = "traceback"           # an exception that is not a user error (a bug)
UNNAMED = "error without cause"   # a one-line error that does not name the damaged file / cause

RESULTS: list[dict] = []


def record(ftype: str, fault: str, stage: str, outcome: str, msg: str = "", claimed: bool = True) -> None:
    RESULTS.append({"ftype": ftype, "fault": fault, "stage": stage, "outcome": outcome, "msg": msg,
                    "claimed": claimed})


# ------------------------------------------------------------------------------------------------
# faults


def cut_half(p: Path, w) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def cut_zero(p: Path, w) -> None:
    p.write_bytes(b"")


def flip(p: Path, w) -> None:
    """Three bytes in the middle XOR 1 (a digit stays a digit, a quote becomes '#', ...)."""
    b = bytearray(p.read_bytes())
    m = len(b) // 2
    for off in (0, 5, 11):
        b[min(m + off, len(b) - 1)] ^= 0x01
    p.write_bytes(bytes(b))


def digit(p: Path, w) -> None:
    """The digit of a number (outside double-quoted strings: a value, not a checksum or a caption)
    nearest the middle of a text file, plus one: the file stays valid JSON / csv."""
    b = bytearray(p.read_bytes())
    m, quoted, numbers = len(b) // 2, False, []
    for i, ch in enumerate(b):
        if ch == 0x22 and (i == 0 or b[i - 1] != 0x5C):  # an unescaped '"'
            quoted = not quoted
        elif ch == 0x0A:
            quoted = False
        elif not quoted and 0x30 <= ch <= 0x39:
            numbers.append(i)
    i = min(numbers, key=lambda i: abs(i - m))
    b[i] = 0x30 + (b[i] - 0x30 + 1) % 10
    p.write_bytes(bytes(b))


def foreign(p: Path, w) -> None:
    """A file of another format: binary files get a YAML text file, text files an npz."""
    src = w["dir"] / ("ref.npz" if _is_text(p) else "config.yaml")
    p.write_bytes(src.read_bytes())


def _is_text(p: Path) -> bool:
    return p.suffix in (".json", ".jsonl", ".csv", ".yaml", ".txt")


FAULTS = {"half": cut_half, "zero": cut_zero, "flip": flip, "digit": digit, "foreign": foreign}


# ------------------------------------------------------------------------------------------------
# running the CLI


def tfd(*argv) -> None:
    """`tfd ARGV` in-process; fails the test on any error (building the inputs)."""
    from tfd.cli import main
    main([str(a) for a in argv])


@dataclass
class Run:
    code: object = 0            # exit status (a SystemExit string is status 1 with that message)
    msg: str = ""
    exc: BaseException | None = None

    @property
    def line(self) -> str:
        return self.msg if isinstance(self.code, str) else ""


def run_tfd(argv) -> Run:
    """`tfd ARGV` in-process: the SystemExit it ends with (the one-line message of a user error is its
    code), or the exception that escaped (a bug)."""
    from tfd.cli import main
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return Run(code=e.code, msg=e.code if isinstance(e.code, str) else "")
    except Exception as e:  # noqa: BLE001  (a traceback: what this suite looks for)
        return Run(code="exception", msg=f"{type(e).__name__}: {e}", exc=e)
    return Run()


def classify(r: Run, cmd: str, names: list[str], outputs: list[Path]) -> str:
    written = [p for p in outputs if p.exists()]
    if r.code == 0 or r.code is None or written:
        return SILENT
    if r.exc is not None:
        return TRACEBACK
    line = r.line
    if "\n" in line or not line.startswith(f"tfd {cmd}: error: "):
        return TRACEBACK
    return ERROR if all(n in line for n in names) else UNNAMED


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files of atomic writes left behind (`.<name>.tmp<pid>`, `.<name>.tmp-*` folders)."""
    return [p for f in folders if f.is_dir() for p in f.rglob(".*.tmp*")]


# ------------------------------------------------------------------------------------------------
# the inputs, built once


@pytest.fixture(scope="module", autouse=True)
def _open_clip_registry():
    """`tfd score` registers the tiny CLIP's model config with open_clip (a process-wide registry):
    restore it after the module, so later test modules see open_clip as they would alone."""
    import open_clip.factory as factory

    paths, configs = list(factory._MODEL_CONFIG_PATHS), dict(factory._MODEL_CONFIGS)
    yield
    factory._MODEL_CONFIG_PATHS[:] = paths
    factory._MODEL_CONFIGS.clear()
    factory._MODEL_CONFIGS.update(configs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The digits benchmark's files, made by the CLI with the tiny config."""
    from eval.digits_net import train_digits_net

    d = tmp_path_factory.mktemp("faults")
    cfg = tiny_config()
    cfg["benchmarks"]["digits"]["table1"] = ["tfd"]
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    c = ["--config", d / "config.yaml"]
    w = {"dir": d, "c": c, "cfg": cfg, "teacher": d / "teacher.safetensors", "fnet": d / "fnet.safetensors",
         "ref": d / "ref.npz", "results": d / "results"}
    run = w["run"] = d / "results/digits/tfd/tfd"
    tfd("train-teacher", *c, "--no-progress", "--out", w["teacher"])
    train_digits_net(w["fnet"], epochs=1)
    tfd("ref-stats", *c, "--no-progress", "--feature-weights", w["fnet"], "--out", w["ref"])
    tfd("distill", *c, "--no-progress", "--run", "tfd", "--teacher", w["teacher"], "--out-dir", run,
        "--feature-weights", w["fnet"], "--ref-stats", w["ref"])
    w["generator"] = run / "generator.safetensors"
    w["shards"] = [d / f"shard{k}of2.npz" for k in range(2)]
    for k, out in enumerate(w["shards"]):
        tfd("sample", *c, "--no-progress", "--run", "tfd", "--teacher", w["teacher"], "--generator", w["generator"],
            "--shard", f"{k}/2", "--out", out)
    w["samples"] = run / "samples.npz"
    tfd("merge-samples", *c, "--out", w["samples"], *w["shards"])
    tfd("score", *c, "--no-progress", "--samples", w["samples"], "--ref-stats", w["ref"],
        "--feature-weights", w["fnet"], "--out-dir", run / "metrics")
    w["table"], w["conv_csv"] = d / "table1.csv", d / "convergence.csv"
    tfd("table", *c, "--no-progress", "--results-dir", w["results"], "--out", w["table"], "--convergence",
        w["conv_csv"])
    w["curves_csv"] = d / "ablation_seed_curves.csv"
    tfd("ablation", *c, "--no-progress", "--name", "seed", "--results-dir", w["results"],
        "--out", d / "ablation_seed.csv", "--curves", w["curves_csv"])
    return w


@pytest.fixture(scope="module")
def text(world):
    """The text benchmark's files (`--bench digits_text`), on a random tiny SDXL pipeline."""
    from eval.digits_text import digits_text_arrays
    from eval.tiny_clip import train_tiny_clip
    from tfd.t2i_tiny import build_random_pipeline_folder

    d = world["dir"] / "text"
    c = [*world["c"], "--bench", "digits_text"]
    t = {"dir": d, "c": c, "pipe": d / "pipe", "data": d / "data", "prompts": d / "prompts.jsonl",
         "train_prompts": d / "train_prompts.jsonl", "latents": d / "latents.safetensors",
         "shards": [d / f"positives{k}of2.safetensors" for k in range(2)], "positives": d / "positives.safetensors",
         "run": d / "run", "samples": d / "samples.npz", "ref": d / "ref.npz", "clip": d / "clip"}
    build_random_pipeline_folder(t["pipe"], seed=1, unet_channels=(16, 16, 32), layers_per_block=1)
    tfd("text-data", *c, "--out-dir", t["data"])
    tfd("prompts", *c, "--data-dir", t["data"], "--out", t["prompts"])
    tfd("train-prompts", *c, "--run", "tfd", "--data-dir", t["data"], "--out", t["train_prompts"])
    tfd("latents", *c, "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--data-dir", t["data"],
        "--out", t["latents"])
    for k, out in enumerate(t["shards"]):
        tfd("positives", *c, "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--train-prompts",
            t["train_prompts"], "--latents", t["latents"], "--shard", f"{k}/2", "--out", out)
    tfd("merge-positives", "--out", t["positives"], *t["shards"])
    tfd("distill", *c, "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--out-dir", t["run"],
        "--train-prompts", t["train_prompts"], "--positives", t["positives"])
    tfd("sample", *c, "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--generator",
        t["run"] / "generator.safetensors", "--prompts", t["prompts"], "--out", t["samples"])
    tfd("ref-stats", *c, "--no-progress", "--prompts", t["prompts"], "--data-dir", t["data"],
        "--feature-weights", world["fnet"], "--out", t["ref"])
    from diffusers import AutoencoderKL

    from tfd.t2i_tiny import tiny_vae_config
    from tfd.train_t2i import save_pretrained_atomic
    t["vae"] = save_pretrained_atomic(AutoencoderKL.from_config(tiny_vae_config(sample_size=32)), d / "vae")
    images, captions, _ = digits_text_arrays(t["data"])
    train_tiny_clip(images[:64], captions[:64], t["clip"], steps=2, batch_size=16, progress=False,
                    name="TinyCLIP-digits", clip_resize=32, warmup_steps=1)
    t["clip_ckpt"], t["clip_cfg"] = t["clip"] / "TinyCLIP-digits.safetensors", t["clip"] / "TinyCLIP-digits.json"
    return t


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    return dest


def results_copy(w, tmp: Path) -> Path:
    """The results tree (metric files, train.json, convergence record; no checkpoints, no samples)."""
    return Path(shutil.copytree(w["results"], tmp / "results", ignore=shutil.ignore_patterns("ckpt", "*.npz")))


# ------------------------------------------------------------------------------------------------
# the file types: (what is damaged, the stage that reads it)


@dataclass
class Case:
    ftype: str                 # the file type, as the DAG writes it
    stage: str                 # the next stage (its `tfd` command)
    make: Callable             # (world, text, tmp) -> (damaged file, argv, outputs that must not appear)
    text_format: bool = False  # a text format: also the `digit` fault
    swap: str | None = None    # another suite file of the same container format (a valid file of the wrong kind)
    xfail: dict = field(default_factory=dict)  # fault -> reason (a strict xfail)
    uses_text: bool = False


def _teacher_sample(w, t, tmp):
    f = copy(w["teacher"], tmp / "teacher.safetensors")
    out = tmp / "s.npz"
    return f, ["sample", *w["c"], "--no-progress", "--run", "onestep_init", "--teacher", f, "--num", 4,
               "--out", out], [out]


def _teacher_distill(w, t, tmp):
    f = copy(w["teacher"], tmp / "teacher.safetensors")
    return f, ["distill", *w["c"], "--no-progress", "--run", "tfd", "--teacher", f, "--out-dir", tmp / "run"], \
        [tmp / "run" / "generator.safetensors", tmp / "run" / "train.json"]


def _fnet_ref_stats(w, t, tmp):
    f = copy(w["fnet"], tmp / "fnet.safetensors")
    out = tmp / "ref.npz"
    return f, ["ref-stats", *w["c"], "--no-progress", "--feature-weights", f, "--out", out], [out]


def _score(w, samples, ref, fnet, out_dir):
    return ["score", *w["c"], "--no-progress", "--samples", samples, "--ref-stats", ref, "--feature-weights", fnet,
            "--out-dir", out_dir]


def _metric_files(w, out_dir: Path) -> list[Path]:
    return [out_dir / f"{m}.json" for m in w["cfg"]["benchmarks"]["digits"]["eval"]["metrics"]]


def _fnet_score(w, t, tmp):
    f = copy(w["fnet"], tmp / "fnet.safetensors")
    return f, _score(w, w["samples"], w["ref"], f, tmp / "m"), _metric_files(w, tmp / "m")


def _ref_score(w, t, tmp):
    f = copy(w["ref"], tmp / "ref.npz")
    return f, _score(w, w["samples"], f, w["fnet"], tmp / "m"), _metric_files(w, tmp / "m")


def _shard_merge(w, t, tmp):
    f = copy(w["shards"][0], tmp / "shard0of2.npz")
    out = tmp / "samples.npz"
    return f, ["merge-samples", *w["c"], "--out", out, f, w["shards"][1]], [out]


def _samples_score(w, t, tmp):
    f = copy(w["samples"], tmp / "samples.npz")
    return f, _score(w, f, w["ref"], w["fnet"], tmp / "m"), _metric_files(w, tmp / "m")


def _samples_figure(w, t, tmp):
    f = copy(w["samples"], tmp / "samples.npz")
    return f, ["figure", "samples", "--samples", f, "--title", "t", "--out", tmp / "fig"], \
        [tmp / "fig.png", tmp / "fig.pdf"]


def _table(w, results, tmp):
    outs = [tmp / f"t.{x}" for x in ("csv", "md", "html")] + [tmp / "c.csv"]
    return ["table", *w["c"], "--no-progress", "--results-dir", results, "--out", tmp / "t.csv",
            "--convergence", tmp / "c.csv", "--manifest", tmp / "t.manifest.json"], outs + [tmp / "t.manifest.json"]


def _metric_table(w, t, tmp):
    r = results_copy(w, tmp)
    f = r / "digits/tfd/tfd/metrics/fid_digits.json"
    return (f, *_table(w, r, tmp))


def _train_json_table(w, t, tmp):
    r = results_copy(w, tmp)
    return (r / "digits/tfd/tfd/train.json", *_table(w, r, tmp))


def _conv_table(w, t, tmp):
    r = results_copy(w, tmp)
    return (r / "digits/tfd/tfd/convergence.jsonl", *_table(w, r, tmp))


def _conv_ablation(w, t, tmp):
    r = results_copy(w, tmp)
    outs = [tmp / f"a.{x}" for x in ("csv", "md", "html")] + [tmp / "curves.csv"]
    return r / "digits/tfd/tfd/convergence.jsonl", ["ablation", *w["c"], "--no-progress", "--name", "seed",
                                                    "--results-dir", r, "--out", tmp / "a.csv", "--curves",
                                                    tmp / "curves.csv"], outs


def _generator_sample(w, t, tmp):
    f = copy(w["generator"], tmp / "generator.safetensors")
    out = tmp / "s.npz"
    return f, ["sample", *w["c"], "--no-progress", "--run", "tfd", "--teacher", w["teacher"], "--generator", f,
               "--num", 4, "--out", out], [out]


def _conv_csv_figure(w, t, tmp):
    f = _with_sidecar(w["conv_csv"], tmp / "convergence.csv")
    return f, ["figure", "convergence", "--csv", f, "--out", tmp / "fig"], [tmp / "fig.png", tmp / "fig.pdf"]


def _curves_csv_figure(w, t, tmp):
    f = _with_sidecar(w["curves_csv"], tmp / "curves.csv")
    return f, ["figure", "ablation", "--csv", f, "--title", "t", "--out", tmp / "fig"], \
        [tmp / "fig.png", tmp / "fig.pdf"]


def _with_sidecar(src: Path, dest: Path) -> Path:
    copy(src, dest)
    side = src.with_name(src.name + ".sha256")
    if side.is_file():
        copy(side, dest.with_name(dest.name + ".sha256"))
    return dest


def _prompts_sample(w, t, tmp):
    f = _with_sidecar(t["prompts"], tmp / "prompts.jsonl")
    out = tmp / "s.npz"
    return f, ["sample", *t["c"], "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--generator",
               t["run"] / "generator.safetensors", "--prompts", f, "--num", 4, "--out", out], [out]


def _positives_argv(t, tmp, prompts, latents):
    out = tmp / "p.safetensors"
    return ["positives", *t["c"], "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--train-prompts", prompts,
            "--latents", latents, "--shard", "0/2", "--out", out], [out]


def _train_prompts_positives(w, t, tmp):
    f = _with_sidecar(t["train_prompts"], tmp / "train_prompts.jsonl")
    return (f, *_positives_argv(t, tmp, f, t["latents"]))


def _latents_positives(w, t, tmp):
    f = copy(t["latents"], tmp / "latents.safetensors")
    return (f, *_positives_argv(t, tmp, t["train_prompts"], f))


def _shard_merge_positives(w, t, tmp):
    f = copy(t["shards"][0], tmp / "positives0of2.safetensors")
    out = tmp / "positives.safetensors"
    return f, ["merge-positives", "--out", out, f, t["shards"][1]], [out]


def _positives_distill(w, t, tmp):
    f = copy(t["positives"], tmp / "positives.safetensors")
    run = tmp / "run"
    return f, ["distill", *t["c"], "--no-progress", "--run", "tfd", "--teacher", t["pipe"], "--out-dir", run,
               "--train-prompts", t["train_prompts"], "--positives", f], [run / "generator.safetensors",
                                                                         run / "train.json"]


def _pipeline_latents(w, t, tmp):
    pipe = copy(t["pipe"], tmp / "pipe")
    out = tmp / "latents.safetensors"
    return pipe / "unet/diffusion_pytorch_model.safetensors", [
        "latents", *t["c"], "--no-progress", "--run", "tfd", "--teacher", pipe, "--data-dir", t["data"],
        "--out", out], [out]


def _captions_train_prompts(w, t, tmp):
    data = copy(t["data"], tmp / "data")
    out = tmp / "tp.jsonl"
    return data / "captions.json", ["train-prompts", *t["c"], "--run", "tfd", "--data-dir", data, "--out", out], [out]


def _image_ref_stats(w, t, tmp):
    data = copy(t["data"], tmp / "data")
    first = json.loads(t["prompts"].read_text().splitlines()[0])["file_names"][0]
    out = tmp / "ref.npz"
    return data / "images" / first, ["ref-stats", *t["c"], "--no-progress", "--prompts", t["prompts"], "--data-dir",
                                     data, "--feature-weights", w["fnet"], "--out", out], [out]


def _clip_score(w, t, tmp):
    f = copy(t["clip_ckpt"], tmp / "clip.safetensors")
    out = tmp / "m"
    return f, ["score", *t["c"], "--no-progress", "--samples", t["samples"], "--ref-stats", t["ref"],
               "--feature-weights", w["fnet"], "--prompts", t["prompts"], "--clip-checkpoint", f,
               "--clip-model-config", t["clip_cfg"], "--metrics", "clip_score", "--out-dir", out], \
        [out / "clip_score.json"]


def _clip_config_score(w, t, tmp):
    f = _with_sidecar(t["clip_cfg"], tmp / "TinyCLIP-digits.json")
    out = tmp / "m"
    return f, ["score", *t["c"], "--no-progress", "--samples", t["samples"], "--ref-stats", t["ref"],
               "--feature-weights", w["fnet"], "--prompts", t["prompts"], "--clip-checkpoint", t["clip_ckpt"],
               "--clip-model-config", f, "--metrics", "clip_score", "--out-dir", out], [out / "clip_score.json"]


def _vae_t2i_teacher(w, t, tmp):
    vae = copy(t["vae"], tmp / "vae")
    out = tmp / "pipe"
    return vae / "diffusion_pytorch_model.safetensors", [
        "train-t2i-teacher", *t["c"], "--no-progress", "--data-dir", t["data"], "--vae", vae, "--out", out], [out]


CASES = [
    Case("teacher safetensors (train-teacher)", "sample", _teacher_sample, swap="fnet"),
    Case("teacher safetensors (train-teacher)", "distill", _teacher_distill, swap="fnet"),
    Case("digits feature net (train-feature-net)", "ref-stats", _fnet_ref_stats, swap="teacher"),
    Case("digits feature net (train-feature-net)", "score", _fnet_score, swap="teacher"),
    Case("reference statistics npz (ref-stats)", "score", _ref_score, swap="samples"),
    Case("sample shard npz (sample)", "merge-samples", _shard_merge, swap="ref"),
    Case("merged samples npz (merge-samples)", "score", _samples_score, swap="ref"),
    Case("merged samples npz (merge-samples)", "figure", _samples_figure, swap="ref"),
    Case("metric JSON (score)", "table", _metric_table, text_format=True, swap="train_json"),
    Case("generator safetensors (distill)", "sample", _generator_sample, swap="fnet"),
    Case("train.json (distill)", "table", _train_json_table, text_format=True, swap="metric"),
    Case("convergence.jsonl (distill)", "table", _conv_table, text_format=True, swap="metric"),
    Case("convergence.jsonl (distill)", "ablation", _conv_ablation, text_format=True, swap="metric"),
    Case("convergence csv (table)", "figure", _conv_csv_figure, text_format=True, swap="table"),
    Case("ablation curves csv (ablation)", "figure", _curves_csv_figure, text_format=True, swap="table"),
    Case("prompt table jsonl (prompts)", "sample", _prompts_sample, text_format=True, uses_text=True),
    Case("train prompts jsonl (train-prompts)", "positives", _train_prompts_positives, text_format=True,
         uses_text=True),
    Case("paired latents safetensors (latents)", "positives", _latents_positives, swap="t:positives", uses_text=True),
    Case("positives shard safetensors (positives)", "merge-positives", _shard_merge_positives, swap="t:latents",
         uses_text=True),
    Case("positives cache safetensors (merge-positives)", "distill", _positives_distill, swap="t:latents",
         uses_text=True),
    Case("pipeline folder: unet weights (train-t2i-teacher)", "latents", _pipeline_latents, swap="fnet",
         uses_text=True),
    Case("VAE folder: weights (train-vae)", "train-t2i-teacher", _vae_t2i_teacher, swap="fnet", uses_text=True),
    Case("text data folder: captions.json (text-data)", "train-prompts", _captions_train_prompts, text_format=True,
         uses_text=True),
    Case("text data folder: image png (text-data)", "ref-stats", _image_ref_stats, swap="t:other_png", uses_text=True),
    Case("tiny CLIP safetensors (train-clip)", "score", _clip_score, swap="fnet", uses_text=True),
    Case("tiny CLIP model config json (train-clip)", "score", _clip_config_score, text_format=True, uses_text=True),
]


def _swap_source(key: str, w, t) -> Path:
    if key.startswith("t:"):
        key = key[2:]
        if key == "other_png":  # another image of the data set: detected only by the manifest
            return sorted((t["data"] / "images").glob("*.png"))[-1]
        return t[key]
    return {"metric": w["run"] / "metrics/fid_digits.json", "train_json": w["run"] / "train.json",
            "samples": w["samples"]}.get(key) or w[key]


def _params():
    out = []
    for case in CASES:
        faults = ["half", "zero", "flip", "foreign"] + (["digit"] if case.text_format else []) + \
            (["swap"] if case.swap else [])
        for fault in faults:
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail[fault])] if fault in case.xfail else []
            out.append(pytest.param(case, fault, id=f"{case.stage}<-{case.ftype.split(' (')[0]}-{fault}", marks=marks))
    return out


@pytest.mark.parametrize("case, fault", _params())
def test_damaged_file_is_named_by_the_next_stage(case, fault, world, request, tmp_path):
    t = request.getfixturevalue("text") if case.uses_text else None
    target, argv, outputs = case.make(world, t, tmp_path)
    assert target.is_file(), target
    if fault == "swap":
        target.write_bytes(_swap_source(case.swap, world, t).read_bytes())
    else:
        FAULTS[fault](target, world)
    r = run_tfd(argv)
    outcome = classify(r, argv[0], [str(target)], outputs)
    record(case.ftype, fault, f"tfd {argv[0]}" + (f" {argv[1]}" if argv[0] == "figure" else ""), outcome, r.msg,
           claimed=fault not in case.xfail)
    assert outcome == ERROR, f"{outcome}: {r.msg}"
    assert not leftovers(tmp_path), leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# a few end to end: the real stderr of a subprocess


def _subprocess(argv, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "tfd.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, **kw)


def assert_one_line_error(p: subprocess.CompletedProcess, cmd: str, *names: str) -> str:
    """Exit status 1 and exactly one stderr line `tfd <cmd>: error: ...` naming `names`; no traceback."""
    err = p.stderr
    assert p.returncode == 1, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("tfd ") and ": error:" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"tfd {cmd}: error: "), err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == lines[0]
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_subprocess_one_line_errors(world, tmp_path):
    """Three stages as real processes: a flipped reference-statistics npz (score), a truncated metric
    file (table), a YAML syntax error (check-config); stderr holds one line, `--debug` the traceback."""
    ref = copy(world["ref"], tmp_path / "ref.npz")
    flip(ref, world)
    p = _subprocess(_score(world, world["samples"], ref, world["fnet"], tmp_path / "m"))
    assert_one_line_error(p, "score", str(ref), "CRC")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
    record("reference statistics npz (ref-stats)", "flip", "tfd score (subprocess)", ERROR)

    r = results_copy(world, tmp_path)
    m = r / "digits/tfd/tfd/metrics/class_acc.json"
    cut_half(m, world)
    p = _subprocess(_table(world, r, tmp_path)[0])
    assert_one_line_error(p, "table", str(m))
    assert not (tmp_path / "t.csv").exists()
    record("metric JSON (score)", "half", "tfd table (subprocess)", ERROR)

    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: digits\nbenchmarks:\n  digits:\n    eval: {num_samples: 4\n")
    p = _subprocess(["check-config", "--config", bad])
    assert_one_line_error(p, "check-config", str(bad), "line ")
    p = _subprocess(["--debug", "check-config", "--config", bad])
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr
    record("config YAML", "syntax error", "tfd check-config (subprocess)", ERROR)


# ------------------------------------------------------------------------------------------------
# bad configs


def _bad_configs(cfg: dict, tmp: Path):
    """(name, config file, what the one-line error must name)."""
    import copy as _copy

    def edit(fn):
        c = _copy.deepcopy(cfg)
        fn(c)
        return c

    ev = lambda c: c["benchmarks"]["digits"]["eval"]  # noqa: E731
    out = {
        "unknown key": (edit(lambda c: ev(c).update(num_sampels=10)), ["benchmarks.digits.eval", "num_sampels"]),
        "renamed key": (edit(lambda c: ev(c).update(feature_net="digits")), ["feature_net", "feature_extractor"]),
        "wrong type": (edit(lambda c: ev(c).update(num_samples="many")), ["benchmarks.digits.eval.num_samples",
                                                                          "integer", "many"]),
        "missing input path": (edit(lambda c: ev(c).update(ref_stats=str(tmp / "nowhere/ref.npz"))),
                               ["benchmarks.digits.eval.ref_stats", str(tmp / "nowhere/ref.npz")]),
        "metric/extractor mismatch": (edit(lambda c: ev(c).update(metrics=["fid_clean"])),
                                      ["benchmarks.digits.eval.metrics", "fid_clean"]),
        "unknown method": (edit(lambda c: c["benchmarks"]["digits"]["runs"]["tfd"].update(method="tdf")),
                           ["benchmarks.digits", "runs.tfd.method", "tdf"]),
    }
    files = []
    for name, (c, names) in out.items():
        f = tmp / f"{name.replace(' ', '_').replace('/', '_')}.yaml"
        f.write_text(yaml.safe_dump(c, sort_keys=False))
        files.append((name, f, names))
    syntax = tmp / "syntax.yaml"
    syntax.write_text("benchmark: digits\nbenchmarks:\n  digits:\n    eval:\n      metrics: [fid_digits\n"
                      "      num_samples: 4\n")
    files.append(("YAML syntax error", syntax, [str(syntax), "line 6"]))
    tab = tmp / "tab.yaml"
    tab.write_text("benchmark: digits\n\tbenchmarks: {}\n")
    files.append(("YAML tab indent", tab, [str(tab), "line 2"]))
    files.append(("missing config file", tmp / "no.yaml", [str(tmp / "no.yaml")]))
    return files


def test_bad_configs_are_one_line_errors_naming_key_or_line(world, tmp_path):
    """Each bad config: `tfd check-config` and a working command (`tfd sample`) fail with one line
    naming the key (or the file and line of a YAML syntax error), before any output is written."""
    out = tmp_path / "s.npz"
    for name, f, names in _bad_configs(world["cfg"], tmp_path):
        for argv in (["check-config", "--config", f],
                     ["sample", "--config", f, "--no-progress", "--run", "onestep_init", "--teacher",
                      world["teacher"], "--num", 2, "--out", out]):
            r = run_tfd(argv)
            if argv[0] == "sample" and name == "missing input path":
                # a configured input the command does not read (eval.ref_stats for sampling) is checked
                # by check-config and by the workflow before any job; sampling does not need it
                assert r.code in (0, None), r.msg
                out.unlink()
                continue
            outcome = classify(r, argv[0], names, [out])
            record(f"config: {name}", name, f"tfd {argv[0]}", outcome, r.msg)
            assert outcome == ERROR, (name, argv[0], r.msg)


def test_missing_input_path_is_named(world, tmp_path):
    """A missing input file given on the command line: one line naming it (score, table, merge)."""
    gone = tmp_path / "gone.npz"
    cases = [(_score(world, world["samples"], gone, world["fnet"], tmp_path / "m"), "score"),
             (_score(world, gone, world["ref"], world["fnet"], tmp_path / "m"), "score"),
             (["merge-samples", *world["c"], "--out", tmp_path / "x.npz", world["shards"][0], gone], "merge-samples"),
             (["figure", "convergence", "--csv", tmp_path / "gone.csv", "--out", tmp_path / "f"], "figure")]
    for argv, cmd in cases:
        r = run_tfd(argv)
        name = str(tmp_path / "gone.csv") if cmd == "figure" else str(gone)
        outcome = classify(r, cmd, [name], [tmp_path / "x.npz", tmp_path / "f.png"])
        record("missing input file", "absent", f"tfd {cmd}", outcome, r.msg)
        assert outcome == ERROR, r.msg
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # (an output folder may be made up front)


# ------------------------------------------------------------------------------------------------
# a broken generator


def test_nan_generator_is_refused_naming_the_count(world, tmp_path):
    """A generator whose weights are NaN (a valid file with a matching checksum): `tfd sample` refuses
    it, naming how many values and images are non-finite, and writes no sample file."""
    from eval.io import atomic_save_safetensors, load_safetensors

    tensors, meta = load_safetensors(world["generator"])
    meta = {k: v for k, v in meta.items() if k != "tensors_sha256"}
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    gen = atomic_save_safetensors(nan, tmp_path / "generator.safetensors", meta)
    out = tmp_path / "s.npz"
    r = run_tfd(["sample", *world["c"], "--no-progress", "--run", "tfd", "--teacher", world["teacher"],
                 "--generator", gen, "--num", 6, "--out", out])
    outcome = classify(r, "sample", ["non-finite", "of 6 images"], [out])
    record("generator safetensors (distill)", "NaN weights", "tfd sample", outcome, r.msg)
    assert outcome == ERROR, r.msg
    assert " 6 of 6 images" in r.msg and any(ch.isdigit() for ch in r.msg.split("produced")[1].split()[0])


# ------------------------------------------------------------------------------------------------
# training checkpoints: damaged ones are recovered from, not errors


@pytest.mark.parametrize("fault", ["half", "zero", "flip", "foreign"])
def test_damaged_checkpoint_is_set_aside_and_the_previous_resumed(world, tmp_path, fault, capfd):
    """The latest checkpoint (step 3) damaged: `tfd distill --steps 5` warns naming it, sets it aside
    as `.corrupt`, resumes the previous one (step 2) and completes; each step once in the logs."""
    run = copy(world["run"], tmp_path / "run")
    ckpt = run / "ckpt/training-state.pt"
    FAULTS[fault](ckpt, world)
    capfd.readouterr()
    r = run_tfd(["distill", *world["c"], "--no-progress", "--run", "tfd", "--teacher", world["teacher"],
                 "--out-dir", run, "--steps", 5, "--feature-weights", world["fnet"], "--ref-stats", world["ref"]])
    err = capfd.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:") and str(ckpt) in ln]
    ok = r.code in (0, None) and len(warned) == 1 and (run / "ckpt/training-state.pt.corrupt").is_file()
    record("training checkpoint (distill)", fault, "tfd distill (resume)", RECOVERED if ok else SILENT,
           warned[0] if warned else r.msg)
    assert ok, (r.msg, err[-2000:])
    assert steps_of(run / "stats.jsonl") == [1, 2, 3, 4, 5]
    assert steps_of(run / "convergence.jsonl") == [0, 2, 4, 5]
    assert json.loads((run / "train.json").read_text())["iters"] == 5


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# killed, busy, unwritable


KILL_STEPS = 60


def test_distill_killed_at_a_random_step_resumes_and_a_second_one_is_refused(world, tmp_path):
    """`tfd distill` (a subprocess) is SIGKILLed at a random step; meanwhile a second `tfd distill` on
    the same folder is refused with one line naming the holder. The resumed run completes and its
    logs hold each step once."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    run = tmp_path / "run"
    argv = ["distill", *world["c"], "--no-progress", "--run", "tfd", "--teacher", world["teacher"], "--out-dir", run,
            "--steps", KILL_STEPS, "--feature-weights", world["fnet"], "--ref-stats", world["ref"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "tfd.cli", *map(str, argv)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stats = run / "stats.jsonl"
    kill_at = rng.randint(3, KILL_STEPS * 3 // 4)

    def lines() -> int:
        return len(stats.read_text().splitlines()) if stats.is_file() else 0

    try:
        t0 = time.time()
        while lines() < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 240, "distill did not start"
            time.sleep(0.02)
        second = run_tfd(argv)  # the same run folder, while the first one trains
        alive = proc.poll() is None
        outcome = classify(second, "distill", ["in use by another process", f"pid {proc.pid}"], [])
        record("run folder (distill)", "second concurrent distill", "tfd distill", outcome, second.msg)
        assert alive, "the first distill ended before the second one tried: the race is lost, not tested"
        assert outcome == ERROR, second.msg
        while lines() < kill_at and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)  # anywhere within the step: mid-checkpoint, mid-log, mid-eval
        assert proc.poll() is None, f"finished before the kill at step {kill_at} (seed {seed})"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = run_tfd(argv)
    ok = r.code in (0, None)
    record("run folder (distill)", "kill -9 then resume", "tfd distill", RECOVERED if ok else SILENT, r.msg)
    assert ok, (r.msg, seed)
    assert steps_of(stats) == list(range(1, KILL_STEPS + 1)), seed
    assert steps_of(run / "convergence.jsonl") == list(range(0, KILL_STEPS + 1, 2)), seed
    assert json.loads((run / "train.json").read_text())["iters"] == KILL_STEPS
    assert not leftovers(run) and not (run / "train.lock.holder").exists()
    # the table reads the resumed run (sealed records, the record ends at the last step)
    from tfd.tables import read_convergence
    assert len(read_convergence(run, last_step=KILL_STEPS)) == KILL_STEPS // 2 + 1


def test_unwritable_output_folder(world, tmp_path):
    """An output folder that cannot be written (a file in its way; as non-root also a read-only
    folder): one line naming it, no temporary files left."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    cases = [(["distill", *world["c"], "--no-progress", "--run", "tfd", "--teacher", world["teacher"],
               "--out-dir", blocker, "--steps", 1], "distill", str(blocker)),
             (["sample", *world["c"], "--no-progress", "--run", "onestep_init", "--teacher", world["teacher"],
               "--num", 2, "--out", blocker / "s.npz"], "sample", str(blocker)),
             (_score(world, world["samples"], world["ref"], world["fnet"], blocker / "m"), "score", str(blocker)),
             (["merge-samples", *world["c"], "--out", blocker / "x.npz", *world["shards"]], "merge-samples",
              str(blocker))]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases.append((["merge-samples", *world["c"], "--out", ro / "x.npz", *world["shards"]], "merge-samples",
                      str(ro)))
    for argv, cmd, name in cases:
        r = run_tfd(argv)
        outcome = classify(r, cmd, [name], [])
        record("output folder", "unwritable", f"tfd {cmd}", outcome, r.msg)
        assert outcome == ERROR, r.msg
    assert blocker.read_text() == "a file where a folder should be"
    assert not leftovers(tmp_path)


def test_previous_outputs_untouched_by_a_failed_stage(world, tmp_path):
    """Scoring with damaged reference statistics into a folder of earlier metric files leaves them
    byte for byte; a failed merge leaves the earlier merged file."""
    out = copy(world["run"] / "metrics", tmp_path / "m")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ref = copy(world["ref"], tmp_path / "ref.npz")
    cut_half(ref, world)
    r = run_tfd(_score(world, world["samples"], ref, world["fnet"], out))
    assert classify(r, "score", [str(ref)], []) == ERROR, r.msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    merged = copy(world["samples"], tmp_path / "samples.npz")
    shard = copy(world["shards"][1], tmp_path / "shard1of2.npz")
    flip(shard, world)
    r = run_tfd(["merge-samples", *world["c"], "--out", merged, world["shards"][0], shard])
    assert classify(r, "merge-samples", [str(shard)], []) == ERROR, r.msg
    assert merged.read_bytes() == world["samples"].read_bytes()
    record("previous output", "stage failed", "tfd score / merge-samples", ERROR)


# ------------------------------------------------------------------------------------------------
# the counts


def test_zz_summary():
    """Counts over the module (`pytest -s` prints them): faults tried, one-line errors naming the
    cause (or recovered checkpoints), silent results; no claimed fault may go unnoticed."""
    if not RESULTS:
        pytest.skip("no fault case ran in this session")
    claimed = [r for r in RESULTS if r["claimed"]]
    named = [r for r in RESULTS if r["outcome"] in (ERROR, RECOVERED)]
    silent = [r for r in RESULTS if r["outcome"] == SILENT]
    other = [r for r in RESULTS if r["outcome"] not in (ERROR, RECOVERED, SILENT)]
    print(f"\n\nfault suite: {len(RESULTS)} faults tried, {len(named)} detected with a one-line error naming the "
          f"cause (or recovered, for checkpoints), {len(silent)} silent, {len(other)} other "
          f"(tracebacks / errors not naming the file); {len(RESULTS) - len(claimed)} known gaps (xfail)")
    file_faults = ["half", "zero", "flip", "digit", "foreign", "swap"]
    table: dict[tuple[str, str], dict[str, str]] = {}
    for r in RESULTS:
        if r["fault"] in file_faults:
            cell = table.setdefault((r["ftype"], r["stage"]), {})
            cell[r["fault"]] = "ok" if r["outcome"] in (ERROR, RECOVERED) else r["outcome"]
    width = max(len(f"{a} -> {b}") for a, b in table) if table else 20
    print(f"\n{'file type -> stage that reads it':<{width}}  " + "  ".join(f"{f:<7}" for f in file_faults))
    for (ftype, stage), cells in table.items():
        print(f"{ftype + ' -> ' + stage:<{width}}  " + "  ".join(f"{cells.get(f, '-'):<7}" for f in file_faults))
    print("\nother faults:")
    for r in RESULTS:
        if r["fault"] not in file_faults:
            ok = "ok" if r["outcome"] in (ERROR, RECOVERED) else r["outcome"]
            print(f"  {ok:<4} {r['ftype']}: {r['fault']} -> {r['stage']}")
    for r in silent + other:
        print(f"  {r['outcome']}: {r['ftype']} / {r['fault']} / {r['stage']}: {r['msg'][:200]}")
    assert not [r for r in claimed if r["outcome"] == SILENT], "a claimed fault went unnoticed"
