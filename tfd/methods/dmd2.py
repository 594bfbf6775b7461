"""DMD2 (Yin et al. 2024a, "Improved Distribution Matching Distillation"), after the reference
code tianweiy/DMD2 `main/edm` (ImageNet-64 with an EDM teacher). Facts: `notes/baselines.md`.

Networks
- `generator`: a trainable copy of the teacher (`Denoiser.copy()`), run once as
  `x = G(s z; s, c)` at the input noise level `s = generator_sigma` (default: the teacher's
  sigma_max, 80 for EDM nets; DMD2's SDXL generator runs at conditioning timestep 399).
- `fake_score`: a `FakeScore` module = `net` (a trainable copy of the teacher, a `Denoiser`)
  + `head` (the GAN classifier, `None` without GAN).
  The head is part of this entry so the trainer steps it with the fake score (one optimiser),
  as DMD2's guidance optimiser holds `fake_unet` and `cls_pred_branch` together.
- real score: the frozen teacher (`self.teacher`).

Few steps (`num_steps` N > 1, row `dmd2_4step`): DMD2's multi-step generator (tfd/fewstep.py). The
generator runs N times on `student_sigmas` (default: DMD2's N-step timesteps range(999, 0, -1000 // N)
as EDM sigmas, the first replaced by the input level: N = 4 gives [80, 4.08, 1.61, 0.69]), re-noising
each x0 prediction with fresh noise; evaluation uses `few_step_sampler` and the tables count N
forward passes. Training uses DMD2's backward simulation (`sample_backward` in DMD2's
`sd_unified_model.py`): one step k ~ U{0..N-1} per batch; the generator's input at step k is its OWN
k-step rollout from independent noise (no gradient), x0_{k-1} re-noised with `z` at s_k (k = 0: pure
noise), and the DM/GAN losses are applied to G(input; s_k). N = 1 (default) is the one-step generator
exactly: same random draws, same operations.

One method `dmd2` with `gan: bool`: `gan: true` is DMD2 (config row `dmd2`), `gan: false` is
DMD2 without the GAN term (config row `dmd2_nogan`: distribution matching + two time-scale
update only).

Two time-scale update: `train_step(batch, step)` returns the fake-score loss every step and the
generator loss only when `step % dfake_gen_update_ratio == 0`; the trainer steps only the
networks whose loss is returned. The `generator` loss is listed FIRST: the trainer back-propagates
and steps the losses in dict order, and the generator's GAN term runs through the fake score's
weights, which must not yet have been modified in place by the fake-score optimiser step (DMD2's
loop also updates the generator first, then trains the fake score on the same generated batch).
The generator's GAN term runs through the fake score with its parameters trainable (never toggled:
gradient checkpointing recomputes that forward in backward and must see the same graph); the
trainer back-propagates each loss into its own network's parameters only (`backward(inputs=...)`,
`Trainer._step_network`), so the generator loss puts no gradient into the fake score. (DMD2's
reference lets the gradient reach the guidance model and zeroes it after the generator step.)

GAN head on small maps: DMD2's head (768-channel 8x8 map) is Conv(k4, s2, p1) -> GroupNorm(32)
-> SiLU -> Conv(k4, s4) -> GroupNorm(32) -> SiLU -> Conv(k1) -> logit. Here the second kernel
(and stride) is clamped to the map size left after the first conv (8x8: 4 exactly as DMD2; the
2x2 bottleneck of the digits teacher: 2x2 -> 1x1 after the first conv, then a 1x1 conv), a
1x1 input map uses a 1x1 first conv, any spatial remainder is averaged, and the group count is
the largest divisor of C not above min(32, C // 4) (EDM's rule of at least 4 channels per
group; 768 ch -> 32 groups as DMD2; on a 1x1 map GroupNorm with one channel per group would
zero the signal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import UserError
from tfd.fewstep import check_sigmas, dmd2_sigmas, few_step_sampler, next_state
from tfd.methods import Method, StepOutput, generator_input, register
from tfd.sampling import karras_sigmas


@dataclass
class DMD2Params:
    batch_per_rank: int = 40              # generated samples per step per process; real GAN batch, too
    gan: bool = True                      # True: DMD2; False: DMD2 without GAN (row dmd2_nogan)
    dfake_gen_update_ratio: int = 5       # generator updated when step % ratio == 0
    num_train_timesteps: int = 1000       # Karras grid size for all noise levels
    min_step_percent: float = 0.02        # DM loss: i ~ U{int(0.02*1000) .. int(0.98*1000)} = U{20..980}
    max_step_percent: float = 0.98
    rho: float = 7.0                      # grid over the teacher's sigma_min..sigma_max (EDM nets: 0.002..80)
    generator_sigma: Optional[float] = None   # generator's input noise level; None: the teacher's sigma_max
    generator_timestep: Optional[int] = None  # discrete teachers (SDXL): input at this timestep (DMD2 SDXL: 399)
    real_guidance: Optional[float] = None     # real score's classifier-free guidance (DMD2 SDXL: 8); fake: none
    sigma_grid: Literal["karras", "discrete"] = "karras"   # noise levels: EDM Karras grid, or the teacher's
                                                           # own discrete timesteps (DMD2 SDXL: DDPM t)
    fake_loss: Literal["edm", "epsilon"] = "edm"  # fake-score weighting: EDM (s^-2 + sd^-2), or
                                                  # epsilon-MSE (s^-2; DMD2 SDXL's fake-UNet loss)
    gan_weight_d: float = 1e-2            # fake score (discriminator) GAN loss weight
    gan_weight_g: float = 3e-3            # generator GAN loss weight
    gan_layer: str = "bottleneck"         # fake score layer the head reads (DMD2: enc 8x8_block2)
    # options added after runs were made: at these values they leave run specs and checkpoints as they were
    NEW_DEFAULTS: ClassVar[dict] = {"num_steps": 1, "student_sigmas": None}
    num_steps: int = 1                    # few-step student (tfd/fewstep.py): N generator calls per sample
    student_sigmas: Optional[list[float]] = None  # its N input noise levels, descending; None: DMD2's
                                                  # N-step timesteps as EDM sigmas (N = 4: [80, 4.08, 1.61, 0.69])

    def __post_init__(self):
        check_student(self)


def check_student(p) -> None:
    """Range checks of a few-step student's `num_steps` / `student_sigmas` (ValueError naming the key)."""
    if p.num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {p.num_steps}")
    if p.student_sigmas is not None:
        check_sigmas(p.student_sigmas, p.num_steps)
        for key in ("generator_sigma", "generator_timestep"):
            if getattr(p, key, None) is not None:
                raise ValueError(f"student_sigmas and {key} both set: student_sigmas[0] is the input noise level, "
                                 f"leave {key} unset")


