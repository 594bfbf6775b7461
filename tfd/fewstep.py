"""Few-step students: noise schedules, the sampler, and DMD2's backward simulation.

A few-step student is one `Denoiser` G called N times on a descending list of noise levels
`sigmas = [s_0, ..., s_{N-1}]` (EDM sigmas, s_0 the pure-noise input level):

    x = a z                                  (a = s_0, or DMD2's SDXL timestep input scale)
    for i in 0 .. N-1:
        x0 = G(x; s_i, c)
        x = next_state(x, x0, s_i, s_{i+1})  (not after the last step: it returns x0)

with one of two step rules:
- `renoise` (DMD2's multi-step sampler, tianweiy/DMD2 `sample_backward` / SDXL inference):
  `x = x0 + s_{i+1} * fresh noise` -- the x0 prediction re-noised with new Gaussian noise;
- `euler` (DP-DMD's student: diffusers FlowMatchEulerDiscreteScheduler.step in the official
  code): the deterministic Euler/DDIM step `x = x0 + s_{i+1} (x - x0) / s_i` (in flow form
  `z' = z + (t' - t) v`; the same step written with EDM sigmas).

N = 1 is exactly the one-step generator `x = G(a z; s_0, c)` (same operations, same noise draw).

Default schedules (`dmd2_sigmas`, `dpdmd_sigmas`):
- DMD2: its few-step timesteps `range(999, 0, -(1000 // N))` (`denoising_step_list` in DMD2's
  `sd_unified_model.py`; N = 4: t = 999/749/499/249, its SDXL 4-step model) translated to EDM
  sigmas through Stable Diffusion's scaled-linear noise schedule, sigma_t = sqrt((1 - abar_t) /
  abar_t) (notes/sdxl-adapter.md: 14.615 / 4.082 / 1.613 / 0.693). The first entry (t = 999, SD's
  pure-noise level) is replaced by the generator's own input level (EDM nets: sigma_max = 80). So
  N = 4 gives [80, 4.082, 1.613, 0.693]. Keeping DMD2's sigma values (rather than its SNRs) on a
  pixel teacher with sigma_data 0.5 is OUR choice; `student_sigmas` overrides the list.
- DP-DMD: the official code's student schedule, SD3 FlowMatchEuler with 4 steps and shift 3:
  flow t = 1, 0.857, 0.601, 0.003 (notes/dpdmd-el.md), translated to EDM sigmas by
  sigma = t / (1 - t): [sigma_max, 6.0, 1.51, 0.003]. Only N = 4 is given by the paper/code; for
  other N this module spaces flow times the same way (linspace(1, 0.001, N), shift 3) -- ours.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# -- schedules ------------------------------------------------------------------------------------

def sd_sigma(t: int) -> float:
    """EDM sigma of Stable Diffusion's (and SDXL's) discrete timestep t: scaled-linear betas
    linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar = cumprod(1 - beta), sigma = sqrt((1-abar)/abar)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[int(t)]
    return float(((1 - abar) / abar).sqrt())


def dmd2_timesteps(n: int) -> list[int]:
    """DMD2's `denoising_step_list` for n steps: range(999, 0, -(1000 // n)) (n = 4: 999/749/499/249)."""
    return list(range(999, 0, -(1000 // n)))[:n]


def dmd2_sigmas(n: int, first: float) -> list[float]:
    """DMD2's n-step schedule as EDM sigmas (module docstring): `first`, then sigma_t of
    `dmd2_timesteps(n)[1:]` on SD's schedule. n = 4, first = 80: [80, 4.082, 1.613, 0.693]."""
    return [float(first)] + [sd_sigma(t) for t in dmd2_timesteps(n)[1:]]


def dpdmd_sigmas(n: int, first: float, shift: float = 3.0) -> list[float]:
    """DP-DMD's student schedule (module docstring): flow times linspace(1, 0.001, n) shifted by
    `shift` (SD3: 3), each t < 1 mapped to the EDM sigma t / (1 - t); t = 1 becomes `first`.
    n = 4: [first, 6.01, 1.51, 0.003]."""
    out = [float(first)]
    for i in range(1, n):
        s = 1.0 + i / (n - 1) * (0.001 - 1.0)
        t = shift * s / (1 + (shift - 1) * s)
        out.append(t / (1 - t))
    return out


def check_sigmas(sigmas: Sequence[float], num_steps: int, key: str = "student_sigmas") -> None:
    """ValueError naming `key` unless `sigmas` has `num_steps` positive, strictly descending entries."""
    s = list(sigmas)
    if len(s) != num_steps:
        raise ValueError(f"{key} has {len(s)} entries but num_steps is {num_steps} (one sigma per step)")
    if any(not (v > 0 and math.isfinite(v)) for v in s):
        raise ValueError(f"{key} must be positive and finite, got {s}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"{key} must be strictly descending (the first is the pure-noise input), got {s}")


# -- the sampler ----------------------------------------------------------------------------------

def next_state(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, rule: str,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The input of the next student step at `sigma_next` (module docstring): `renoise`:
    x0 + sigma_next * noise; `euler`: x0 + sigma_next * (x - x0) / sigma."""
    if rule == "renoise":
        return x0 + sigma_next * noise
    if rule == "euler":
        return x0 + sigma_next * ((x - x0) / sigma)
    raise ValueError(f"unknown step rule {rule!r} (renoise | euler)")


def rollout(generator, x: torch.Tensor, cond: torch.Tensor, sigmas: Sequence[float], rule: str,
            noises=None, detach_after: Optional[int] = None):
    """Run the student from its first input `x` (already scaled, `a z`) over `sigmas`; returns
    (final x0, list of each step's x0). `noises(i)` gives the re-noising noise of step i (rule
    `renoise`). `detach_after=j`: the state handed on after step j is detached (DP-DMD: j = 0)."""
    outs = []
    for i, s in enumerate(sigmas):
        x0 = generator.denoise(x, s, cond)
        outs.append(x0)
        if i + 1 < len(sigmas):
            x = next_state(x, x0, s, sigmas[i + 1], rule, noises(i) if rule == "renoise" else None)
            if detach_after is not None and i == detach_after:
                x = x.detach()
    return outs[-1], outs


def few_step_sampler(generator, sigmas: Sequence[float], scale: Optional[float] = None, rule: str = "renoise"):
    """`sampler(cond, rnd)` for an N-step student (module docstring): z from `rnd` (image i's own
    seed), the first input `a z` (a = `scale`, default sigmas[0]), fresh noise for each `renoise`
    step drawn from `rnd` too. N = 1 is `tfd.sampling.one_step_sampler` bitwise."""
    sig = [float(s) for s in sigmas]
    a = sig[0] if scale is None else float(scale)

    @torch.no_grad()
    def sample(cond, rnd):
        z = rnd.randn(generator.sample_shape)
        x0, _ = rollout(generator, z * a, cond, sig, rule, noises=lambda i: rnd.randn(generator.sample_shape))
        return generator.decode(x0)
    return sample
