"""DP-DMD (Wu, Li, Zhang, Ma 2026, "Diversity-preserved distribution matching distillation", arXiv
2602.03139; official code Multimedia-Analytics-Laboratory/dpdmd `train_sd35_dpdmd.py`), translated to
EDM's x0-prediction convention. Facts: notes/dpdmd-el.md; the translation below is ours.

A few-step student G (a trainable copy of the teacher) with N = `num_steps` steps on `student_sigmas`
(default: the official SD3 4-step schedule as EDM sigmas, [sigma_max, 6.0, 1.51, 0.003]; see
`tfd.fewstep`), stepped with the official code's rule, the deterministic Euler step (`step_rule:
euler`, FlowMatchEulerDiscreteScheduler.step; `renoise` is DMD2's re-noising rule instead).

Role separation (Alg. 1):
- First step, diversity loss (Eq. 6-7): from pure noise z_T = s_0 z (s_0 = sigma_max), run the
  frozen teacher for K = `anchor_step` steps of its own EDM schedule (`teacher_steps` Karras levels
  from s_0 to sigma_min, rho 7, then 0; `teacher_solver` euler -- the official code's Euler steps
  of its 30-step teacher schedule -- or EDM's Heun) from the SAME noise, reaching z_K at sigma_K.
  `target: flow` (default, the official code's `v_target = (x1 - z_tk) / (1 - t_k)`): the student's
  first prediction is regressed onto the straight line from (s_0, z_T) to (sigma_K, z_K), whose
  x0-intercept in EDM form is
      D~ = (s_0 z_K - sigma_K z_T) / (s_0 - sigma_K)
  (the flow form's velocity target, with x_sigma = x0 + sigma eps; one Euler step of the student
  from s_0 to sigma_K with this D~ lands exactly on z_K). `target: x0` (App. C, the SDXL /
  x-prediction variant): D~ = D_teacher(z_K; sigma_K). Loss l_div = mean((G(z_T; s_0) - D~)^2),
  weight `lambda_div` (0.05).
  K default: the teacher level nearest (in log sigma) to the student's first-step end
  student_sigmas[1], as the released script's k_anchor 10 of 30 (t 0.851 vs the student's 0.857).
  With the defaults (30 teacher steps, student s_1 = 6.0): K = 11, sigma_K = 6.87.
- Remaining steps, DMD: the state handed on after step 1 is DETACHED ("detach, important" in the
  official code); steps 2..N are rolled out with gradient and DMD2's distribution-matching loss
  (`DMD2.dm_loss`, no GAN) is applied to the final x0. So l_DMD puts no gradient into the first
  step's output, but reaches the shared weights through steps 2..N. Total l = l_DMD + lambda l_div.
- Fake score: a trainable copy of the teacher with DMD2's denoising loss (`DMD2.fake_score_loss`)
  on the detached N-step samples. Two time-scale update as the official code: the student is
  updated when (step + 1) % (M + 1) == 0 (M = `fake_updates_per_student`, `per_train_fake_num 5`),
  the fake score on every other step; a student step does not update the fake score.
- Teacher guidance: `real_guidance` (official: CFG 3.5) is used both in the anchor rollout and as
  DMD's real score, as the official code; None (digits) is the plain conditional teacher.

Differences from the official DMD term (kept as DMD2's, so DMD2 and DP-DMD rows share it): one
noise level per sample from DMD2's grid i ~ U{20..980}, DMD2's normaliser mean|x - D_real|; the
official code draws one flow t per batch from all 1000 and normalises by mean|x_t - x0_real|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from tfd.fewstep import dpdmd_sigmas, few_step_sampler, rollout
from tfd.methods import Method, StepOutput, register
from tfd.methods.dmd2 import DMD2, FakeScore, check_student, student_schedule
from tfd.sampling import karras_sigmas


@dataclass
class DPDMDParams:
    batch_per_rank: int = 40              # student samples per step per process
    num_steps: int = 4                    # N student steps (official: 4)
    student_sigmas: Optional[list[float]] = None   # None: official SD3 4-step schedule as EDM sigmas
    step_rule: Literal["euler", "renoise"] = "euler"   # euler: official FlowMatchEuler step; renoise: DMD2's
    target: Literal["flow", "x0"] = "flow"     # first-step target: flow (code, Eq. 6-7) | x0 (App. C)
    lambda_div: float = 0.05              # weight of the first-step (diversity) loss
    teacher_steps: int = 30               # teacher schedule length (official: 30 steps)
    teacher_solver: Literal["euler", "heun"] = "euler"   # anchor rollout solver (official: Euler)
    anchor_step: Optional[int] = None     # K; None: the level nearest student_sigmas[1]
    fake_updates_per_student: int = 5     # official per_train_fake_num
    num_train_timesteps: int = 1000       # DMD term and fake-score loss: DMD2's noise grid
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    rho: float = 7.0
    real_guidance: Optional[float] = None     # teacher CFG (rollout and DMD real score; official 3.5)
    sigma_grid: Literal["karras", "discrete"] = "karras"
    fake_loss: Literal["edm", "epsilon"] = "edm"

    def __post_init__(self):
        check_student(self)
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 for dpdmd (step 1 takes the diversity loss, the "
                             f"rest DMD), got {self.num_steps}")
        if self.lambda_div < 0:
            raise ValueError(f"lambda_div must be >= 0, got {self.lambda_div}")
        if self.teacher_steps < 2:
            raise ValueError(f"teacher_steps must be >= 2, got {self.teacher_steps}")
        if self.anchor_step is not None:
            top = self.teacher_steps - (1 if self.target == "x0" else 0)
            if not 1 <= self.anchor_step <= top:
                raise ValueError(f"anchor_step must be in 1..{top} (teacher_steps {self.teacher_steps}, "
                                 f"target {self.target}), got {self.anchor_step}")
        if self.fake_updates_per_student < 1:
            raise ValueError(f"fake_updates_per_student must be >= 1, got {self.fake_updates_per_student}")


def teacher_levels(teacher_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The teacher's EDM schedule: `teacher_steps` Karras levels sigma_max .. sigma_min, then 0 (float64)."""
    return torch.cat([karras_sigmas(teacher_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])


def nearest_level(levels: torch.Tensor, sigma: float) -> int:
    """Index K >= 1 of the positive level nearest `sigma` in log sigma."""
    pos = levels[1:][levels[1:] > 0]
    return 1 + int((pos.log() - math.log(sigma)).abs().argmin())


@register("dpdmd")
class DPDMD(DMD2):
    Params = DPDMDParams

    def __init__(self, teacher, data, params: DPDMDParams, device="cpu"):
        Method.__init__(self, teacher, data, params, device)
        p = params
        self.generator = teacher.copy()
        self.fake = FakeScore(teacher.copy(), None)
        self.sigmas, self.in_scale = student_schedule(p, self.generator, default=dpdmd_sigmas)
        self._init_grid(teacher)
        # the anchor rollout starts from the student's own first input level s_0 (default sigma_max)
        self.levels = teacher_levels(p.teacher_steps, teacher.sigma_min, self.sigmas[0], p.rho)
        self.anchor = p.anchor_step if p.anchor_step is not None else nearest_level(self.levels, self.sigmas[1])

    def networks(self):
        return {"generator": self.generator, "fake_score": self.fake}

    def make_batch(self):
        """Conditions (data sampler), noise z, DMD2's DM and fake-score levels with their noise, and
        for `step_rule: renoise` the re-noising noise [B, N-1, ...]; drawn every step."""
        p, dev = self.params, self.device
        B = p.batch_per_rank
        shape = [B, *self.teacher.sample_shape]
        T = p.num_train_timesteps
        batch = {"cond": self.data.random_conditions(B).to(dev), "z": torch.randn(shape, device=dev)}
        for name, lo, hi in (("dm", self.min_step, min(self.max_step, T - 1)), ("fake", 0, T - 1)):
            batch[f"{name}_i"] = torch.randint(lo, hi + 1, (B,), device=dev)
            batch[f"{name}_noise"] = torch.randn(shape, device=dev)
        if p.step_rule == "renoise":
            batch["step_noise"] = torch.randn([B, p.num_steps - 1, *shape[1:]], device=dev)
        return batch

    # -- pieces --------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_anchor(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(z_K, sigma_K): K = `self.anchor` steps of the teacher's ODE (Euler or Heun, EDM's
        `edm_sampler` without churn) from z_T = s_0 z over `self.levels`; float64 state."""
        p, t, lv = self.params, self.teacher, self.levels
        g = p.real_guidance

        def d(x, s):
            return t.denoise(x.float(), float(s), cond, guidance=g).double()

        x = z.double() * lv[0]
        for i in range(self.anchor):
            s, s_next = lv[i], lv[i + 1]
            slope = (x - d(x, s)) / s
            x_next = x + (s_next - s) * slope
            if p.teacher_solver == "heun" and s_next > 0:
                x_next = x + (s_next - s) * 0.5 * (slope + (x_next - d(x_next, s_next)) / s_next)
            x = x_next
        return x, float(lv[self.anchor])

    @torch.no_grad()
    def first_step_target(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """D~ of the first step (module docstring): flow: (s_0 z_K - s_K z_T) / (s_0 - s_K), z_T = s_0 z;
        x0: D_teacher(z_K; s_K)."""
        z_k, s_k = self.teacher_anchor(z, cond)
        s0 = float(self.levels[0])
        if self.params.target == "x0":
            return self.teacher.denoise(z_k.float(), s_k, cond, guidance=self.params.real_guidance).float()
        z_t = z.double() * s0
        return ((s0 * z_k - s_k * z_t) / (s0 - s_k)).float()

    def student_rollout(self, b: dict, detach_first: bool = True):
        """(final x0, [x0 of each step]) of the N-step student from z_T = a z; the state after step 1
        detached (`detach_first`)."""
        noise = b.get("step_noise")
        return rollout(self.generator, b["z"] * self.in_scale, b["cond"], self.sigmas, self.params.step_rule,
                       noises=(lambda i: noise[:, i]) if noise is not None else None,
                       detach_after=0 if detach_first else None)

    def student_losses(self, b: dict) -> dict:
        """The student turn's pieces: loss_div (first step vs D~), loss_dm (DMD on the final x0),
        the first-step output and the final sample (for tests: d loss_dm / d first = none)."""
        final, outs = self.student_rollout(b)
        target = self.first_step_target(b["z"], b["cond"])
        loss_div = (outs[0].float() - target).square().mean()
        loss_dm, m = self.dm_loss(final, b["cond"], b["dm_i"], b["dm_noise"])
        return {"loss_div": loss_div, "loss_dm": loss_dm, "first": outs[0], "final": final, "metrics": m}

    # -- step ----------------------------------------------------------------------------------
    def student_turn(self, step: int) -> bool:
        return (step + 1) % (self.params.fake_updates_per_student + 1) == 0

    def train_step(self, batch, step):
        """Student turn: l_DMD + lambda l_div into the generator only. Otherwise: the fake score's
        denoising loss on detached N-step samples."""
        if self.student_turn(step):
            r = self.student_losses(batch)
            loss = r["loss_dm"] + self.params.lambda_div * r["loss_div"]
            metrics = {**r["metrics"], "loss": loss.item(), "loss_dm": r["loss_dm"].item(),
                       "loss_div": r["loss_div"].item(), "gen_turn": 1.0}
            return StepOutput(losses={"generator": loss}, metrics=metrics)
        with torch.no_grad():
            final, _ = self.student_rollout(batch)
        loss_f = self.fake_score_loss(final, batch["cond"], batch["fake_i"], batch["fake_noise"])
        return StepOutput(losses={"fake_score": loss_f},
                          metrics={"loss": loss_f.item(), "loss_fake_denoise": loss_f.item(), "gen_turn": 0.0})

    @classmethod
    def nfe(cls, params) -> int:
        return params.num_steps

    @classmethod
    def sampler_for(cls, generator, params):
        sigmas, scale = student_schedule(params, generator, default=dpdmd_sigmas)
        return few_step_sampler(generator, sigmas, scale, rule=params.step_rule)
