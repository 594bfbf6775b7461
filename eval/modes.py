"""The embedded `shapes` benchmark: a class-conditional benchmark whose modes are known exactly.

Images are 8x8 RGB, uint8 NHWC (`[N, 8, 8, 3]`) in the sample files and float32 NCHW in [-1, 1]
(`u8 / 127.5 - 1`) for training. Black background; one 3x3 shape in one of four corners:

* class (`SHAPES`, 4): filled `square`, `plus`, `x`, hollow `ring` (the 3x3 `TEMPLATES`);
* sub-mode (12 per class): colour (`PALETTE`: red, green, blue, saturated) x position (`POSITIONS`:
  the 3x3 block at rows/cols 0..2 or 5..7, i.e. the four corners with a 2-pixel gap); sub-mode id
  `s = colour * 4 + position`, global mode id `class * 12 + s` (48 modes).

The sub-modes of a class have a Zipf-like long-tailed frequency (`TRUE_FREQ`): the sub-mode of rank
k = 1..12 has probability (1/k) / H_12 (H_12 = sum_k 1/k = 3.1032), from 32.2% down to 2.69%;
class c's rank-k sub-mode is `(5 * (k - 1) + 3 * c) % 12` (a fixed permutation, so each class has
other rare modes). The `RARE` modes are the four least frequent of each class (rank 9..12, true
frequency 3.58%, 3.22%, 2.93%, 2.69%; `RARE_MAX_FREQ` = 0.0365), 16 in all.

The mode-reading rule (`read_modes`, pure numpy, no learned network): a pixel is foreground when
its largest channel is >= `FG_THRESHOLD` (128); the foreground mask must equal one template at one
position exactly (no pixel of tolerance: the filled square and the ring differ in one pixel);
the colour is the palette colour nearest (Euclidean, uint8 units) to the mean foreground colour, at
most `COLOUR_TOL` (80) away, and every foreground pixel's nearest palette colour must be that same
colour. Anything else (blank, noise, two shapes, a shape off the grid, mixed colours) is off-mode.

The real data (`shapes_dataset`) holds each sub-mode in its true proportion exactly (largest-
remainder quotas of `n_per_class` images per class) in an order shuffled with a fixed seed, each
pixel with intensity jitter the rule cannot mistake (`jitter`): background channels 0..25, a
foreground pixel's palette channel 215..255 and its other channels 0..25 (so its largest channel is
>= 215 >= FG_THRESHOLD and it is at most 53 from its palette colour, < COLOUR_TOL). Without it the
4,800 images would be 48 distinct ones, and the k-NN balls of precision/recall would have radius 0.
"""
from __future__ import annotations

import numpy as np

from eval.errors import UserError

RESOLUTION = 8
CHANNELS = 3
SHAPES = ("square", "plus", "x", "ring")
NUM_CLASSES = len(SHAPES)
TEMPLATES = np.array([
    [[1, 1, 1], [1, 1, 1], [1, 1, 1]],   # square
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]],   # plus
    [[1, 0, 1], [0, 1, 0], [1, 0, 1]],   # x
    [[1, 1, 1], [1, 0, 1], [1, 1, 1]],   # ring (hollow square)
], dtype=bool)
COLOURS = ("red", "green", "blue")
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
POSITIONS = ((0, 0), (0, 5), (5, 0), (5, 5))     # top-left corner (row, col) of the 3x3 block
POSITION_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
SUBMODES = len(COLOURS) * len(POSITIONS)           # 12 per class
NUM_MODES = NUM_CLASSES * SUBMODES                  # 48
FG_THRESHOLD = 128                                  # foreground: max channel >= this (uint8)
COLOUR_TOL = 80.0                                   # max Euclidean distance (uint8 units) to the palette colour
RARE_MAX_FREQ = 0.0365                              # rare: true frequency <= this (ranks 9..12 of each class)
DATA_SEED = 0
JITTER_LOW = 25                                     # jitter: channels that are 0 in `render` -> 0..25
JITTER_HIGH = 215                                   # jitter: channels that are 255 in `render` -> 215..255
DATA_PER_CLASS = 1200                               # 4,800 real images
#: the generated data's version: raise it with any change to how the data are drawn (render, jitter,
#: quotas, seed) -- the DAG's teacher and feature-net specs carry it, so Snakemake reruns what used them
DATA_VERSION = 2


