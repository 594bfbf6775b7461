"""Teacher-Feature Drifting (TFD, Zhang et al. 2026): drifting loss + anchor-margin coverage loss
computed in the frozen teacher's hidden features (Algorithm 1, Eqs. 9-15)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tfd.losses import anchor_margin_loss, drifting_loss
from tfd.methods import Method, StepOutput, generator_input, register


@dataclass
class TFDParams:
    layers: list[str] = field(default_factory=lambda: ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"])
    radii: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2])
    groups_per_rank: int = 10         # G conditions per step on each process (global: G x world size)
    n_gen: int = 4                    # Ng generated per condition
    n_pos: int = 4                    # Np positives per condition
    n_anchor: int = 4                 # Na anchors per condition
    feature_noise: float = 0.1        # level: sigma_f <= level; 0 = clean features (Eq. 8)
    noise_mode: Literal["lognormal", "fixed"] = "lognormal"
    noise_min: float = 0.02
    noise_P_mean: float = -1.2
    noise_P_std: float = 1.2
    pool: int = 4                     # average-pool kernel (= stride), clamped to the map size
    lambda_anchor: float = 1.0
    anchor_alpha: float = 0.5
    anchor_temperature: float = 1.0
    normalization: Literal["double", "paper"] = "double"
    generator_sigma: Optional[float] = None   # generator's input noise level; None: the teacher's sigma_max
    generator_timestep: Optional[int] = None  # discrete teachers (SDXL): input at this timestep (DMD2: 399)


def feature_sigmas(p: TFDParams, G: int, device) -> torch.Tensor:
    """One feature-noise sigma per group (tfd-method.md): LogNormal(P_mean, P_std) truncated to
    [noise_min, level] by inverse-CDF sampling; `fixed` gives `level`; level 0 gives 0 (clean)."""
    if p.feature_noise <= 0:
        return torch.zeros(G, device=device)
    if p.noise_mode == "fixed" or p.feature_noise <= p.noise_min:
        return torch.full((G,), p.feature_noise, device=device)
    ndtr = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    lo = ndtr((math.log(p.noise_min) - p.noise_P_mean) / p.noise_P_std)
    hi = ndtr((math.log(p.feature_noise) - p.noise_P_mean) / p.noise_P_std)
    u = lo + (hi - lo) * torch.rand(G, dtype=torch.float64)
    return (p.noise_P_mean + p.noise_P_std * torch.special.ndtri(u)).exp().float().to(device)


def pooled(h: torch.Tensor, k: int) -> torch.Tensor:
    """k x k average pooling with stride k (clamped to the map size), then one flat vector per sample."""
    k = max(1, min(k, h.shape[-1], h.shape[-2]))
    return F.avg_pool2d(h.float(), k).flatten(1)


@register("tfd")
class TFD(Method):
    Params = TFDParams

    def __init__(self, teacher, data, params: TFDParams, device="cpu"):
        super().__init__(teacher, data, params, device)
        self.generator = teacher.copy()

    def networks(self):
        return {"generator": self.generator}

    def make_batch(self):
        """All of a step's randomness: conditions, real positives + anchors, generator noise `z`,
        one feature sigma per group and the feature noise `xi` (so `train_step` is a pure function
        of the batch and the weights, and a batch can be split across ranks exactly)."""
        p = self.params
        G, Ng, Nr = p.groups_per_rank, p.n_gen, p.n_pos + p.n_anchor
        ref, cond = self.data.sample(G, Nr)
        shape = ref.shape[2:]
        return {"cond": cond.to(self.device), "ref": ref.to(self.device),
                "z": torch.randn([G, Ng, *shape], device=self.device),
                "sigma_f": feature_sigmas(p, G, self.device),
                "xi_gen": torch.randn([G, Ng, *shape], device=self.device),
                "xi_ref": torch.randn([G, Nr, *shape], device=self.device)}

    def teacher_features(self, x, xi, sigma_f, cond):
        """phi_T^l(x, c) = pool(h_T^l(x + sigma_f xi, sigma_f, c)) (Eqs. 9-10); sigma 0 = clean (Eq. 8).
        x, xi `[N, *sample_shape]`, sigma_f `[N]`, cond `[N]` int64 condition ids -> {layer: [N, D_l]}."""
        s = sigma_f.reshape(-1, *([1] * (x.ndim - 1)))
        cond_sigma = s.clamp(min=self.teacher.sigma_min)  # clean features: teacher conditioned at sigma_min
        feats = self.teacher.features(x + s * xi, cond_sigma, cond, self.params.layers)
        return {k: pooled(v, self.params.pool) for k, v in feats.items()}

    def train_step(self, batch, step):
        p = self.params
        cond, ref, sig_g = batch["cond"], batch["ref"], batch["sigma_f"]
        G, Ng, Nr = batch["z"].shape[0], p.n_gen, p.n_pos + p.n_anchor
        cond_gen = cond.repeat_interleave(Ng)
        cond_ref = cond.repeat_interleave(Nr)
        s0, a0 = generator_input(p, self.generator)
        x = self.generator.denoise(batch["z"].flatten(0, 1) * a0, s0, cond_gen)  # x = f_theta(eps, c)
        gen_f = self.teacher_features(x, batch["xi_gen"].flatten(0, 1), sig_g.repeat_interleave(Ng), cond_gen)
        with torch.no_grad():
            ref_f = self.teacher_features(ref.flatten(0, 1), batch["xi_ref"].flatten(0, 1),
                                          sig_g.repeat_interleave(Nr), cond_ref)
        total, metrics = 0.0, {}
        for name in p.layers:
            g = gen_f[name].reshape(G, Ng, -1)
            r = ref_f[name].reshape(G, Nr, -1)
            drift, ds = drifting_loss(g, r[:, :p.n_pos], p.radii, normalization=p.normalization, return_stats=True)
            total = total + drift
            metrics[f"drift/{name}"] = drift.item()
            metrics.update({f"{k}/{name}": float(v) for k, v in ds.items()})
            if p.lambda_anchor > 0 and p.n_anchor > 0:
                anchor, st = anchor_margin_loss(g, r[:, p.n_pos:], alpha=p.anchor_alpha,
                                                temperature=p.anchor_temperature, return_stats=True)
                total = total + p.lambda_anchor * anchor
                metrics[f"anchor/{name}"] = anchor.item()
                metrics[f"anchor_active/{name}"] = float(st["anchor_active"])
        metrics["loss"] = float(total.detach())
        metrics["feature_sigma_mean"] = sig_g.mean().item()
        return StepOutput(losses={"generator": total}, metrics=metrics)
