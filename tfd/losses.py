"""TFD losses: the drifting loss (paper Eqs. 2-7, 11) and the anchor-margin coverage loss (Eqs. 12-14).

Both losses take per-layer features grouped by condition (one group = one class or prompt):
`gen` [G, Ng, D] carries gradients (generated features through the frozen teacher), the
references (`pos`, `anchors`) do not. Everything is computed in float32 whatever the input dtype.
Batch statistics (the distance scale, the per-radius drift norm, the anchor bandwidth) are taken
over the *global* batch: under DDP they are all-reduced / all-gathered across ranks, so a loss on
`W` ranks that each hold `G / W` groups equals the single-process loss on all `G` groups
(mean of the rank losses; rank gradients divided by `W`, as DDP's gradient averaging does).
All ranks must call the losses with equal shapes. The exact recipe is in
`notes/tfd-method.md`; the docstrings below name where it departs from the paper's text.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as nnf

from eval.errors import UserError
from tfd.dist import all_reduce_mean, get_world_size, is_distributed

__all__ = ["drifting_loss", "drift_field", "anchor_margin_loss"]

SELF_MASK = 100.0  # added to the normalised self-distance dn[g, i, i] (note: "mask own negative")
A_FLOOR = 1e-6  # floor of softmax_targets * softmax_generated before the sqrt (note)


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||_2 for [G, N, D] x [G, M, D] -> [G, N, M], as sqrt(clamp(sq_dist, 1e-8)).

    Uses the exact difference form (no |a|^2 + |b|^2 - 2ab cancellation) and the clamp keeps the
    square root's gradient finite at coincident points.
    """
    d = torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return d.square().clamp_min(1e-8).sqrt()


def _self_mask(ng: int, n_targets: int, like: torch.Tensor) -> torch.Tensor:
    """[Ng, Ng+Np] tensor with SELF_MASK on the diagonal of the generated (negative) block."""
    eye = torch.eye(ng, dtype=like.dtype, device=like.device) * SELF_MASK
    return nnf.pad(eye, (0, n_targets - ng))


