"""TEMPLATE for a new method: a short, complete example to copy. It is NOT a benchmarked baseline
and is not in config.yaml. See docs/adding-a-method.md. Lines marked `CHANGE` are the ones to edit.

Method `regress`: one-step regression onto the teacher, the idea of Luhman & Luhman (2021,
"Knowledge distillation in iterative generative models"), with the target solved on the fly
rather than precomputed. The generator G is a trainable copy of the teacher run once at sigma_max.
Each step draws classes c and noise z, solves the teacher's probability-flow ODE from sigma_max z
with `teacher_steps` Heun steps (EDM's sampler, as in the `heun` rows; 2 * teacher_steps - 1
teacher calls), and minimises mean((G(sigma_max z; sigma_max, c) - ODE(sigma_max z; c))^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tfd.methods import Method, StepOutput, register
from tfd.sampling import HeunCfg, edm_sampler, one_step_sampler
from tfd.teacher import one_hot


@dataclass
class RegressParams:                 # CHANGE: your hyperparameters; the keys allowed in runs.<run>.params
    batch_size: int = 32             # per process: under DDP each rank draws its own batch
    teacher_steps: int = 8           # Heun steps of the teacher's target solve
    sigma_max: float = 80.0          # G runs once at sigma_max (sampler_for reads it too)


@register("regress")                 # CHANGE: the method name, used as runs.<run>.method
class Regress(Method):
    Params = RegressParams           # CHANGE: your Params dataclass

    def __init__(self, teacher, data, params: RegressParams, device="cpu"):
        super().__init__(teacher, data, params, device)  # sets self.teacher/.data/.params/.device
        if params.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {params.teacher_steps}")
        # The exported network must be an EDMPrecond; a copy of the teacher is one.
        self.generator = teacher.copy_network()
        self.heun = HeunCfg(steps=params.teacher_steps, sigma_max=params.sigma_max)  # S_churn 0: the ODE
        net = teacher.net
        self.shape = (net.img_channels, net.img_resolution, net.img_resolution)

    def networks(self):
        # Every trainable network, by name: the trainer builds one optimiser per entry and
        # checkpoints it. "generator" is required; it is the network that gets exported.
        return {"generator": self.generator}

    def make_batch(self):
        # CHANGE: draw ALL of this step's randomness here, and only from generators the trainer
        # checkpoints: self.data (its generator) and torch's global RNG (torch.randn, torch.rand).
        p = self.params
        classes = self.data.sample_classes(p.batch_size).to(self.device)  # or self.data.sample(G, k) for real images
        z = torch.randn([p.batch_size, *self.shape], device=self.device)
        return {"labels": classes, "z": z}

    def train_step(self, batch, step: int) -> StepOutput:
        # CHANGE: your loss. Return one loss per network to update on this step (the trainer does
        # backward, DDP all-reduce, clipping, the optimiser step, EMA); `metrics` go to stats.jsonl.
        p, z, labels = self.params, batch["z"], batch["labels"]
        with torch.no_grad():  # target: the teacher's Heun ODE solution from the same noise z
            target = edm_sampler(self.teacher.denoise, labels, SimpleNamespace(randn=lambda shape: z),
                                 self.shape, self.heun)
        sigma = torch.full([len(z), 1, 1, 1], p.sigma_max, device=z.device)
        x = self.generator(z * p.sigma_max, sigma, one_hot(labels, self.teacher.num_classes))
        loss = (x.float() - target).square().mean()
        return StepOutput(losses={"generator": loss}, metrics={"loss": loss.item()})

    @classmethod
    def sampler_for(cls, generator, params, shape):
        # How the exported generator makes samples (evaluation and the convergence record).
        # The base class already does exactly this one step; a few-step method returns its own
        # `sampler(labels, rnd)` here (noise only from `rnd`) and sets `nfe:` in its runs block.
        return one_step_sampler(generator, shape, params.sigma_max)
