"""Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in ADM's evaluator.py,
plus density and coverage (Naeem et al. 2020) from the same distances (`prdc`), and density and
coverage alone (`density_coverage`, one pass; the registered metrics use it with k = 5, Naeem et al.'s
recommendation, `eval.metrics.DC_K`).

Each set's manifold is the union of balls around its points whose radius is the distance to the
k-th nearest neighbour within the set (the point itself excluded). precision = share of generated
points inside at least one real ball; recall = share of real points inside at least one generated
ball. Membership is `distance <= radius` (ADM, torch-fidelity). Distances are computed in batches
of rows (float64 by default), so memory is `batch_size x N` and N ~ 10k is fine on a CPU.

Density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative
models", Sec. 3; reference implementation clovaai/generative-evaluation-prdc), with real points X_i
(i < N), generated points Y_j (j < M) and r_i the distance from X_i to its k-th nearest real neighbour:

    density  = 1 / (k M) * sum_j sum_i 1[ ||Y_j - X_i|| <= r_i ]      (>= 0, may exceed 1)
    coverage = 1 / N     * sum_i 1[ min_j ||Y_j - X_i|| <= r_i ]      (in [0, 1])

The reference implementation tests `<`; we keep `<=` as for precision/recall. The two differ only
when a distance equals a radius exactly (duplicated feature vectors), which continuous features
do not produce.
"""
from __future__ import annotations

import numpy as np
import torch

from eval.errors import UserError


def _t(x, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Gram-matrix form (fast); clamp the tiny negatives cancellation can leave before the sqrt
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d2.clamp_min_(0).sqrt_()


def knn_radii(feats, k: int = 3, batch_size: int = 1024, dtype=torch.float64) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    f = _t(feats, dtype)
    if len(f) <= k:
        raise UserError(f"need more than k={k} points, got {len(f)}")
    out = []
    for i in range(0, len(f), batch_size):
        d = _cdist(f[i:i + batch_size], f)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = 0.0  # the point itself: exactly 0, so it is the first of the k+1 smallest
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out).numpy()


def _inside_any(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int):
    """For each query point: inside any ball (bool), and the number of balls containing it."""
    inside, count = [], []
    for i in range(0, len(query), batch_size):
        m = _cdist(query[i:i + batch_size], centres) <= radii[None]
        inside.append(m.any(1))
        count.append(m.sum(1))
    return torch.cat(inside), torch.cat(count)


def prdc(real, fake, k: int = 3, batch_size: int = 1024, dtype=torch.float64) -> dict:
    """-> dict(precision, recall, density, coverage, k, n_real, n_fake)."""
    r, f = _t(real, dtype), _t(fake, dtype)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise UserError(f"features must be [N, D] with the same D, got {tuple(r.shape)} and {tuple(f.shape)}")
    rr = torch.as_tensor(knn_radii(r, k, batch_size, dtype))
    rf = torch.as_tensor(knn_radii(f, k, batch_size, dtype))
    f_in_real, f_count = _inside_any(f, r, rr, batch_size)
    r_in_fake, _ = _inside_any(r, f, rf, batch_size)
    # coverage: real points whose nearest generated point lies inside the real point's own ball
    cov = []
    for i in range(0, len(r), batch_size):
        nn = _cdist(r[i:i + batch_size], f).min(1).values
        cov.append(nn <= rr[i:i + batch_size])
    return dict(
        precision=float(f_in_real.to(torch.float64).mean()),
        recall=float(r_in_fake.to(torch.float64).mean()),
        density=float(f_count.to(torch.float64).sum() / (k * len(f))),
        coverage=float(torch.cat(cov).to(torch.float64).mean()),
        k=k, n_real=len(r), n_fake=len(f),
    )


def density_coverage(real, fake, k: int = 5, batch_size: int = 1024, dtype=torch.float64) -> dict:
    """Density and coverage (module docstring) of generated features `fake` [M, D] against real
    features `real` [N > k, D] (any float dtype; computed in `dtype`), in one pass over batches of
    real rows: -> dict(density, coverage, k, n_real, n_fake)."""
    r, f = _t(real, dtype), _t(fake, dtype)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1] or not len(f):
        raise UserError(f"features must be [N, D] with the same D, got {tuple(r.shape)} and {tuple(f.shape)}")
    rr = torch.as_tensor(knn_radii(r, k, batch_size, dtype))
    count, covered = 0, 0
    for i in range(0, len(r), batch_size):
        inside = _cdist(r[i:i + batch_size], f) <= rr[i:i + batch_size, None]  # [batch, M]: Y_j in ball i
        count += int(inside.sum())
        covered += int(inside.any(1).sum())  # some Y_j in ball i <=> the nearest one is
    return dict(density=count / (k * len(f)), coverage=covered / len(r), k=k, n_real=len(r), n_fake=len(f))


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    d = prdc(real, fake, k, batch_size)
    return d["precision"], d["recall"]
