"""Max pairwise SSIM within each class (a mode-collapse / diversity check).

For every class, the SSIM of every unordered pair of generated images of that class; the class's
value is the maximum, the metric the mean over classes. SSIM is `pytorch_msssim.ssim` on float64
images in [0, 255] with `data_range=255`, `size_average=False`, Gaussian window, K=(0.01, 0.03):
Wang et al.'s setting, equal to `skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=win_sigma, use_sample_covariance=False, data_range=255)` (valid-region mean).

Small images. pytorch_msssim silently degrades when a side is smaller than the window: it *skips*
the Gaussian filter along that dimension (only a `UserWarning`), so on 8x8 digits with the default
11-px window there is no smoothing at all and SSIM becomes a per-pixel statistic. We therefore
clamp explicitly: `win_size = min(11, largest odd number <= min(H, W))` and, when clamped, scale
the Gaussian with it, `win_sigma = 1.5 * win_size / 11`. Scaling keeps the window a 3.5-sigma
truncated Gaussian, which is skimage's convention (`truncate=3.5`, radius `int(3.5*sigma+0.5)`), so
skimage with `sigma=win_sigma` uses exactly the same window and the two agree; keeping sigma=1.5
in a 7-tap window would instead be a Gaussian cut at +-2 sigma that skimage cannot express.
For 8x8 digits: win_size 7, win_sigma 0.954545 (a 2x2 valid SSIM map per pair). The actual
settings are returned by `ssim_settings` and recorded in the metric's provenance.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from eval.errors import UserError

DEFAULT_WIN = 11
DEFAULT_SIGMA = 1.5


def ssim_settings(height: int, width: int, win_size: int = DEFAULT_WIN, win_sigma: float = DEFAULT_SIGMA) -> dict:
    """The window actually used for images of this size (see the module docstring)."""
    side = min(height, width)
    largest_odd = side if side % 2 == 1 else side - 1
    if largest_odd < 1:
        raise UserError(f"image too small for SSIM: {height}x{width}")
    ws, sg, clamped = win_size, win_sigma, False
    if win_size > largest_odd:
        ws = largest_odd
        sg = win_sigma * ws / win_size
        clamped = True
    return dict(win_size=int(ws), win_sigma=float(sg), clamped=clamped, requested_win_size=win_size,
                requested_win_sigma=win_sigma, data_range=255.0, K=[0.01, 0.03], gaussian=True,
                implementation="pytorch_msssim.ssim(size_average=False, win=float64 Gaussian), float64 images, "
                               "valid-region mean",
                rule="win_size clamped to the largest odd <= min(H, W); win_sigma scaled by the same ratio")


def gaussian_window(win_size: int, win_sigma: float, channels: int) -> torch.Tensor:
    """pytorch_msssim's 1-D Gaussian window (same formula) built in float64, shaped [C,1,1,win]
    for its `win=` argument. Its own window is built in float32, which alone costs ~3e-6 against
    skimage; in float64 the two agree to ~1e-12."""
    coords = torch.arange(win_size, dtype=torch.float64) - win_size // 2
    g = torch.exp(-(coords ** 2) / (2 * win_sigma ** 2))
    g = g / g.sum()
    return g.view(1, 1, 1, win_size).repeat(channels, 1, 1, 1)


def ssim_pairs(a: torch.Tensor, b: torch.Tensor, settings: dict) -> torch.Tensor:
    """SSIM of image pairs a[i], b[i] (float64 [P,C,H,W] in [0,255]) -> [P]."""
    from pytorch_msssim import ssim

    win = gaussian_window(settings["win_size"], settings["win_sigma"], a.shape[1])
    with warnings.catch_warnings():
        # the window never exceeds the image here; anything else pytorch_msssim warns about is a bug
        warnings.simplefilter("error", UserWarning)
        return ssim(a, b, data_range=settings["data_range"], size_average=False, win=win)


def _to_float_nchw(images_u8_nhwc: np.ndarray) -> torch.Tensor:
    x = np.asarray(images_u8_nhwc)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 NHWC images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(torch.float64)


def max_pairwise_ssim(images_u8_nhwc: np.ndarray, labels: np.ndarray | None = None, *,
                      win_size: int = DEFAULT_WIN, win_sigma: float = DEFAULT_SIGMA,
                      pair_batch: int = 4096) -> tuple[float, dict]:
    """-> (mean over classes of the per-class max pairwise SSIM, {class: max SSIM}).

    `labels=None` treats all images as one class. Classes with fewer than 2 images are skipped
    (and absent from the dict)."""
    x = _to_float_nchw(images_u8_nhwc)
    labels = np.zeros(len(x), np.int64) if labels is None else np.asarray(labels)
    if len(labels) != len(x):
        raise UserError(f"{len(x)} images but {len(labels)} labels")
    settings = ssim_settings(x.shape[2], x.shape[3], win_size, win_sigma)
    per_class = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        xc = x[idx]
        ii, jj = np.triu_indices(len(idx), k=1)
        best = -np.inf
        for s in range(0, len(ii), pair_batch):
            i, j = torch.from_numpy(ii[s:s + pair_batch]), torch.from_numpy(jj[s:s + pair_batch])
            best = max(best, float(ssim_pairs(xc[i], xc[j], settings).max()))
        per_class[int(c)] = best
    if not per_class:
        raise UserError("no class has two or more images")
    return float(np.mean(list(per_class.values()))), per_class


__all__ = ["max_pairwise_ssim", "ssim_settings", "ssim_pairs"]
