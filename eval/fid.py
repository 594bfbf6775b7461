"""Frechet distance and reference statistics, all in float64.

* `feature_stats(F)` -> `(mu, sigma)` with `sigma = (F^T F - N mu mu^T) / (N - 1)` (EDM's formula,
  identical to `np.cov(F, rowvar=False)`). It is evaluated on centred features, which is the same
  number without the cancellation of the raw-moment form; `RunningStats` accumulates the raw
  moments batch by batch (EDM style, about a shift so the cancellation stays small) for
  streaming over large sample sets.
* `frechet_distance` = `||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))` with `scipy.linalg.sqrtm`,
  real part. Rank-deficient covariances (N <= dim): SciPy >= 1.16 returns a finite (complex)
  square root of the singular product and we take its real part, as clean-fid/TTUR do. Only if the
  square root is not finite do we fall back to clean-fid's/TTUR's fix, `sqrtm((S1 + eps I)(S2 + eps I))`
  with `eps = 1e-6` (reported through a warning). Like them we refuse a result whose diagonal has
  an imaginary part above 1e-3 (a numerically meaningless square root).
* Reference-statistics npz files: `mu`, `sigma`, a JSON `provenance` string (extractor, weights
  sha256, resolution, preprocessing, N, source) and optionally `features` (float32, needed for
  precision/recall). EDM's reference files (`mu`, `sigma` only) load with provenance "external".
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg

from eval.errors import BadFile, UserError
from eval.io import atomic_savez, read_npz

EXTERNAL = "external"
# provenance fields that must agree between sample features and reference statistics
PROVENANCE_KEYS = ("extractor", "sha256", "layer", "dim", "resolution", "preprocessing", "mode")


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(mu [D], sigma [D,D])` in float64; sigma = (F^T F - N mu mu^T)/(N-1) = np.cov(F, rowvar=False)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"need features [N>=2, D], got shape {f.shape}")
    mu = f.mean(axis=0)
    fc = f - mu
    sigma = fc.T @ fc / (f.shape[0] - 1)
    return mu, sigma


class RunningStats:
    """Streaming mean/covariance in float64 (EDM's raw-moment accumulation, shifted by the first
    batch's mean to avoid cancellation). `add(batch)` then `finish() -> (mu, sigma)`."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s1 = None
        self.s2 = None

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((f.shape[1], f.shape[1]))
        g = f - self.shift
        self.n += len(f)
        self.s1 += g.sum(axis=0)
        self.s2 += g.T @ g

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise UserError("need at least 2 samples")
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self.shift, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64 (see module doc)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "matrix is singular": handled below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: sqrtm of the covariance product is not finite; adding {eps} to the "
                      f"diagonal of both covariances (as clean-fid/TTUR)", RuntimeWarning, stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                             f"in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ----------------------------------------------------------------------------------------------
# reference statistics files


def save_ref_stats(path: str | os.PathLike, mu, sigma, provenance: dict, features: np.ndarray | None = None) -> None:
    """Write `mu`, `sigma` (float64), `provenance` (JSON string) and optionally `features`
    (float32, for precision/recall) to an npz, atomically. `provenance` should carry the
    extractor provenance plus `n` and `source`."""
    prov = dict(provenance)
    if features is not None:
        prov.setdefault("n", int(len(features)))
    arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                  provenance=np.array(json.dumps(prov, sort_keys=True)))
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    atomic_savez(path, **arrays)


