"""The data of the embedded `digits` benchmark: scikit-learn's 8x8 handwritten digits.

Used by the digits feature network (`eval.digits_net`, trained on the `train` split and checked
on the held-out `test` split) and, through `tfd.data`, by the benchmark itself (`all`).
"""
from __future__ import annotations

import numpy as np

from eval.errors import UserError


def digits_arrays(split: str = "all", holdout: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) scaled to [-1, 1].

    Returns `(images [N,1,8,8] float32, labels [N] int64)`. `split` is `all`, `train` or `test`
    (a fixed stratified hold-out of `holdout` of each class, chosen by `seed`). Source:
    `sklearn.datasets.load_digits` (pixel values 0..16 map to `v / 8 - 1`). ValueError for an
    unknown split.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    if split == "all":
        return x, y
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(holdout * len(idx))), replace=False)] = True
    if split == "train":
        return x[~test], y[~test]
    if split == "test":
        return x[test], y[test]
    raise UserError(f"unknown split {split!r}: expected 'all', 'train' or 'test'")
