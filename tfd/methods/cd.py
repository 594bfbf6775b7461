"""Consistency distillation (Song et al. 2023), after the reference code openai/consistency_models
(`karras_diffusion.py: consistency_losses`, `heun_solver`). Facts: `notes/baselines.md`.

One method `cd` with `metric: l2 | huber` (config rows `cd_l2`, `cd_huber`). The paper's best
metric, LPIPS, needs pretrained VGG/AlexNet weights; L2 and pseudo-Huber are the honest
fallbacks and are named as such.

Step (per sample): n ~ U{0..N-2} on the descending Karras grid (N = 40, 0.002..80, rho 7);
x_t = x + sigma_n z with x a REAL sample; x_hat = one Heun step of the TEACHER's probability-flow
ODE from sigma_n to sigma_{n+1} (the teacher's EDM denoiser); loss
d(f_theta(x_t, sigma_n), stopgrad(f_theta-(x_hat, sigma_{n+1}))), uniform weighting.
- `l2`: mean over pixels of the squared difference (openai `mean_flat(diff ** 2)`).
- `huber`: iCT's pseudo-Huber on the whole sample, sqrt(||a - b||^2 + c^2) - c, with
  c = `huber_c`, or 0.00054 sqrt(C H W) when `huber_c` is 0 (iCT's rule; 0.00432 on 8x8x1).

Consistency function: f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, ln(s)/4, c) with the boundary
scalings c_skip = sd^2 / ((s - smin)^2 + sd^2), c_out = (s - smin) sd / sqrt(s^2 + sd^2),
c_in = 1 / sqrt(s^2 + sd^2), so f(x, smin) = x exactly. F is the denoiser's raw network output
(`Denoiser.raw`: for EDM nets the inner UNet with EDM's own c_in and c_noise = ln(s)/4, which
equal the CM ones); smin, sigma_max and sd are the teacher denoiser's. The student is
initialised with the teacher's raw F (the whole teacher state_dict), as openai/consistency_models
loads the teacher's weights into the student; the teacher's EDM scalings differ from the CM
ones only by O(smin / s) at large s, so the initial one-step generator f(80 z, 80) is the
teacher's one-step output up to ~3e-5 relative.

Target network and resume: theta- (EMA 0.95 of the online weights, updated after every
optimiser step) is the network entry `target` of `networks()`. It never receives a loss, so the
trainer never steps its (empty-state) optimiser, but its weights are in the trainer's checkpoint
and restored strictly on resume. The update theta- <- mu theta- + (1 - mu) theta runs at the START
of every `train_step`, with the online weights left by the previous step's update (step 0: the
target equals the online network, so the update is the identity); a resumed run therefore does
exactly what an uninterrupted one does. The target is kept out of the `generator` module so the
exported generator is a plain denoiser (a submodule would add keys that its `save` would write
and strict loading would reject, and the trainer's EMA would copy it).

Exported generator: the online network (or the trainer's EMA of it) is saved as a denoiser
holding F; its own `denoise` applies EDM's scalings, NOT the consistency function, so
`sampler_for` is overridden: one step x = f(s z, s), s = sigma_max, rebuilt from `raw`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from eval.errors import UserError
from tfd.methods import Method, StepOutput, register
from tfd.sampling import karras_sigmas


@dataclass
class CDParams:
    batch_per_rank: int = 32              # real samples per step per process (conditions drawn by the data sampler)
    metric: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.0                  # pseudo-Huber c; 0: iCT's 0.00054 * sqrt(C*H*W)
    num_scales: int = 40                  # N of the discretisation of the teacher's sigma_min..sigma_max
    rho: float = 7.0
    target_ema: float = 0.95              # mu of the target network theta-


def cm_scalings(sigma: torch.Tensor, sigma_min: float, sigma_data: float):
    """(c_skip, c_out, c_in) of the consistency-model boundary parametrisation."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


def consistency_fn(net, x: torch.Tensor, sigma, cond) -> torch.Tensor:
    """f(x, s) = c_skip x + c_out F(c_in x, ln(s)/4, c) (Song et al. 2023, Eq. 8 with EDM's c_in):
    F = `net.raw` of a `Denoiser`, smin / sd = its sigma_min / sigma_data. x `[N, *sample_shape]`,
    sigma scalar or `[N]`, cond `[N]` int64 condition ids -> float32 like x."""
    x = x.to(torch.float32)
    sigma = net.broadcast_sigma(sigma, x)
    c_skip, c_out, _ = cm_scalings(sigma, net.sigma_min, net.sigma_data)
    return c_skip * x + c_out * net.raw(x, sigma, cond)


