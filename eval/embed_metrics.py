"""Metrics on embeddings of pretrained networks: FD_DINOv2 (EDM2) and CMMD (Jayasumana et al. 2024).

* `fd_dinov2` is the Frechet distance (`eval.metrics.fid`, i.e. `eval.fid.feature_stats` +
  `frechet_distance`, float64) of the `dinov2` extractor's features (`eval.features.
  Dinov2Extractor`: DINOv2 ViT-L/14 CLS token, EDM2's preprocessing) against reference statistics
  made with the same extractor (`tfd ref-stats` / `eval.score.make_ref_stats`). Comparable with
  EDM2's published FD_DINOv2 (same features, see `Dinov2Extractor`; same formula: EDM2 also takes
  `sigma` with N - 1 and the real part of `scipy.linalg.sqrtm`). EDM2's own reference statistics
  (`dataset-refs/img*.pkl`, entry `fd_dinov2`) are pickles, not our npz: converting them is not
  done here.
* `cmmd` is the maximum mean discrepancy with a Gaussian RBF kernel of the `cmmd_clip` extractor's
  embeddings (`eval.features.CmmdClipExtractor`: L2-normalised CLIP ViT-L/14-336 image embeddings)
  against the reference embeddings, which the reference statistics store under `features` (the
  default of `make_ref_stats`). The estimator is the reference's (google-research
  `cmmd/distance.py`, `mmd`): the biased, minimum-variance V-statistic of Gretton et al. 2012
  Eq. (5), diagonal terms included,

      CMMD = 1000 * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)),
      k(a, b) = exp(-||a - b||^2 / (2 sigma^2)),  sigma = 10,

  with `||a - b||^2` expanded as `|a|^2 + |b|^2 - 2 a.b` as there. The reference runs in float32
  (JAX); this runs in float64, blockwise (memory O(block * M), never an N x M matrix at once), so
  values agree with the reference's to its float32 rounding, not bit for bit: the three means are
  near 1 and cancel, so float32 leaves an absolute error of order 1e-4 on the x1000 scale (a numpy
  float32 emulation of the reference formula differed from this by 1.5e-4 at 2,000 and 4e-6 at
  10,000 random unit embeddings; the reference prints 3 decimals). Unitless; lower is better;
  published values (e.g. COCO-30k) are on this x1000 scale.

This module needs only numpy (the metric registry imports it at config-check time); the networks
live in `eval.features`.
"""
from __future__ import annotations

import numpy as np

from eval.errors import UserError

CMMD_SIGMA = 10.0   # bandwidth of the Gaussian RBF kernel (reference `_SIGMA`)
CMMD_SCALE = 1000.0  # the reference's `_SCALE`, "to make the metric more human readable"
MMD_BLOCK_ENTRIES = 1 << 23  # kernel-matrix entries evaluated at once (64 MiB of float64)


def _mean_rbf(a: np.ndarray, b: np.ndarray, gamma: float, block_entries: int) -> float:
    """mean over i, j of exp(-gamma * (|a_i|^2 + |b_j|^2 - 2 a_i.b_j)), float64, in row blocks."""
    an = np.einsum("ij,ij->i", a, a)
    bn = np.einsum("ij,ij->i", b, b)
    rows = max(1, block_entries // max(1, len(b)))
    total = 0.0
    for i in range(0, len(a), rows):
        d2 = an[i:i + rows, None] + bn[None, :] - 2.0 * (a[i:i + rows] @ b.T)
        total += float(np.exp(-gamma * d2).sum())
    return total / (len(a) * len(b))


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
            block_entries: int = MMD_BLOCK_ENTRIES) -> float:
    """`scale` * biased MMD^2 between embeddings `x` [N, D] and `y` [M, D] (any float dtype,
    computed in float64) with the Gaussian RBF kernel of bandwidth `sigma` -- google-research
    cmmd's `distance.mmd` (see the module docstring). Symmetric in x and y; 0 for equal sets.
    ValueError for empty sets or different widths."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise UserError(f"MMD needs embeddings [N, D] and [M, D] with N, M >= 1: got {x.shape} and {y.shape}")
    gamma = 1.0 / (2.0 * sigma ** 2)
    k_xx = _mean_rbf(x, x, gamma, block_entries)
    k_yy = _mean_rbf(y, y, gamma, block_entries)
    k_xy = _mean_rbf(x, y, gamma, block_entries)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))


def cmmd(features: np.ndarray, ref_features: np.ndarray | None) -> tuple[float, dict]:
    """CMMD of the sample embeddings `features` (float64 [N, D], the `cmmd_clip` extractor's
    L2-normalised CLIP embeddings) against the reference embeddings `ref_features` ([M, D], the
    reference statistics' `features`, stored float32 by `make_ref_stats`, which is exact since the
    network's values are float32): `mmd_rbf` with sigma 10, x1000 (unitless; lower is better).
    UserError when the reference statistics hold no embeddings (None)."""
    if ref_features is None:
        raise UserError("cmmd needs the reference embeddings, but the reference statistics store only mu/sigma; "
                        "rebuild them with `tfd ref-stats` (make_ref_stats(..., store_features=True)) and the "
                        "cmmd_clip extractor")
    value = mmd_rbf(features, ref_features)
    return value, {"formula": "1000 * biased MMD^2 (V-statistic), Gaussian RBF kernel sigma 10, float64 "
                              "(google-research cmmd distance.mmd)",
                   "sigma": CMMD_SIGMA, "scale": CMMD_SCALE, "n_real": int(len(ref_features))}