def load_ref_stats(path: str | os.PathLike) -> dict:
    """Read and check a reference-statistics npz (the one reader of the format): -> dict(mu [D]
    float64, sigma [D, D] float64, provenance (dict, or "external" for files without one, e.g.
    EDM's `imagenet-64x64.npz`), features ([N, D] float32 or None), path).

    Refused with `BadFile` naming the file and the array: not a readable npz, no `mu`/`sigma`,
    shapes that do not agree (`mu` [D], `sigma` [D, D], `features` [N, D]), any NaN/inf in them, a
    provenance that is not JSON. FileNotFoundError when missing."""
    path = Path(path)
    z = read_npz(path, "reference statistics")
    if "mu" not in z or "sigma" not in z:
        raise BadFile(path, "not a reference-statistics npz", expected="arrays `mu` and `sigma`",
                      found=f"keys {sorted(z)}")
    out = dict(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64), path=str(path),
               provenance=str(z["provenance"]) if "provenance" in z else EXTERNAL, features=z.get("features"))
    if out["provenance"] != EXTERNAL:
        try:
            out["provenance"] = json.loads(out["provenance"])
        except json.JSONDecodeError as e:
            raise BadFile(path, "provenance is not JSON", key="provenance", found=str(e)) from None
    mu, sigma, feats = out["mu"], out["sigma"], out["features"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise BadFile(path, "shapes do not agree", key="mu/sigma", expected="mu [D], sigma [D, D]",
                      found=f"mu {mu.shape}, sigma {sigma.shape}")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != len(mu)):
        raise BadFile(path, "shapes do not agree", key="features", expected=f"[N, {len(mu)}]",
                      found=str(feats.shape))
    for key, a in (("mu", mu), ("sigma", sigma), ("features", feats)):
        if a is not None and not np.isfinite(a).all():
            raise BadFile(path, "non-finite values", key=key, expected="finite numbers",
                          found=f"{int((~np.isfinite(a)).sum())} NaN/inf of {a.size}",
                          hint="rebuild the reference statistics (tfd ref-stats)")
    return out


def check_ref_stats(path: str | os.PathLike, metrics, dim: int | None = None) -> dict:
    """Check reference statistics for a scoring call before any feature is computed: readable and
    finite (`load_ref_stats`), of the extractor's feature dimension `dim`, and holding reference
    features when one of `metrics` (registry names) needs them (`eval.metrics.needs_ref_features`:
    precision/recall, kid, density/coverage). Returns the loaded statistics; BadFile naming the
    file otherwise."""
    from eval.metrics import needs_ref_features

    ref = load_ref_stats(path)
    if dim is not None and ref["mu"].shape != (dim,):
        raise BadFile(path, "wrong feature dimension", key="mu", expected=f"{dim} (the configured extractor's)",
                      found=str(ref["mu"].shape[0]))
    need = [m for m in metrics if needs_ref_features(m)]
    if need and ref["features"] is None:
        raise BadFile(path, f"{', '.join(need)} need the reference features, but the file stores only mu/sigma",
                      key="features", hint="rebuild it with `tfd ref-stats` (which stores them), or drop "
                      "the metrics that need them from eval.metrics")
    return ref


class ProvenanceMismatch(UserError):
    """Sample features and reference statistics come from different feature extractors."""


def check_provenance(sample_prov: dict, ref_prov: dict | str, ref_path: str = "") -> None:
    """Raise ProvenanceMismatch when the sample extractor and the reference statistics disagree
    on any of PROVENANCE_KEYS present in both. External statistics (no provenance) pass with a
    warning; only their dimension can be checked (by the caller)."""
    if ref_prov == EXTERNAL:
        warnings.warn(f"reference statistics {ref_path} carry no provenance (external file): cannot check that "
                      f"they were computed with the same extractor ({sample_prov.get('extractor')})", stacklevel=2)
        return
    bad = {k: (sample_prov[k], ref_prov[k]) for k in PROVENANCE_KEYS
           if k in sample_prov and k in ref_prov and sample_prov[k] != ref_prov[k]}
    if bad:
        lines = "; ".join(f"{k}: samples {a!r} vs reference {b!r}" for k, (a, b) in bad.items())
        raise ProvenanceMismatch(f"reference statistics {ref_path} were computed with a different feature extractor "
                                 f"({lines}); rebuild them with the same extractor")