def drift_field(
    x: torch.Tensor,
    pos: torch.Tensor,
    radii: Sequence[float],
    normalization: str = "double",
    *,
    _repulsion: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-radius drifting field V(x) of Eqs. 2-4, in units of the feature scale `s`.

    Args:
        x: generated features [G, Ng, D] (treated as constants; detach before calling).
        pos: positive (real) features [G, Np, D] of the same groups.
        radii: kernel temperatures tau of Eq. 3, on distances normalised by the batch mean distance.
        normalization: "double" (default; Drifting-Model code, see `drifting_loss`) or "paper"
            (Eqs. 2-4 literally).
        _repulsion: private ablation switch; False keeps only the attraction half. Written
            relative to x, V = sum_k A-_ik * sum_j A+_ij (y+_j - x_i) - sum_j A+_ij *
            sum_k A-_ik (y-_k - x_i) (the x_i terms cancel), so attraction-only keeps the first
            sum ("paper": V+ alone). The bare `sum A- * (A+ @ pos)` term would not be
            translation-equivariant (it is an absolute position, not a displacement).

    Returns:
        F [G, Ng, D]: sum over radii of V_R / sqrt(max(mean(V_R^2), 1e-8)), no grad.
        s: scalar feature scale max(mean(d) / sqrt(D), 1e-3); targets are x / s + F.
        stats: detached scalars `drift_raw_R{R}` = mean(V_R^2) = E||V_R||^2 / D before the
            per-radius normalisation, and `scale` = mean(d) (both global under DDP).
    """
    if normalization not in ("double", "paper"):
        raise UserError(f"normalization must be 'double' or 'paper', got {normalization!r}")
    x = x.detach().float()
    pos = pos.detach().float()
    _, ng, dim = x.shape
    y = torch.cat([x, pos], dim=1)                       # targets; the first Ng are negatives
    d = _pairwise_dist(x, y)                             # [G, Ng, Ng+Np]
    scale = all_reduce_mean(d.mean())                    # one scalar for the global batch
    s = (scale / math.sqrt(dim)).clamp_min(1e-3)
    dn = d / scale.clamp_min(1e-3) + _self_mask(ng, y.shape[1], d)
    xs, ps = x / s, pos / s

    field = torch.zeros_like(x)
    stats: dict[str, torch.Tensor] = {}
    for r in radii:
        logits = -dn / r                                 # Laplace kernel exp(-||x - y|| / tau), Eq. 3
        if normalization == "double":
            a = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(A_FLOOR).sqrt()
            an, ap = a[..., :ng], a[..., ng:]
            if _repulsion:
                v = an.sum(-1, keepdim=True) * (ap @ ps) - ap.sum(-1, keepdim=True) * (an @ xs)
            else:  # attraction half of V = sum_j sum_k A+_ij A-_ik ((y+_j - x_i) - (y-_k - x_i))
                v = an.sum(-1, keepdim=True) * (ap @ ps - ap.sum(-1, keepdim=True) * xs)
        else:
            w_pos = logits[..., ng:].softmax(dim=-1)     # kernel-normalised weights of Eq. 2 (V+)
            w_neg = logits[..., :ng].softmax(dim=-1)     # over the self-masked generated set (V-)
            v = w_pos @ ps - xs                          # V+ = sum_j w_j (y+_j - x)
            if _repulsion:
                v = v - (w_neg @ xs - xs)                # V = V+ - V-, Eq. 4
        raw = all_reduce_mean(v.square().mean())
        field = field + v / raw.clamp_min(1e-8).sqrt()
        stats[f"drift_raw_R{r:g}"] = raw.detach()
    stats["scale"] = scale.detach()
    return field, s, stats


def drifting_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    radii: Sequence[float],
    normalization: str = "double",
    return_stats: bool = False,
    *,
    _repulsion: bool = True,
):
    """Drifting loss of one feature layer (Eqs. 7 and 11): mean((gen/s - sg(x/s + F))^2).

    With x = sg(gen), targets Y = [x, pos] and d = ||x_i - Y_j|| (clamped at sqrt(1e-8)):
    scale = mean(d) over the whole (global) batch, s = max(scale / sqrt(D), 1e-3), normalised
    distances dn = d / max(scale, 1e-3) with each sample masked from its own negatives
    (dn[g, i, i] += 100), and per radius R the logits -dn / R (Laplace kernel, Eq. 3).

    normalization="double" (default, the Drifting-Model code that TFD reuses):
        A = sqrt(max(softmax_targets(L) * softmax_generated(L), 1e-6)), split into A^- (the Ng
        generated columns) and A^+ (the Np positive columns), and
        V = sum_k A^-_ik * sum_j A^+_ij y+_j / s  -  sum_j A^+_ij * sum_k A^-_ik x_k / s
          = sum_{j,k} A^+_ij A^-_ik (y+_j - x_k) / s.
        This differs from Eq. 2: the kernel is normalised over both axes (a Sinkhorn-like
        geometric mean of the row and column softmaxes; the column softmax makes every positive
        pull on its nearest generated samples, which by itself spreads them over modes), and
        the two mean shifts are cross-weighted by the other set's kernel mass rather than each
        being a convex combination. The floor (A >= 1e-3, module constant A_FLOOR = 1e-6 on the
        product) is harmless at Ng = Np = 4 but swamps the kernel once typical products fall
        near 1e-6, i.e. groups of a few dozen samples or more, or positives far from every
        generated sample: far positives then all weigh 1e-3 and the attraction degenerates into
        a pull toward the positives' mean (a 2-D ring generator started at the ring's centre
        stays there with one group of 256, floor 1e-6, yet covers all modes with floor 1e-12 or
        with 16 groups of 16; benchmarks/toy_ring.py therefore uses 16 groups of 16).
    normalization="paper": Eqs. 2-4 literally, V = sum_j softmax_j(L+) (y+_j - x)/s
        - sum_k softmax_k(L-) (x_k - x)/s with the softmax over the positives and over the
        self-masked generated samples separately.
    Either way (not in the paper, which has one tau): each radius's field is divided by its
    global RMS sqrt(max(mean(V_R^2), 1e-8)) and the fields are summed over radii, F = sum_R.
    The loss therefore does not go to zero; monitor `drift_raw_R*` instead.

    Args:
        gen: generated features [G, Ng, D], with gradients.
        pos: positive features [G, Np, D]; receives no gradient.
        radii: kernel temperatures on the normalised distance, e.g. (0.02, 0.05, 0.1, 0.2).
        normalization: "double" or "paper" (see above).
        return_stats: also return a dict of detached scalars (`drift_raw_R{R}`, `scale`).

    Returns:
        loss (float32 scalar), or (loss, stats) when return_stats.
    """
    gen32 = gen.float()
    field, s, stats = drift_field(gen32.detach(), pos, radii, normalization, _repulsion=_repulsion)
    target = (gen32.detach() / s + field).detach()
    loss = (gen32 / s - target).square().mean()
    return (loss, stats) if return_stats else loss


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median of a flat tensor, averaging the two middle values for even sizes (as numpy)."""
    v = v.flatten().sort().values
    n = v.numel()
    return 0.5 * (v[(n - 1) // 2] + v[n // 2])


def _gather_flat(v: torch.Tensor) -> torch.Tensor:
    """Concatenate a detached tensor over ranks (equal shapes per rank); identity in one process."""
    v = v.detach().flatten().contiguous()
    if not is_distributed():
        return v
    parts = [torch.empty_like(v) for _ in range(get_world_size())]
    torch_dist.all_gather(parts, v)
    return torch.cat(parts)


def anchor_margin_loss(
    gen: torch.Tensor,
    anchors: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    return_stats: bool = False,
):
    """Anchor-margin coverage loss of one feature layer (Eqs. 12-14), per condition group.

    d_ij = ||a_i - z_j|| (anchors a [G, Na, D], no grad; generated z [G, Ng, D], grad);
    h = sg(median of all d_ij of the global batch) * temperature (all-gathered under DDP);
    s_i = mean_j exp(-d_ij / h)                       (Eq. 12; the paper prints 1/M, the mean
                                                       over the N generated samples is meant);
    sbar_i = mean_{k != i} exp(-||a_i - a_k|| / (2h)) (Eq. 13);
    loss = mean over groups and anchors of relu(alpha * sbar_i - s_i)  (Eq. 14).
    The median bandwidth is the note's choice (the paper does not say how h is set). With a
    single anchor per group sbar is defined as 0 (loss 0).

    Args:
        gen: generated features [G, Ng, D], with gradients.
        anchors: anchor features [G, Na, D]; receives no gradient.
        alpha: margin strength (rho_i = alpha * sbar_i).
        temperature: multiplies the median bandwidth.
        return_stats: also return detached `anchor_active` (share of this rank's anchors with a
            positive margin) and `anchor_bandwidth` (h).

    Returns:
        loss (float32 scalar), or (loss, stats) when return_stats.
    """
    z = gen.float()
    a = anchors.detach().float()
    na = a.shape[1]
    d_ag = _pairwise_dist(a, z)                                   # [G, Na, Ng]
    h = (_median(_gather_flat(d_ag)) * temperature).detach()
    support = torch.exp(-d_ag / h).mean(dim=-1)                   # s_i, [G, Na]
    k_aa = torch.exp(-_pairwise_dist(a, a) / (2.0 * h))           # [G, Na, Na]
    off_diag = 1.0 - torch.eye(na, dtype=k_aa.dtype, device=k_aa.device)
    self_support = (k_aa * off_diag).sum(-1) / max(na - 1, 1)      # sbar_i, [G, Na]
    margin = alpha * self_support - support
    loss = torch.relu(margin).mean()
    if not return_stats:
        return loss
    stats = {
        "anchor_active": (margin > 0).float().mean().detach(),
        "anchor_bandwidth": h,
    }
    return loss, stats