def huber_c_default(sample_shape) -> float:
    """iCT's pseudo-Huber constant 0.00054 sqrt(C H W) (0.00432 on 8x8x1)."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def sample_distance(a: torch.Tensor, b: torch.Tensor, metric: str, huber_c: float) -> torch.Tensor:
    """Per-sample distance `[N]`: `l2` the mean over pixels of the squared difference (openai
    `mean_flat(diff ** 2)`), `huber` the pseudo-Huber sqrt(|a - b|^2 + c^2) - c on the whole sample."""
    diff = (a.float() - b.float()).flatten(1)
    if metric == "l2":
        return diff.square().mean(dim=1)
    return (diff.square().sum(dim=1) + huber_c * huber_c).sqrt() - huber_c


@register("cd")
class CD(Method):
    Params = CDParams

    def __init__(self, teacher, data, params: CDParams, device="cpu"):
        super().__init__(teacher, data, params, device)
        p = params
        if p.num_scales < 2:
            raise UserError(f"num_scales must be >= 2, got {p.num_scales}")
        self.online = teacher.copy()
        # Never stepped (no loss is returned for it); requires_grad stays on only because the
        # trainer builds an optimiser per entry and refuses an empty parameter list.
        self.target = teacher.copy()
        self.sigmas = karras_sigmas(p.num_scales, teacher.sigma_min, teacher.sigma_max,
                                    p.rho).float().to(device)  # descending
        self.huber_c = p.huber_c if p.huber_c > 0 else huber_c_default(teacher.sample_shape)

    def networks(self):
        return {"generator": self.online, "target": self.target}

    def make_batch(self):
        """All of a step's randomness (as TFD): real samples and conditions (data sampler's
        generator), the grid index n ~ U{0..N-2} and the noise z (torch's RNG)."""
        x, cond = self.data.sample(self.params.batch_per_rank, 1)
        x = x[:, 0].to(self.device)
        return {"x": x, "cond": cond.to(self.device),
                "n": torch.randint(0, self.params.num_scales - 1, (x.shape[0],), device=self.device),
                "z": torch.randn_like(x)}

    @torch.no_grad()
    def update_target(self) -> None:
        """theta- <- mu theta- + (1 - mu) theta (parameters; buffers copied)."""
        mu = self.params.target_ema
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.lerp_(po.detach(), 1 - mu)
        for bt, bo in zip(self.target.buffers(), self.online.buffers()):
            bt.copy_(bo)

    @torch.no_grad()
    def heun_step(self, x, t, t_next, cond):
        """One Heun step of the teacher's PF-ODE dx/ds = (x - D(x; s)) / s from t to t_next (> 0)."""
        d = (x - self.teacher.denoise(x, t, cond)) / t
        x_next = x + (t_next - t) * d
        d2 = (x_next - self.teacher.denoise(x_next, t_next, cond)) / t_next
        return x + (t_next - t) * 0.5 * (d + d2)

    def distance(self, a, b):
        return sample_distance(a, b, self.params.metric, self.huber_c)

    def train_step(self, batch, step):
        self.update_target()  # uses the online weights left by the previous step's update
        x0, cond, n = batch["x"], batch["cond"], batch["n"]
        t = self.sigmas[n].reshape(-1, 1, 1, 1)
        t2 = self.sigmas[n + 1].reshape(-1, 1, 1, 1)
        x_t = x0 + t * batch["z"]
        pred = consistency_fn(self.online, x_t, t, cond)
        with torch.no_grad():
            x_hat = self.heun_step(x_t, t, t2, cond)
            target = consistency_fn(self.target, x_hat, t2, cond)
        loss = self.distance(pred, target).mean()
        return StepOutput(losses={"generator": loss},
                          metrics={"loss": loss.item(), "sigma_mean": t.mean().item()})

    def generate(self, z, cond):
        """One step x = f(s z, s) of the online network, s = its sigma_max (as `sampler_for`)."""
        s = float(self.online.sigma_max)
        return consistency_fn(self.online, z * s, s, cond)

    @classmethod
    def sampler_for(cls, generator, params):
        """One step x = f(s z, s), s = the generator's sigma_max, from an exported generator
        (a `Denoiser` holding F), decoded to pixels."""
        s = float(generator.sigma_max)

        @torch.no_grad()
        def sample(cond, rnd):
            z = rnd.randn(generator.sample_shape)
            return generator.decode(consistency_fn(generator, z * s, s, cond))
        return sample
