"""DMD (Yin et al. 2024b, "One-step Diffusion with Distribution Matching Distillation"): DMD2's
distribution-matching generator loss plus a regression loss on pre-generated teacher pairs.
Facts: `notes/baselines.md` ("DMD (original, 2.62): DM loss plus a regression loss on pre-generated
teacher noise/image pairs (LPIPS), no TTUR, no GAN").

- Distribution matching and the fake score: `tfd.methods.dmd2`'s code, unchanged, with no two
  time-scale update (the generator and the fake score are both updated on EVERY step) and no GAN.
- Regression: `regression_batch_per_rank` pairs (z, c, y) drawn uniformly (torch's RNG) from the
  pairs cache (`tfd.pairs`: y = the teacher's deterministic Heun ODE output from sigma_max z,
  `pairs_steps` steps), loss mean_i d(G(sigma_max z_i; c_i), y_i), added to the DM loss with
  `regression_weight`. The generator runs at the teacher's sigma_max, as the pairs' ODE starts there.
- `regression`: `l2` (mean squared error per sample, the honest fallback), `huber` (iCT's
  pseudo-Huber, `huber_c`, 0: 0.00054 sqrt(CHW)), or `lpips` (DMD's choice) ONLY from a local file
  `lpips_weights`: a TorchScript module `d(x, y) -> [N]` (or `[N, 1, 1, 1]`) on images in [-1, 1],
  e.g. LPIPS-VGG traced with the `lpips` package where its weights can be had; a one-channel image
  is repeated to three channels. LPIPS cannot be downloaded here; without the file the run fails at
  config time (`tfd check-config`) naming the key. The row label says which distance was used.
- `regression_weight` 0.25: DMD's lambda_reg as we recall the paper; it is NOT in our notes, so treat
  it as our setting until checked against the paper.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch

from eval.errors import BadFile, UserError
from tfd.methods import register
from tfd.methods.cd import huber_c_default, sample_distance
from tfd.methods.dmd2 import DMD2


@dataclass
class DMDParams:
    batch_per_rank: int = 40              # generated samples per step per process (DM loss, fake score)
    num_train_timesteps: int = 1000       # DMD2's Karras grid of the DM loss and the fake score
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    rho: float = 7.0
    regression: Literal["l2", "huber", "lpips"] = "l2"
    regression_weight: float = 0.25       # DMD's lambda_reg as we recall it (not in the notes: ours until checked)
    regression_batch_per_rank: Optional[int] = None   # pairs per step per process; None: batch_per_rank
    huber_c: float = 0.0                  # regression huber: pseudo-Huber c; 0: iCT's 0.00054 sqrt(CHW)
    lpips_weights: Optional[str] = None   # regression lpips: a local TorchScript LPIPS module (no download)
    pairs_num: int = 1000                 # teacher pairs in the cache (tfd.pairs)
    pairs_steps: int = 18                 # Heun steps of the teacher's ODE (EDM: 18 on CIFAR-10, 256 on ImageNet-64)
    pairs_seed: int = 0
    pairs_shards: int = 1                 # jobs the pairs are made in (rule teacher_pairs); splits the work only

    # DMD2's settings that DMD fixes (not config keys): no GAN, no TTUR, EDM teacher on a Karras grid
    gan: ClassVar[bool] = False
    dfake_gen_update_ratio: ClassVar[int] = 1
    sigma_grid: ClassVar[str] = "karras"
    fake_loss: ClassVar[str] = "edm"
    real_guidance: ClassVar[Optional[float]] = None
    generator_sigma: ClassVar[Optional[float]] = None     # the teacher's sigma_max: where the pairs start
    generator_timestep: ClassVar[Optional[int]] = None
    num_steps: ClassVar[int] = 1                          # DMD is a one-step generator (no few-step student)
    student_sigmas: ClassVar[Optional[list]] = None

    def __post_init__(self):
        for key in ("batch_per_rank", "pairs_num", "pairs_steps", "pairs_shards"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.regression_batch_per_rank is not None and self.regression_batch_per_rank < 1:
            raise UserError(f"regression_batch_per_rank must be >= 1, got {self.regression_batch_per_rank}")
        if self.pairs_shards > self.pairs_num:
            raise UserError(f"pairs_shards ({self.pairs_shards}) exceeds pairs_num ({self.pairs_num})")
        if self.regression_weight < 0:
            raise UserError(f"regression_weight must be >= 0, got {self.regression_weight}")
        if self.regression == "lpips" and not self.lpips_weights:
            raise UserError("regression 'lpips' needs params.lpips_weights: a local TorchScript LPIPS module "
                            "d(x, y) -> [N] (LPIPS weights cannot be downloaded here); or use regression: l2 or huber")


def load_lpips(path: str | Path, device="cpu"):
    """A user-provided TorchScript LPIPS module from a local file (frozen); BadFile naming the file."""
    p = Path(path)
    if not p.is_file():
        raise BadFile(p, "LPIPS weights not found (params.lpips_weights)",
                      hint="LPIPS is not available offline: give a local TorchScript LPIPS module, or use "
                           "regression: l2 or huber")
    try:
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # torch raises several kinds for a non-TorchScript file
        raise BadFile(p, "not a TorchScript module (params.lpips_weights)",
                      expected="torch.jit.save of an LPIPS module d(x, y) -> [N]",
                      found=f"{type(e).__name__}") from None
    net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    return net


@register("dmd")
class DMD(DMD2):
    Params = DMDParams
    needs_pairs = True   # tfd.runs.build_method passes the pairs cache (`--pairs`)

    def __init__(self, teacher, data, params: DMDParams, device="cpu", pairs=None):
        super().__init__(teacher, data, params, device)
        if pairs is None:
            raise UserError("method 'dmd' needs its teacher pairs (--pairs results/<bench>/pairs/<key>/"
                            "pairs.safetensors, rules teacher_pairs + merge_teacher_pairs)")
        self.pairs = pairs   # {noise, target, cond, ...} as tfd.pairs.load_pairs returns them (CPU)
        self.huber_c = params.huber_c if params.huber_c > 0 else huber_c_default(teacher.sample_shape)
        self.lpips = load_lpips(params.lpips_weights, device) if params.regression == "lpips" else None

    def make_batch(self):
        """DMD2's batch (conditions, noise, grid indices; no GAN draws) and the regression pairs:
        indices uniform with replacement (torch's RNG), their noise, conditions and targets."""
        batch = super().make_batch()
        p, n = self.params, len(self.pairs["index"])
        i = torch.randint(0, n, (p.regression_batch_per_rank or p.batch_per_rank,))
        batch.update({"pair_z": self.pairs["noise"][i].to(self.device),
                      "pair_cond": self.pairs["cond"][i].to(self.device),
                      "pair_target": self.pairs["target"][i].to(self.device)})
        return batch

    def regression_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample d(x, y) `[N]` of `params.regression`."""
        if self.lpips is None:
            return sample_distance(x, y, self.params.regression, self.huber_c)
        a, b = x.float(), y.float()
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        return self.lpips(a, b).reshape(len(a), -1).mean(1)

    def regression_loss(self, z, cond, target) -> torch.Tensor:
        """mean_i d(G(sigma_max z_i; c_i), y_i)."""
        return self.regression_distance(self.generate(z, cond), target).mean()

    def train_step(self, batch, step):
        """DMD2's step with ratio 1 and no GAN (generator and fake score every step), plus the
        weighted regression loss in the generator's."""
        out = super().train_step(batch, step)
        reg = self.regression_loss(batch["pair_z"], batch["pair_cond"], batch["pair_target"])
        out.losses["generator"] = out.losses["generator"] + self.params.regression_weight * reg
        out.metrics["loss_reg"] = reg.item()
        return out
