"""From config to objects: data, conditions, teacher, method, samplers for one named run of a benchmark."""
from __future__ import annotations

from pathlib import Path

import torch

from eval.conditions import ClassConditions
from tfd.config import BenchmarkCfg, ConfigError
from tfd.data import ClassBalancedSampler, digits_arrays, load_edm_zip
from tfd.denoiser import Denoiser, load_denoiser
from tfd.sampling import heun_sampler, one_step_sampler


def load_data(b: BenchmarkCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's real training data: images `[N, C, H, W]` float32 in [-1, 1], labels `[N]` int64."""
    if b.data.kind == "digits":
        x, y = digits_arrays("all")
    else:
        x, y = load_edm_zip(b.data.path)
    return torch.from_numpy(x), torch.from_numpy(y)


def conditions(b: BenchmarkCfg) -> ClassConditions:
    """The benchmark's condition list (sample i of an evaluation gets `conditions[i % len]`)."""
    return ClassConditions(b.num_classes)


def run_nfe(b: BenchmarkCfg, run_name: str) -> int:
    """Network evaluations per sample of a row: `runs.<run>.nfe`, the Heun sampler's, or 1."""
    run = b.runs[run_name]
    if run.nfe is not None:
        return run.nfe
    return run.sampler.nfe if run.method == "heun" else 1


def build_method(b: BenchmarkCfg, run_name: str, teacher: Denoiser, device="cpu", seed: int = 0):
    """The run's `Method` on the benchmark's data, its data sampler seeded by `seed` and the rank."""
    from tfd import dist
    from tfd.methods import get_method

    run = b.runs[run_name]
    x, y = load_data(b)
    data = ClassBalancedSampler(x.to(device), y.to(device),
                                torch.Generator(device="cpu").manual_seed(seed * 1000 + dist.get_rank()),
                                num_conditions=len(conditions(b)) if b.num_classes else None)
    # Networks a method creates (DMD2's GAN head) draw their initial weights from torch's global
    # RNG, which is seeded at random in every new process: seed it, identically on every rank.
    torch.manual_seed(seed)
    return get_method(run.method)(teacher, data, run.params, device=device)


def build_sampler(b: BenchmarkCfg, run_name: str, teacher_path: str | Path, generator_path: str | Path | None,
                  device="cpu"):
    """`sampler(cond, rnd)` for a table row: the teacher's Heun sampler or a trained generator."""
    run = b.runs.get(run_name)
    if run is None:
        raise ConfigError(f"run {run_name!r} is not defined (defined: {sorted(b.runs)})")
    if run.method == "heun":
        return heun_sampler(load_denoiser(teacher_path, device), run.sampler)
    if run.method == "onestep":  # the initial one-step generator: the teacher once at sigma_max
        return one_step_sampler(load_denoiser(teacher_path, device))
    if generator_path is None:
        raise ValueError(f"run {run_name!r} ({run.method}) needs --generator (its exported generator)")
    from tfd.methods import get_method
    gen = load_denoiser(generator_path, device, what="generator")
    return get_method(run.method).sampler_for(gen, run.params)