def student_schedule(p, generator, default=dmd2_sigmas) -> tuple[list[float], float]:
    """(sigmas, scale) of a few-step student: `student_sigmas` with input scale sigmas[0], or
    `default(num_steps, s)` from the one-step input `(s, scale) = generator_input(p, generator)`
    (N = 1: exactly the one-step generator's input)."""
    if p.student_sigmas is not None:
        sig = [float(v) for v in p.student_sigmas]
        return sig, sig[0]
    s, a = generator_input(p, generator)
    return default(p.num_steps, s), a


def _num_groups(c: int) -> int:
    cap = max(1, min(32, c // 4))
    return max(g for g in range(1, cap + 1) if c % g == 0)


class GANHead(nn.Module):
    """DMD2's `cls_pred_branch`, kernels clamped to small maps (module docstring). Returns [N] logits.

    Halving convs (k4, s2, p1) until the map is at most 4 (at least one; DMD2's ImageNet head has
    one for its 8x8 map, its SDXL head three for the 32x32 mid-block map of 128x128 latents), then
    one conv with kernel = stride = min(4, map), then the 1x1 logit conv."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        layers, r = [], resolution
        halvings = max(1, math.ceil(math.log2(resolution / 4))) if resolution >= 2 else 0
        for _ in range(halvings):
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                       nn.GroupNorm(_num_groups(channels), channels), nn.SiLU()]
            r = (r + 2 - 4) // 2 + 1
        if not halvings:  # a 1x1 map: a 1x1 first conv
            layers += [nn.Conv2d(channels, channels, 1), nn.GroupNorm(_num_groups(channels), channels), nn.SiLU()]
        k2 = min(4, r)
        layers += [nn.Conv2d(channels, channels, k2, stride=k2, padding=0),
                   nn.GroupNorm(_num_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float()).mean(dim=(2, 3)).flatten()


class FakeScore(nn.Module):
    """The `fake_score` network entry: `net` (a trainable `Denoiser`) plus the GAN `head` (or None)."""

    def __init__(self, net: nn.Module, head: GANHead | None):
        super().__init__()
        self.net = net
        self.head = head


def dm_generator_loss(x: torch.Tensor, real_pred: torch.Tensor, fake_pred: torch.Tensor):
    """DMD2's distribution-matching loss: w = mean_CHW |x - r|, g = nan_to_num((f - r) / w),
    L = 0.5 mean((x - stopgrad(x - g))^2), so dL/dx = g / numel (descent moves x toward r - f).
    Returns (loss, g)."""
    with torch.no_grad():
        w = (x - real_pred).abs().mean(dim=list(range(1, x.ndim)), keepdim=True)
        g = torch.nan_to_num((fake_pred - real_pred) / w)
    return 0.5 * F.mse_loss(x.float(), (x - g).detach().float(), reduction="mean"), g


@register("dmd2")
class DMD2(Method):
    Params = DMD2Params

    def __init__(self, teacher, data, params: DMD2Params, device="cpu"):
        super().__init__(teacher, data, params, device)
        p = params
        if p.dfake_gen_update_ratio < 1:
            raise UserError(f"dfake_gen_update_ratio must be >= 1, got {p.dfake_gen_update_ratio}")
        self.generator = teacher.copy()
        net = teacher.copy()
        head = None
        if p.gan:
            with torch.no_grad():  # shape of the head's input map
                x0 = torch.zeros([1, *teacher.sample_shape], device=device)
                # any condition: the map's shape does not depend on it (a text teacher has no id 0)
                c0 = teacher.uncond(1, device) if teacher.has_uncond else torch.zeros(1, dtype=torch.long,
                                                                                       device=device)
                h = teacher.features(x0, torch.ones([1], device=device), c0, [p.gan_layer])[p.gan_layer]
            head = GANHead(h.shape[1], min(h.shape[-2:])).to(device)
        self.fake = FakeScore(net, head)
        self.sigmas, self.in_scale = student_schedule(p, self.generator)
        self._init_grid(teacher)

    def _init_grid(self, teacher):
        p, device = self.params, self.device
        # Ascending 1000-level noise grid: a Karras grid over the teacher's range (DMD2's EDM code:
        # get_sigmas_karras(...).flip(0)), or the teacher's own discrete timesteps (DMD2's SD code:
        # DDPM timesteps t with scheduler.add_noise, i.e. sigma_t in EDM terms).
        if p.sigma_grid == "discrete":
            self.karras = teacher.discrete_sigmas().float().to(device)
            if len(self.karras) != p.num_train_timesteps:
                raise UserError(f"sigma_grid 'discrete': the teacher has {len(self.karras)} timesteps, "
                                 f"num_train_timesteps is {p.num_train_timesteps}")
        else:
            self.karras = karras_sigmas(p.num_train_timesteps, teacher.sigma_min, teacher.sigma_max,
                                        p.rho).flip(0).float().to(device)
        self.min_step = int(p.min_step_percent * p.num_train_timesteps)
        self.max_step = int(p.max_step_percent * p.num_train_timesteps)

    def networks(self):
        return {"generator": self.generator, "fake_score": self.fake}

    # -- data ----------------------------------------------------------------------------------
    def make_batch(self):
        """All of a step's randomness (as TFD: `train_step` is a pure function of the batch and
        the weights, and every entry splits along dim 0 across ranks). Conditions (uniform) and the
        real GAN batch come from the data sampler's generator, the rest from torch's RNG (both
        checkpointed by the trainer). Grid indices: `dm_i` ~ U{20..980}, `fake_i`, `gan_*_i` ~
        U{0..999}; each with its own Gaussian noise. The DM and generator-GAN draws are made on
        every step (used on generator turns only), so the RNG streams do not depend on the turn."""
        p, dev = self.params, self.device
        B = p.batch_per_rank
        shape = [B, *self.teacher.sample_shape]
        T = p.num_train_timesteps
        cond = self.data.random_conditions(B)
        batch = {"cond": cond.to(dev), "z": torch.randn(shape, device=dev)}

        def level(name, lo, hi):
            batch[f"{name}_i"] = torch.randint(lo, hi + 1, (B,), device=dev)
            batch[f"{name}_noise"] = torch.randn(shape, device=dev)

        level("dm", self.min_step, min(self.max_step, T - 1))
        level("fake", 0, T - 1)
        if p.gan:
            real, classes = self.data.sample(B, 1)
            batch["real"] = real[:, 0].to(dev)
            batch["real_cond"] = classes.to(dev)
            level("gan_g", 0, T - 1)
            level("gan_real", 0, T - 1)
            level("gan_fake", 0, T - 1)
        self.backward_simulation_draws(batch)
        return batch

    def backward_simulation_draws(self, batch: dict) -> None:
        """Few-step students (num_steps N > 1; nothing is drawn for N = 1, so one-step runs keep their
        random streams): DMD2's backward simulation draws one step index k ~ U{0..N-1} per batch
        (`sim_k`, repeated per sample so the batch splits across ranks; DMD2 broadcasts it across GPUs,
        here each rank draws its own), the rollout's own starting noise `sim_z` (uncorrelated with
        `z`, as DMD2) and its re-noising noise `sim_noise` [B, N-1, ...]."""
        N, B, dev = self.params.num_steps, batch["z"].shape[0], self.device
        if N == 1:
            return
        batch["sim_k"] = torch.randint(0, N, (1,), device=dev).repeat(B)
        batch["sim_z"] = torch.randn_like(batch["z"])
        batch["sim_noise"] = torch.randn([B, N - 1, *batch["z"].shape[1:]], device=dev)

    # -- pieces --------------------------------------------------------------------------------
    def _sigma(self, i: torch.Tensor) -> torch.Tensor:
        return self.karras[i].reshape(-1, 1, 1, 1)

    def generate(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x = G(a z; s, c), (s, a) = `generator_input` (EDM: a = s; SDXL timestep input: a =
        sqrt(s^2 + 1)); z `[B, *sample_shape]`, cond `[B]`."""
        s, a = generator_input(self.params, self.generator)
        return self.generator.denoise(z * a, s, cond)

    @torch.no_grad()
    def student_input(self, b: dict) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The generator's input (x, sigma) on this step. One step: (a z, s_0). Few steps: DMD2's
        backward simulation (tianweiy/DMD2 `sample_backward` + `prepare_denoising_data`): run the
        student itself, without gradient, from its own noise `sim_z` for k = `sim_k` steps (re-noising
        each x0 prediction with `sim_noise`), then re-noise its last x0 prediction with `z` at s_k; k = 0
        is the pure-noise input a z. The returned state is detached (computed under no_grad)."""
        z, cond, sig, a = b["z"], b["cond"], self.sigmas, self.in_scale
        if self.params.num_steps == 1:
            return z * a, sig[0]
        k = b["sim_k"]
        view = [-1] + [1] * (z.ndim - 1)
        x, x0 = b["sim_z"] * a, torch.zeros_like(z)
        kmax = int(k.max())
        for j in range(kmax):
            x0_j = self.generator.denoise(x, sig[j], cond)
            x0 = torch.where((k > j).view(view), x0_j, x0)
            if j + 1 < kmax:
                x = next_state(x, x0_j, sig[j], sig[j + 1], "renoise", b["sim_noise"][:, j])
        s_k = torch.tensor(sig, dtype=z.dtype, device=z.device)[k].view(view)
        return torch.where((k == 0).view(view), z * a, x0 + s_k * z), s_k

    def generate_batch(self, b: dict) -> torch.Tensor:
        """The generator's output on this step: one step `generate(z, cond)`; few steps
        G(student_input(b)) (gradient only through this last call)."""
        if self.params.num_steps == 1:
            return self.generate(b["z"], b["cond"])
        x_in, s = self.student_input(b)
        return self.generator.denoise(x_in, s, b["cond"])

    def dm_loss(self, x: torch.Tensor, cond: torch.Tensor, i: torch.Tensor, noise: torch.Tensor):
        """Distribution-matching loss at s = grid[i] (i in 20..980; no grad through the scores)."""
        s = self._sigma(i)
        with torch.no_grad():
            x_t = x.detach() + s * noise
            real = self.teacher.denoise(x_t, s, cond, guidance=self.params.real_guidance)
            fake = self.fake.net.denoise(x_t, s, cond)
        loss, g = dm_generator_loss(x, real, fake)
        return loss, {"dm_grad_abs": g.abs().mean().item(), "dm_sigma_mean": s.mean().item()}

    def fake_score_loss(self, x: torch.Tensor, cond: torch.Tensor, i: torch.Tensor, noise: torch.Tensor):
        """Denoising loss on (detached) generator samples at s = grid[i] (i in 0..999):
        mean(w(s) (D_fake(x + s n; s) - x)^2) with w = s^-2 + sd^-2 (EDM, DMD2's ImageNet code) or
        w = s^-2 (`fake_loss: epsilon`: = mean((eps_fake - n)^2) for an epsilon-prediction net,
        DMD2's SDXL fake-UNet loss)."""
        x = x.detach()
        s = self._sigma(i)
        pred = self.fake.net.denoise(x + s * noise, s, cond)
        weight = s ** -2 + (self.teacher.sigma_data ** -2 if self.params.fake_loss == "edm" else 0.0)
        return (weight * (pred.float() - x.float()) ** 2).mean()

    def gan_logits(self, x: torch.Tensor, cond: torch.Tensor, i: torch.Tensor, noise: torch.Tensor):
        """Head logits on the FAKE score's `gan_layer` features of x + s n, s = grid[i] (the forward
        stops at that layer, DMD2's `return_bottleneck`)."""
        s = self._sigma(i)
        layer = self.params.gan_layer
        return self.fake.head(self.fake.net.features(x + s * noise, s, cond, [layer])[layer])

    # -- step ----------------------------------------------------------------------------------
    def generator_losses(self, b: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Generator turn: distribution matching (+ GAN term through the fake score; the trainer
        back-propagates this loss into the generator only, module docstring)."""
        p = self.params
        loss_g, metrics = self.dm_loss(x, b["cond"], b["dm_i"], b["dm_noise"])
        metrics["loss_dm"] = loss_g.item()
        if p.gan:
            logits = self.gan_logits(x, b["cond"], b["gan_g_i"], b["gan_g_noise"])
            loss_gan_g = F.softplus(-logits).mean()
            loss_g = loss_g + p.gan_weight_g * loss_gan_g
            metrics["loss_gan_g"] = loss_gan_g.item()
        return loss_g, metrics

    def fake_score_losses(self, b: dict, xd: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Fake-score turn (every step): denoising loss on detached samples (+ discriminator loss)."""
        p = self.params
        loss_f = self.fake_score_loss(xd, b["cond"], b["fake_i"], b["fake_noise"])
        metrics = {"loss_fake_denoise": loss_f.item()}
        if p.gan:
            l_real = self.gan_logits(b["real"], b["real_cond"], b["gan_real_i"], b["gan_real_noise"])
            l_fake = self.gan_logits(xd, b["cond"], b["gan_fake_i"], b["gan_fake_noise"])
            loss_d = (F.softplus(l_fake) + F.softplus(-l_real)).mean()
            loss_f = loss_f + p.gan_weight_d * loss_d
            metrics.update({"loss_gan_d": loss_d.item(), "logit_real": l_real.mean().item(),
                            "logit_fake": l_fake.mean().item(),
                            "d_acc": 0.5 * ((l_real > 0).float().mean() + (l_fake < 0).float().mean()).item()})
        return loss_f, metrics

    def train_step(self, batch, step):
        """Two time-scale update: the generator loss (listed first) on every
        `dfake_gen_update_ratio`-th step, the fake-score loss on every step."""
        gen_turn = step % self.params.dfake_gen_update_ratio == 0
        with torch.set_grad_enabled(gen_turn and torch.is_grad_enabled()):
            x = self.generate_batch(batch)
        losses, metrics = {}, {}
        if gen_turn:  # generator first (see module docstring)
            losses["generator"], m = self.generator_losses(batch, x)
            metrics.update(m)
        losses["fake_score"], m = self.fake_score_losses(batch, x.detach())
        metrics.update(m)
        metrics["loss"] = losses["fake_score"].item()
        metrics["gen_turn"] = float(gen_turn)
        if "sim_k" in batch:
            metrics["sim_step"] = float(batch["sim_k"][0])
        return StepOutput(losses=losses, metrics=metrics)

    @classmethod
    def nfe(cls, params) -> int:
        return params.num_steps

    @classmethod
    def sampler_for(cls, generator, params):
        """N-step sampler (`tfd.fewstep.few_step_sampler`, DMD2's re-noising rule); N = 1 is the
        one-step generator of the base class, bitwise."""
        sigmas, scale = student_schedule(params, generator)
        return few_step_sampler(generator, sigmas, scale, rule="renoise")
