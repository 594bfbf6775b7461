"""Samplers: EDM's Heun sampler with churn (Karras et al. 2022, Alg. 2) and one-step generators.

A sampler is called as `sampler(cond, rnd) -> images in [-1, 1]`: `cond` int64 `[N]` condition
ids (see `eval.conditions`), `rnd` draws per-image random numbers (`rnd.randn([N, ...])` with row
i from image i's own seed), so every image depends only on its seed, never on the batch it was
drawn in. Shapes and noise ranges come from the denoiser (`sample_shape`, `sigma_min/max`), and
samples are decoded to pixels (`Denoiser.decode`) before they are returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from eval.sample import StackedRandom  # noqa: F401


@dataclass
class HeunCfg:
    """EDM's Heun sampler settings (Karras et al. 2022, Alg. 2); `sigma_min/max` None: the
    teacher denoiser's range (EDM nets: 0.002..80); `guidance` None: no classifier-free guidance."""
    steps: int = 18
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    guidance: Optional[float] = None

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1  # Heun correction skipped on the last step


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Descending Karras et al. (2022) Eq. 5 discretisation, `n` levels from sigma_max to sigma_min (float64)."""
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def edm_sampler(denoise, cond, rnd: StackedRandom, shape, cfg: HeunCfg, sigma_min: float = 0.002,
                sigma_max: float = 80.0) -> torch.Tensor:
    """EDM stochastic Heun sampler (Karras et al. 2022, Algorithm 2); `S_churn=0` is the ODE.

    `denoise(x, sigma, cond)` an EDM-convention denoiser, cond `[N]` condition ids, `shape` one
    sample's shape; `cfg.sigma_min/max` override the given range. Returns float32 `[N, *shape]`."""
    lo = cfg.sigma_min if cfg.sigma_min is not None else sigma_min
    hi = cfg.sigma_max if cfg.sigma_max is not None else sigma_max
    t = karras_sigmas(cfg.steps, lo, hi, cfg.rho)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = rnd.randn(shape).double() * t[0]
    for i in range(cfg.steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(cfg.S_churn / cfg.steps, math.sqrt(2) - 1) if cfg.S_min <= t_cur <= cfg.S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise * rnd.randn(shape).double()
        d = (x - denoise(x.float(), float(t_hat), cond).double()) / t_hat
        x_next = x + (t_next - t_hat) * d
        if i < cfg.steps - 1:
            d2 = (x_next - denoise(x_next.float(), float(t_next), cond).double()) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.float()


def heun_sampler(teacher, cfg: HeunCfg):
    """`sampler(cond, rnd)` running the EDM Heun sampler on `teacher.denoise` (with `cfg.guidance`)
    over the teacher's noise range and sample shape, decoded to pixels."""
    def denoise(x, sigma, cond):
        return teacher.denoise(x, sigma, cond, guidance=cfg.guidance)

    def sample(cond, rnd):
        x = edm_sampler(denoise, cond, rnd, teacher.sample_shape, cfg, teacher.sigma_min, teacher.sigma_max)
        return teacher.decode(x)
    return sample


def one_step_sampler(generator, sigma: float | None = None, scale: float | None = None):
    """`sampler(cond, rnd)` for a one-step generator `x = D(a z; s, c)`, z ~ N(0, I) of the
    generator's `sample_shape`, at input noise level `s` (default: its `sigma_max`) with input
    scale `a` (default `s`, EDM; DMD2's SDXL timestep input uses sqrt(s^2 + 1)), decoded."""
    s = float(generator.sigma_max if sigma is None else sigma)
    a = s if scale is None else float(scale)

    @torch.no_grad()
    def sample(cond, rnd):
        z = rnd.randn(generator.sample_shape)
        return generator.decode(generator.denoise(z * a, s, cond))
    return sample
