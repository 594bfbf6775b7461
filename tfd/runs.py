"""From config to objects: data, conditions, teacher, method, samplers for one named run of a benchmark."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from eval.conditions import ClassConditions, PromptTable, load_prompt_table
from eval.errors import BadFile, UserError
from tfd.config import BenchmarkCfg, ConfigError
from tfd.data import ClassBalancedSampler, StoreSampler, dequantise_u8, digits_arrays, load_edm_zip, shapes_arrays
from tfd.denoiser import Denoiser, load_denoiser
from tfd.sampling import heun_sampler, one_step_sampler


def load_data(b: BenchmarkCfg, data_store: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's real training data in memory: images `[N, C, H, W]` float32 in [-1, 1], labels
    `[N]` int64. An `edm_zip` is read from its dataset store `data_store` when given (converted in
    chunks of rows, bit-identical to decoding the zip: `tfd.data.dequantise_u8`), else decoded whole
    from the zip. Training that needs only batches should not hold it all: `build_method` samples
    the store row by row."""
    if data_store is not None:
        store = open_data_store(b, data_store)
        n, (h, w, c) = len(store.images), store.images.shape[1:]
        x = torch.empty((n, c, h, w), dtype=torch.float32)
        for lo in range(0, n, 4096):
            x[lo:lo + 4096] = dequantise_u8(torch.from_numpy(np.array(store.images[lo:lo + 4096])))
        return x, torch.from_numpy(store.labels.copy())
    if b.data.kind == "digits":
        x, y = digits_arrays("all")
    elif b.data.kind == "shapes":
        x, y = shapes_arrays("all")
    else:
        x, y = load_edm_zip(b.data.path)
    return torch.from_numpy(x), torch.from_numpy(y)


def open_data_store(b: BenchmarkCfg, path: str | Path):
    """The dataset store at `path` (`tfd.datastore`, made by `tfd prepare-data` from `data.path`),
    checked to be benchmark `b`'s: `data.kind` edm_zip, its image size and channels, and (cheaply)
    the size of the configured zip. ConfigError for another data kind; BadFile naming the store."""
    from tfd.datastore import check_store_fits, open_store
    if b.data.kind != "edm_zip":
        raise ConfigError(f"a dataset store holds an EDM zip's images, but this benchmark's data.kind is "
                          f"{b.data.kind!r}: drop --data-store")
    store = open_store(path)
    check_store_fits(store, b.data.path, b.resolution, b.channels)
    return store


def conditions(b: BenchmarkCfg, prompts: str | Path | PromptTable | None = None) -> ClassConditions | PromptTable:
    """The benchmark's condition list (sample i of an evaluation gets `conditions[i % len]`): its
    classes, or for a text benchmark the prompt table `prompts` (a file made by `tfd prompts`, or
    a table). ConfigError when a text benchmark is given no prompt table."""
    if b.task != "text":
        return ClassConditions(b.num_classes)
    if prompts is None:
        raise ConfigError("a text-to-image benchmark needs its prompt table: pass --prompts FILE "
                          "(results/<bench>/prompts.jsonl, made by `tfd prompts` / rule prompts)")
    return prompts if isinstance(prompts, PromptTable) else load_prompt_table(prompts)


def sample_spec(b: BenchmarkCfg, num_samples: int | None = None):
    """The `eval.sample.SampleSpec` of benchmark `b`'s sample files: `num_samples` (default
    `eval.num_samples`) images with seeds from `eval.base_seed`, `channels`; for a class benchmark
    also the resolution and the class ids `0 .. num_classes - 1` (text benchmarks: images at the
    sampler's resolution, condition ids are prompt ids checked against the prompt table)."""
    from eval.sample import SampleSpec
    text = b.task == "text"
    return SampleSpec(num_samples=num_samples if num_samples is not None else b.eval.num_samples,
                      base_seed=b.eval.base_seed, channels=b.channels,
                      resolution=None if text else b.resolution,
                      num_conditions=None if text or not b.num_classes else b.num_classes)


def check_denoiser(net: Denoiser, b: BenchmarkCfg, path: str | Path, what: str) -> Denoiser:
    """Refuse a network that does not fit class benchmark `b`: `BadFile` naming the file (`what`:
    teacher / generator) with the expected vs found channels, resolution and number of classes
    (`Denoiser.sample_shape`, `num_conditions`). Text benchmarks' latent networks are checked by
    their loader. Returns `net`."""
    if b.task == "text":
        return net
    want = (b.channels, b.resolution, b.resolution)
    shape = tuple(getattr(net, "sample_shape", want))
    if shape != want:
        raise BadFile(path, f"{what} does not fit the benchmark",
                      expected=f"channels x resolution {want[0]}x{want[1]}x{want[2]}",
                      found=f"{shape[0]}x{shape[1]}x{shape[2]}")
    classes = getattr(net, "num_conditions", b.num_classes)
    if classes != b.num_classes:
        raise BadFile(path, f"{what} does not fit the benchmark", expected=f"{b.num_classes} classes",
                      found=f"{classes}")
    return net


def load_teacher(b: BenchmarkCfg, path: str | Path, device="cpu", prompts: PromptTable | None = None) -> Denoiser:
    """The benchmark's frozen teacher as a `Denoiser`: an EDM-format file, or for a text benchmark
    a local diffusers StableDiffusionXLPipeline folder (`tfd.diffusers_denoiser`, UNet weights in
    `teacher.precision`) with the prompt table bound to its condition ids."""
    if b.task != "text":
        return check_denoiser(load_denoiser(path, device), b, path, "teacher")
    from tfd.diffusers_denoiser import load_diffusers_denoiser
    dtype = torch.bfloat16 if b.teacher.precision == "bf16" else torch.float32
    return load_diffusers_denoiser(path, prompts=prompts, device=device, dtype=dtype)


