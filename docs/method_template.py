"""TEMPLATE for a new method: a short, complete example to copy. It is NOT a benchmarked baseline
and is not in config.yaml. See docs/adding-a-method.md. Lines marked `CHANGE` are the ones to edit.

Method `regress`: one-step regression onto the teacher, the idea of Luhman & Luhman (2021,
"Knowledge distillation in iterative generative models"), with the target solved on the fly
rather than precomputed. The generator G is a trainable copy of the teacher run once at the
teacher's sigma_max (s). Each step draws conditions c and noise z, solves the teacher's
probability-flow ODE from s z with `teacher_steps` Heun steps (EDM's sampler, as in the `heun`
rows; 2 * teacher_steps - 1 teacher calls), and minimises mean((G(s z; s, c) - ODE(s z; c))^2).

Every network is a `tfd.denoiser.Denoiser`: `teacher.copy()` makes a trainable one, `.denoise(x,
sigma, cond)` runs it with int64 condition ids, `.sample_shape` / `.sigma_max` describe it. A
method never builds one-hot labels or reads raw network attributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tfd.methods import Method, StepOutput, register
from tfd.sampling import HeunCfg, edm_sampler, one_step_sampler


@dataclass
class RegressParams:                 # CHANGE: your hyperparameters; the keys allowed in runs.<run>.params
    batch_per_rank: int = 32         # per process: under DDP each rank draws its own batch
    teacher_steps: int = 8           # Heun steps of the teacher's target solve

    def __post_init__(self):         # CHANGE: range checks here run at config load (tfd check-config)
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")


@register("regress")                 # CHANGE: the method name, used as runs.<run>.method
class Regress(Method):
    Params = RegressParams           # CHANGE: your Params dataclass

    def __init__(self, teacher, data, params: RegressParams, device="cpu"):
        super().__init__(teacher, data, params, device)  # sets self.teacher/.data/.params/.device
        # The exported network is a Denoiser (it saves itself); a copy of the teacher is one.
        self.generator = teacher.copy()
        self.heun = HeunCfg(steps=params.teacher_steps)  # S_churn 0: the ODE over the teacher's range

    def networks(self):
        # Every trainable network, by name: the trainer builds one optimiser per entry and
        # checkpoints it. "generator" is required; it is the network that gets exported.
        return {"generator": self.generator}

    def make_batch(self):
        # CHANGE: draw ALL of this step's randomness here, and only from generators the trainer
        # checkpoints: self.data (its generator) and torch's global RNG (torch.randn, torch.rand).
        p = self.params
        cond = self.data.random_conditions(p.batch_per_rank).to(self.device)  # or self.data.sample(G, k): real data
        z = torch.randn([p.batch_per_rank, *self.teacher.sample_shape], device=self.device)
        return {"cond": cond, "z": z}

    def train_step(self, batch, step: int) -> StepOutput:
        # CHANGE: your loss. Return one loss per network to update on this step (the trainer does
        # backward, DDP all-reduce, clipping, the optimiser step, EMA); `metrics` go to stats.jsonl.
        z, cond, t = batch["z"], batch["cond"], self.teacher
        with torch.no_grad():  # target: the teacher's Heun ODE solution from the same noise z
            # `rnd` hands the sampler this step's z: the ODE (S_churn 0) draws noise only once
            target = edm_sampler(t.denoise, cond, SimpleNamespace(randn=lambda shape: z),
                                 t.sample_shape, self.heun, t.sigma_min, t.sigma_max)
        x = self.generator.denoise(z * t.sigma_max, t.sigma_max, cond)
        loss = (x.float() - target).square().mean()
        return StepOutput(losses={"generator": loss}, metrics={"loss": loss.item()})

    @classmethod
    def sampler_for(cls, generator, params):
        # How the exported generator (a Denoiser) makes samples (evaluation and the convergence
        # record). The base class already does exactly this one step; a few-step method returns its
        # own `sampler(cond, rnd)` here (noise only from `rnd`) and sets `nfe:` in its runs block.
        return one_step_sampler(generator, generator.sigma_max)