def _true_freq() -> np.ndarray:
    """[NUM_CLASSES, SUBMODES] float64, each row sums to 1: rank k -> (1/k) / H_12."""
    zipf = 1.0 / np.arange(1, SUBMODES + 1)
    zipf /= zipf.sum()
    freq = np.zeros((NUM_CLASSES, SUBMODES))
    for c in range(NUM_CLASSES):
        for k in range(SUBMODES):
            freq[c, (5 * k + 3 * c) % SUBMODES] = zipf[k]
    return freq


TRUE_FREQ = _true_freq()
RARE = TRUE_FREQ <= RARE_MAX_FREQ                   # [NUM_CLASSES, SUBMODES] bool, 4 per class


def _masks() -> np.ndarray:
    """[NUM_CLASSES, len(POSITIONS), 8, 8] bool: each template placed at each position."""
    m = np.zeros((NUM_CLASSES, len(POSITIONS), RESOLUTION, RESOLUTION), dtype=bool)
    for t in range(NUM_CLASSES):
        for p, (r, c) in enumerate(POSITIONS):
            m[t, p, r:r + 3, c:c + 3] = TEMPLATES[t]
    return m


MASKS = _masks()


def submode_id(colour, position):
    """Sub-mode id within a class: `colour * 4 + position` (arrays or ints)."""
    return np.asarray(colour) * len(POSITIONS) + np.asarray(position)


def render(shape: int, colour: int, position: int) -> np.ndarray:
    """One image of a mode: uint8 [8, 8, 3] (black background, the palette colour on the template)."""
    img = np.zeros((RESOLUTION, RESOLUTION, CHANNELS), dtype=np.uint8)
    img[MASKS[shape, position]] = PALETTE[colour]
    return img


def jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel intensity jitter of `render` images (uint8 [N, 8, 8, 3], channels 0 or 255): each 0
    becomes uniform 0..JITTER_LOW, each 255 uniform JITTER_HIGH..255 (numpy `rng`). The rule reads
    the result as the same mode (module docstring)."""
    low = rng.integers(0, JITTER_LOW + 1, images.shape, dtype=np.int64)
    high = rng.integers(JITTER_HIGH, 256, images.shape, dtype=np.int64)
    return np.where(images == 255, high, low).astype(np.uint8)


def quotas(n_per_class: int) -> np.ndarray:
    """[NUM_CLASSES, SUBMODES] int64 image counts, each row summing to `n_per_class`, nearest to
    `n_per_class * TRUE_FREQ` (largest remainder; ties to the lower sub-mode id)."""
    ideal = TRUE_FREQ * n_per_class
    counts = np.floor(ideal).astype(np.int64)
    for c in range(NUM_CLASSES):
        rest = n_per_class - counts[c].sum()
        order = np.argsort(-(ideal[c] - counts[c]), kind="stable")
        counts[c, order[:rest]] += 1
    return counts


def shapes_dataset(n_per_class: int = DATA_PER_CLASS,
                   seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real images: `(images uint8 [N, 8, 8, 3], labels int64 [N] (shape), submodes int64 [N])`,
    N = 4 * `n_per_class`, each sub-mode in its `quotas` count, shuffled by numpy
    `default_rng(seed)`, then `jitter`ed by `default_rng([seed, 1])`. UserError for `n_per_class` < 1."""
    if n_per_class < 1:
        raise UserError(f"shapes: n_per_class must be >= 1, got {n_per_class}")
    counts = quotas(n_per_class)
    labels = np.repeat(np.arange(NUM_CLASSES), counts.sum(1))
    subs = np.concatenate([np.repeat(np.arange(SUBMODES), counts[c]) for c in range(NUM_CLASSES)])
    order = np.random.default_rng(seed).permutation(len(labels))
    labels, subs = labels[order].astype(np.int64), subs[order].astype(np.int64)
    table = np.stack([np.stack([render(c, s // len(POSITIONS), s % len(POSITIONS)) for s in range(SUBMODES)])
                      for c in range(NUM_CLASSES)])          # [C, 12, 8, 8, 3]
    return jitter(table[labels, subs], np.random.default_rng([seed, 1])), labels, subs


def shapes_arrays(split: str = "all", holdout: float = 0.2, seed: int = DATA_SEED,
                  mode_labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's data as the training code wants it: `(images [N, 3, 8, 8] float32 in [-1, 1],
    labels [N] int64)`; labels are the class (shape), or with `mode_labels` the global mode id
    `class * 12 + sub-mode` (the feature network's target). `split` is `all`, `train` or `test`
    (a fixed hold-out of `holdout` of the images, chosen by `seed`). UserError for another split."""
    u8, y, s = shapes_dataset(seed=seed)
    x = u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    lab = y * SUBMODES + s if mode_labels else y
    if split == "all":
        return x, lab
    test = np.zeros(len(y), dtype=bool)
    test[np.random.default_rng(seed + 1).permutation(len(y))[:int(round(holdout * len(y)))]] = True
    if split == "train":
        return x[~test], lab[~test]
    if split == "test":
        return x[test], lab[test]
    raise UserError(f"unknown split {split!r}: expected 'all', 'train' or 'test'")


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"read_modes: expected uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (RESOLUTION, RESOLUTION, CHANNELS):
        raise UserError(f"read_modes: expected shapes images [N, {RESOLUTION}, {RESOLUTION}, {CHANNELS}] "
                        f"(uint8 NHWC), got shape {images.shape}")
    return images


def read_modes(images: np.ndarray) -> np.ndarray:
    """The mode of each image by the rule (module docstring): int64 [N, 3] rows `(shape, colour,
    position)`, or `(-1, -1, -1)` for an off-mode image. `images` uint8 [N, 8, 8, 3]; TypeError for
    another dtype, UserError for another shape."""
    images = _check_images(images)
    n = len(images)
    out = np.full((n, 3), -1, dtype=np.int64)
    if n == 0:
        return out
    fg = images.max(axis=-1) >= FG_THRESHOLD                          # [N, 8, 8]
    flat = MASKS.reshape(-1, RESOLUTION * RESOLUTION)                  # [16, 64]
    eq = (fg.reshape(n, 1, -1) == flat[None]).all(-1)                   # [N, 16]; masks differ: <= 1 match
    hit = eq.any(1)
    which = eq.argmax(1)
    px = images.reshape(n, -1, CHANNELS).astype(np.float64)           # [N, 64, 3]
    w = fg.reshape(n, -1, 1)
    mean = (px * w).sum(1) / np.maximum(w.sum(1), 1)                  # [N, 3]
    pal = PALETTE.astype(np.float64)
    d_mean = np.linalg.norm(mean[:, None] - pal[None], axis=-1)       # [N, 3]
    colour = d_mean.argmin(1)
    near = np.linalg.norm(px[:, :, None] - pal[None, None], axis=-1).argmin(-1)   # [N, 64]
    same = np.where(fg.reshape(n, -1), near == colour[:, None], True).all(1)
    ok = hit & (d_mean[np.arange(n), colour] <= COLOUR_TOL) & same
    out[ok, 0] = which[ok] // len(POSITIONS)
    out[ok, 1] = colour[ok]
    out[ok, 2] = which[ok] % len(POSITIONS)
    return out


def class_histogram(modes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per conditioning class, the sample count of each sub-mode and of `off` (not a mode of that
    class): int64 [NUM_CLASSES, SUBMODES + 1] (last column `off`). `modes` from `read_modes`
    ([N, 3]), `labels` int64 [N] the conditioning classes. UserError for labels outside 0..3 or
    lengths that differ."""
    modes, labels = np.asarray(modes), np.asarray(labels)
    if labels.shape != (len(modes),):
        raise UserError(f"labels have shape {labels.shape}, expected ({len(modes)},) (one per sample)")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"labels range {labels.min()}..{labels.max()} is outside the {NUM_CLASSES} shapes classes")
    on = (modes[:, 0] == labels) & (modes[:, 0] >= 0)
    col = np.where(on, submode_id(modes[:, 1], modes[:, 2]), SUBMODES)
    hist = np.zeros((NUM_CLASSES, SUBMODES + 1), dtype=np.int64)
    np.add.at(hist, (labels, col), 1)
    return hist


def total_variation(hist: np.ndarray) -> np.ndarray:
    """Per class, the total variation distance 0.5 * sum |p_sample - p_true| over the 12 sub-modes
    and the `off` bin (true mass 0): float64 [NUM_CLASSES] in [0, 1]; a class with no sample: 1."""
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.sum(1, keepdims=True)
    p = np.divide(hist, n, out=np.zeros_like(hist), where=n > 0)
    q = np.concatenate([TRUE_FREQ, np.zeros((NUM_CLASSES, 1))], axis=1)
    tv = 0.5 * np.abs(p - q).sum(1)
    return np.where(n[:, 0] > 0, tv, 1.0)


def frequency_table() -> list[dict]:
    """The true frequency of every mode, as rows {class, shape, sub-mode, colour, position, freq, rare}."""
    return [{"class": c, "shape": SHAPES[c], "submode": s, "colour": COLOURS[s // len(POSITIONS)],
             "position": POSITION_NAMES[s % len(POSITIONS)], "freq": float(TRUE_FREQ[c, s]), "rare": bool(RARE[c, s])}
            for c in range(NUM_CLASSES) for s in range(SUBMODES)]