def run_nfe(b: BenchmarkCfg, run_name: str) -> int:
    """Network evaluations per sample of a row (the paper's FP: a guided step counts two forward
    passes): `runs.<run>.nfe`, the Heun or pipeline sampler's, a trained generator's method's
    `nfe(params)` (a few-step student: its number of steps), or 1."""
    run = b.runs[run_name]
    if run.nfe is not None:
        return run.nfe
    if run.method == "heun":
        guided = run.sampler.guidance not in (None, 1)
        return run.sampler.nfe * (2 if guided else 1)
    if run.method == "pipeline":
        return run.sampler.nfe
    if run.trains:
        from tfd.methods import get_method
        return get_method(run.method).nfe(run.params)
    return 1


def build_method(b: BenchmarkCfg, run_name: str, teacher: Denoiser, device="cpu", seed: int = 0,
                 positives: str | Path | None = None, pairs: str | Path | None = None,
                 teacher_sha256: str | None = None, data_store: str | Path | None = None):
    """The run's `Method` on the benchmark's data, its data sampler seeded by `seed` and the rank,
    with its generator-loss add-ons (`runs.<run>.addons`). A class benchmark's data: the dataset
    store `data_store` (`StoreSampler`: rows read as drawn), else `load_data` in memory; both draw
    the same batches.

    A text benchmark's data is its positives cache (`positives`, made by `tfd.positives`; the
    teacher must have the cache's training prompt table bound); ConfigError without one. A method
    with `needs_pairs` (DMD) gets its teacher pairs cache `pairs` (`tfd.pairs`), checked against the
    run's pair settings, the teacher (`teacher_sha256`, when given) and the benchmark."""
    from tfd import dist
    from tfd.methods import get_method

    run = b.runs[run_name]
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + dist.get_rank())
    if b.task == "text":
        if positives is None:
            raise ConfigError(f"run {run_name!r}: distillation on a text-to-image benchmark needs its positives "
                              "cache (--positives results/<bench>/positives/<key>/positives.safetensors, "
                              "rule merge_positives)")
        from tfd.positives import PositivesSampler
        data = PositivesSampler.from_file(positives, gen, device)
    elif data_store is not None:
        data = StoreSampler(open_data_store(b, data_store), gen, device=device,
                            num_conditions=len(conditions(b)) if b.num_classes else None)
    else:
        x, y = load_data(b)
        data = ClassBalancedSampler(x.to(device), y.to(device), gen,
                                    num_conditions=len(conditions(b)) if b.num_classes else None)
    # Networks a method creates (DMD2's GAN head) draw their initial weights from torch's global
    # RNG, which is seeded at random in every new process: seed it, identically on every rank.
    torch.manual_seed(seed)
    cls = get_method(run.method)
    kw = {}
    if getattr(cls, "needs_pairs", False):
        from tfd.pairs import load_pairs, pairs_key, pairs_settings
        if pairs is None:
            raise ConfigError(f"run {run_name!r} ({run.method}) needs its teacher pairs: pass --pairs "
                              "results/<bench>/pairs/<key>/pairs.safetensors (rules teacher_pairs + "
                              "merge_teacher_pairs)")
        kw["pairs"], _ = load_pairs(pairs, key=pairs_key(pairs_settings(run.params)), teacher_sha256=teacher_sha256,
                                    sample_shape=teacher.sample_shape,
                                    num_conditions=len(conditions(b)) if b.task != "text" else None)
    method = cls(teacher, data, run.params, device=device, **kw)
    from tfd.addons import build_addons  # generator-loss add-ons (runs.<run>.addons), applied by the trainer
    method.addons = build_addons(run.addons, teacher.sample_shape, device)
    return method


def build_sampler(b: BenchmarkCfg, run_name: str, teacher_path: str | Path, generator_path: str | Path | None,
                  device="cpu", prompts: PromptTable | None = None):
    """`sampler(cond, rnd)` for a table row: the teacher's Heun sampler, the teacher once at
    sigma_max, diffusers' own pipeline (text benchmarks: teacher and published rows) or a trained
    generator. `prompts`: the prompt table of a text benchmark."""
    run = b.runs.get(run_name)
    if run is None:
        raise ConfigError(f"run {run_name!r} is not defined (defined: {sorted(b.runs)})")
    if run.reported:
        raise UserError(f"run {run_name!r} is a 'reported' row (the paper's numbers only): it has no sampler")
    if run.method == "pipeline":
        from tfd.pipeline_sampler import pipeline_sampler
        return pipeline_sampler(teacher_path, run.sampler, prompts, device=device,
                                resolution=run.sampler.resolution or b.resolution)
    if run.method == "heun":
        return heun_sampler(load_teacher(b, teacher_path, device, prompts), run.sampler)
    if run.method == "onestep":  # the initial one-step generator: the teacher once at sigma_max
        return one_step_sampler(load_teacher(b, teacher_path, device, prompts))
    if generator_path is None:
        raise UserError(f"run {run_name!r} ({run.method}) needs --generator (its exported generator)")
    from tfd.methods import get_method
    gen = check_denoiser(load_denoiser(generator_path, device, what="generator"), b, generator_path, "generator")
    if b.task == "text":
        gen.bind_prompts(prompts)
    return get_method(run.method).sampler_for(gen, run.params)
