"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", ICLR, Sec. 4 / App. D),
computed as torch-fidelity 0.4.0 computes it (`torch_fidelity.metric_kid.kid_features_to_metric`).

KID is the squared maximum mean discrepancy between the sample and the reference feature
distributions under the cubic polynomial kernel

    k(x, y) = (gamma * <x, y> + coef0) ** degree,   degree = 3, gamma = 1 / D, coef0 = 1,

(D the feature dimension), estimated on `subsets` pairs of random subsets, each of `m` samples and
`m` reference features drawn without replacement, with the estimator of Binkowski et al.'s MMD-GAN
code that torch-fidelity calls `unbiased` (the within-set sums drop the diagonal, the cross sum keeps it):

    MMD^2(X, Y) = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2.

The value is the mean over the subsets, reported with their standard deviation (population std,
numpy's default ddof=0, as torch-fidelity). It is in the kernel's units (squared features scaled by
1/D, no x1000 scaling) and can be slightly negative when the two distributions are close.

Subsets: `numpy.random.RandomState(seed)`, for each subset first `choice(N_samples, m, replace=False)`
then `choice(N_reference, m, replace=False)` -- torch-fidelity's stream with the samples as its
`input1` and the reference as its `input2` -- so with the same seed (2020, torch-fidelity's default) the
numbers equal torch-fidelity's. `m = min(subset_size, N_samples, N_reference)`: torch-fidelity refuses
a subset size above either count; we shrink it instead and record the size used. Everything in float64.
"""
from __future__ import annotations

import numpy as np

from eval.errors import UserError

# torch-fidelity 0.4.0's defaults (torch_fidelity/defaults.py: kid_subsets, kid_subset_size, rng_seed,
# kid_kernel_poly_degree / _gamma (None: 1/D) / _coef0)
SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020
DEGREE = 3
COEF0 = 1.0

DEFINITION = ("KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (<x,y>/D + 1)^3, mean (and std) over "
              "random subsets; torch-fidelity 0.4.0's estimator, subset draws and seed")


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = DEGREE, gamma: float | None = None,
                      coef0: float = COEF0) -> np.ndarray:
    """`(gamma * x @ y.T + coef0) ** degree` for x [n, D] and y [m, D] -> [n, m] (float64);
    `gamma` None means 1/D."""
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = DEGREE, gamma: float | None = None,
                  coef0: float = COEF0) -> float:
    """MMD^2 between the sets x [m, D] and y [m, D] (same m >= 2) with the polynomial kernel: the
    within-set means over the m (m - 1) off-diagonal pairs, the cross mean over all m^2 pairs (the
    module's formula)."""
    m = len(x)
    if len(y) != m or m < 2:
        raise UserError(f"MMD^2 needs two sets of the same size >= 2, got {len(x)} and {len(y)}")
    within = 0.0
    for s in (x, y):
        k = polynomial_kernel(s, s, degree, gamma, coef0)
        within += k.sum() - np.trace(k)
    cross = polynomial_kernel(x, y, degree, gamma, coef0).sum()
    return float(within / (m * (m - 1)) - 2.0 * cross / (m * m))


def kid(samples, reference, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = SEED,
        degree: int = DEGREE, gamma: float | None = None, coef0: float = COEF0) -> dict:
    """KID between sample features [N, D] and reference features [M, D] (any float dtype, used in
    float64): -> dict(mean, std, subsets, subset_size (the m used), subset_size_requested, seed,
    kernel (degree, gamma, coef0), n_samples, n_reference). UserError for shapes that are not
    [N, D] with the same D, fewer than 2 points in either set, or `subsets` < 1."""
    f = np.asarray(samples, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise UserError(f"KID needs features [N, D] with the same D, got {f.shape} and {r.shape}")
    m = min(int(subset_size), len(f), len(r))
    if m < 2 or subsets < 1:
        raise UserError(f"KID needs subsets >= 1 of >= 2 points, got {subsets} subsets of {m} "
                        f"({len(f)} samples, {len(r)} reference features)")
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        fi = rng.choice(len(f), m, replace=False)  # the draw order is torch-fidelity's: input1 first
        ri = rng.choice(len(r), m, replace=False)
        values[s] = mmd2_unbiased(f[fi], r[ri], degree, gamma, coef0)
    return dict(mean=float(values.mean()), std=float(values.std()), subsets=int(subsets), subset_size=m,
                subset_size_requested=int(subset_size), seed=int(seed),
                kernel=dict(kind="polynomial", degree=degree, gamma=1.0 / f.shape[1] if gamma is None else gamma,
                            coef0=coef0),
                n_samples=len(f), n_reference=len(r))
