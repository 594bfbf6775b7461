"""Generator-loss add-ons: extra terms a run adds to ANY method's generator loss (`runs.<run>.addons`).

The trainer (`tfd.trainer.Trainer.train_one_step`) applies them, once for every method: on each step
it draws the add-on's batch (after `make_batch`, from the same checkpointed generators), and on the
steps where the method returns a `generator` loss it adds `weight * addon_loss` to it. A method
only has to provide `Method.generate(z, cond)`, the differentiable one-step map its sampler uses
(the base class: `x = G(a z; s, c)`; `cd` overrides it with its consistency function).

`el_style` (`ELStyleCfg`): an Embedding-Loss-STYLE term (after Ying et al. 2026, "Efficient
Diffusion Distillation via Embedding Loss", arXiv 2604.22379): the unbiased MMD^2 between a
generated batch and a real-data batch in the features of `num_nets` frozen, randomly initialised
small ConvNets, with a multi-bandwidth Gaussian kernel. Only the paper's abstract is public (notes:
`notes/dpdmd-el.md`): its networks, kernel, bandwidths, layers, weight, batch sizes and whether the
networks are re-drawn are NOT known, so EVERY setting below is OURS, not the paper's, and a row using
it must say "EL-style", never "EL". Our choices follow public precedents, not EL:

- real batch: `groups_per_rank` conditions drawn by the run's data sampler (class-balanced on a
  class benchmark; prompt positives on a text benchmark), `n_per_group` real examples of each; the
  generated batch has the SAME conditions (`n_per_group` each) and its own noise z (torch's RNG), so
  both sets have the same class mix. The MMD is taken over the whole batch (`per_condition: false`) or
  within each condition and averaged (`per_condition: true`).
- networks: `depth` blocks of Conv3x3 (`width` channels, He-normal weights, zero bias) -> `activation`
  -> 2x2 average pooling (no pooling once the map is 1x1), as the random ConvNet of distribution-matching
  dataset condensation (Zhao & Bilen 2023); the embedding is the flattened last map (`embedding: last`)
  or every block's map, concatenated (`all`). Net i is drawn
  from a CPU generator seeded by `seed` and i (`resample: false`: the same nets all run long), or by
  `seed`, i and the training step (`resample: true`: new nets every step, a function of the step, so
  a resumed run draws the same ones). The nets are frozen (`requires_grad False`), are not entries of
  `networks()` (no optimiser, not in the checkpoint: they are rebuilt from the seed), and their
  parameters never receive a gradient; the loss's gradient reaches the generator only.
- kernel: DAN-style multi-kernel Gaussian (Long et al. 2015): k(a, b) = sum_j exp(-|a - b|^2 / g_j),
  g_j = base * `bandwidth_factor` ^ (j - `num_bandwidths` // 2), base = the `bandwidth_base` (mean or
  median) of the pairwise squared distances over both sets (no gradient through it).
- estimator: the unbiased MMD^2 (Gretton et al. 2012, diagonals left out); its expectation is 0
  when the two batches come from one distribution. The loss is the mean over the nets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import UserError


@dataclass
class ELStyleCfg:
    """`runs.<run>.addons.el_style`: every value is OURS (the EL paper's settings are not public)."""
    weight: float = 1.0                 # added to the generator loss as weight * MMD^2
    num_nets: int = 4                   # random ConvNets; the loss is the mean of their MMD^2
    width: int = 32                     # channels of every conv of a net
    depth: int = 2                      # Conv3x3 -> activation -> AvgPool2 blocks (8x8 digits: 2x2 x 32 = 128-d)
    activation: Literal["relu", "leaky_relu", "silu"] = "relu"
    embedding: Literal["last", "all"] = "last"   # the last block's flattened map, or every block's, concatenated
    resample: bool = False              # False: fixed nets; True: new nets every step (from seed and step)
    seed: int = 0
    num_bandwidths: int = 5             # Gaussian kernels, bandwidths spaced by bandwidth_factor
    bandwidth_factor: float = 2.0
    bandwidth_base: Literal["mean", "median"] = "mean"   # of the pairwise squared distances
    groups_per_rank: int = 10           # conditions per step (per process)
    n_per_group: int = 4                # real and generated samples of each condition
    per_condition: bool = False         # False: one MMD over the whole batch; True: the mean of per-condition MMDs

    def __post_init__(self):
        for key in ("num_nets", "width", "depth", "num_bandwidths", "groups_per_rank"):
            if getattr(self, key) < 1:
                raise UserError(f"el_style.{key} must be >= 1, got {getattr(self, key)}")
        if self.groups_per_rank * self.n_per_group < 2:
            raise UserError("el_style: groups_per_rank * n_per_group must be >= 2 (the unbiased MMD needs pairs)")
        if self.n_per_group < 1 or (self.per_condition and self.n_per_group < 2):
            raise UserError(f"el_style.n_per_group must be >= 1 (>= 2 with per_condition), got {self.n_per_group}")
        if self.bandwidth_factor <= 1.0:
            raise UserError(f"el_style.bandwidth_factor must be > 1, got {self.bandwidth_factor}")
        if self.weight < 0:
            raise UserError(f"el_style.weight must be >= 0, got {self.weight}")


@dataclass
class AddonsCfg:
    """`runs.<run>.addons`: generator-loss add-ons of a training run (None: off)."""
    el_style: Optional[ELStyleCfg] = None

    @property
    def active(self) -> bool:
        return self.el_style is not None


# ----------------------------------------------------------------------------------------------
# the pieces (pure functions, tested on their own)


ACTIVATIONS = {"relu": F.relu, "leaky_relu": F.leaky_relu, "silu": F.silu}


class RandomConvNet(nn.Module):
    """A frozen random ConvNet: `depth` x (Conv3x3 `width` -> activation -> AvgPool2 while the map is
    > 1x1), He-normal weights and zero biases from a CPU generator seeded by `seed`; `forward(x)` ->
    `[N, D]` float32: the flattened last map (`embedding` last) or every block's, concatenated (all)."""

    def __init__(self, in_channels: int, width: int, depth: int, seed: int, activation: str = "relu",
                 embedding: str = "last"):
        super().__init__()
        self.act, self.embedding = ACTIVATIONS[activation], embedding
        g = torch.Generator().manual_seed(int(seed))
        self.convs = nn.ModuleList()
        cin = in_channels
        for _ in range(depth):
            conv = nn.Conv2d(cin, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
            cin = width
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, outs = x.float(), []
        for conv in self.convs:
            x = self.act(conv(x))
            if min(x.shape[-2:]) > 1:
                x = F.avg_pool2d(x, 2)
            outs.append(x.flatten(1))
        return outs[-1] if self.embedding == "last" else torch.cat(outs, dim=1)


def net_seed(seed: int, index: int, step: int | None = None) -> int:
    """The seed of random net `index` (63-bit, numpy SeedSequence of seed, index and, when the nets
    are re-drawn every step, the step)."""
    words = [int(seed), int(index)] + ([int(step)] if step is not None else [])
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances `[len(a), len(b)]` in float64, from the differences (exact, and its
    gradient is 0, not NaN, at coincident points, unlike a square root's)."""
    return (a.double()[:, None] - b.double()[None]).square().sum(-1)


def multi_bandwidth_kernel(a: torch.Tensor, b: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """sum_j exp(-|a_i - b_k|^2 / gamma_j) -> `[len(a), len(b)]` (float64 distances)."""
    d2 = sqdist(a, b)
    return torch.exp(-d2[None] / gammas.double().reshape(-1, 1, 1)).sum(0)


def bandwidths(x: torch.Tensor, y: torch.Tensor, num: int, factor: float, base: str = "mean") -> torch.Tensor:
    """DAN-style bandwidths `[num]`: base * factor ^ (j - num // 2), base = the mean (or median) of the
    pairwise squared distances between distinct points of x and y together; no gradient."""
    with torch.no_grad():
        z = torch.cat([x, y]).double()
        d2 = sqdist(z, z)
        off = d2[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
        b = off.mean() if base == "mean" else off.median()
        b = b.clamp(min=1e-12)
        j = torch.arange(num, dtype=torch.float64, device=z.device) - num // 2
        return b * float(factor) ** j


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) of samples x `[n, D]`, y `[m, D]` (n, m >= 2) with
    the multi-bandwidth Gaussian kernel: mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j)
    - 2 mean k(x_i, y_j). float64; may be slightly negative."""
    n, m = len(x), len(y)
    kxx = multi_bandwidth_kernel(x, x, gammas)
    kyy = multi_bandwidth_kernel(y, y, gammas)
    kxy = multi_bandwidth_kernel(x, y, gammas)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()


# ----------------------------------------------------------------------------------------------
# the add-on a trainer applies


class ELStyle:
    """The `el_style` add-on of one run: its frozen random nets, its batch and its loss."""

    def __init__(self, cfg: ELStyleCfg, in_channels: int, device="cpu"):
        self.cfg, self.in_channels, self.device = cfg, int(in_channels), device
        self._nets = None if cfg.resample else self._build(step=None)

    def _build(self, step: int | None) -> list[RandomConvNet]:
        c = self.cfg
        return [RandomConvNet(self.in_channels, c.width, c.depth, net_seed(c.seed, i, step), c.activation,
                              c.embedding).to(self.device) for i in range(c.num_nets)]

    def nets(self, step: int) -> list[RandomConvNet]:
        """The nets of training step `step` (the fixed ones, or those drawn for this step)."""
        return self._nets if self._nets is not None else self._build(step)

    def make_batch(self, method) -> dict:
        """The real batch (the run's data sampler: `groups_per_rank` conditions x `n_per_group`) and the
        generator noise for the same conditions (torch's RNG); drawn on every step."""
        c = self.cfg
        real, cond = method.data.sample(c.groups_per_rank, c.n_per_group)
        cond = cond.to(method.device).repeat_interleave(c.n_per_group)
        real = real.flatten(0, 1).to(method.device)
        return {"real": real, "cond": cond, "z": torch.randn(real.shape, device=method.device)}

    def features(self, x: torch.Tensor, step: int) -> list[torch.Tensor]:
        return [net(x) for net in self.nets(step)]

    def loss(self, x: torch.Tensor, real: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Mean over the nets of the unbiased MMD^2 between generated `x` and `real` (float32 scalar);
        `per_condition`: rows are `groups` consecutive blocks of `n_per_group` (one condition each) and
        the MMD is the mean over the blocks."""
        c = self.cfg
        k = c.n_per_group if c.per_condition else len(x)
        vals = []
        for net in self.nets(step):
            fx, fy = net(x), net(real.float())
            for lo in range(0, len(fx), k):
                a, b = fx[lo:lo + k], fy[lo:lo + k]
                g = bandwidths(a, b, c.num_bandwidths, c.bandwidth_factor, c.bandwidth_base)
                vals.append(mmd2_unbiased(a, b, g))
        loss = torch.stack(vals).mean().float()
        return loss, {"el_style_mmd2": float(loss.detach())}


class Addons:
    """The add-ons of one run, applied by the trainer to the method's generator loss."""

    def __init__(self, cfg: AddonsCfg, sample_shape, device="cpu"):
        self.cfg = cfg
        self.el_style = ELStyle(cfg.el_style, sample_shape[0], device) if cfg.el_style is not None else None

    def settings(self) -> dict:
        """What a checkpoint records (a run resumed with other add-on settings starts afresh)."""
        return dataclasses.asdict(self.cfg)

    def make_batch(self, method) -> dict:
        """All of the add-ons' randomness for one step (every step, so the RNG streams do not depend on
        which steps update the generator)."""
        return {"el_style": self.el_style.make_batch(method)} if self.el_style is not None else {}

    def generator_loss(self, method, batch: dict, step: int) -> tuple[torch.Tensor | None, dict]:
        """The weighted sum of the add-on losses for the generator (None: no add-on), and metrics."""
        total, metrics = None, {}
        if self.el_style is not None:
            b = batch["el_style"]
            x = method.generate(b["z"], b["cond"])
            loss, m = self.el_style.loss(x, b["real"], step)
            total = self.el_style.cfg.weight * loss
            metrics.update(m)
        return total, metrics


def build_addons(cfg: AddonsCfg | None, sample_shape, device="cpu") -> Addons | None:
    """The run's `Addons`, or None when it has none."""
    return Addons(cfg, sample_shape, device) if cfg is not None and cfg.active else None
