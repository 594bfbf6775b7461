"""The domain feature network of the embedded benchmarks: `digits` (8x8 grayscale, 10 classes) and,
the same network on other data (`DATA`), `shapes` (8x8 RGB, its 48 modes as the classes; feature
extractor `shapes`, metrics `fid_shapes`, ...).

A small CNN classifier trained on `eval.digits_data.digits_arrays('train')`; its 64-d penultimate
layer is the feature space of `fid_digits` / `precision_digits` / `recall_digits`, and its argmax
is the classifier of `class_acc`. It plays the role Inception plays for ImageNet: frozen, versioned
by the sha256 of its weights file, and identical for every method that is scored.

Input: float32 NCHW in [-1, 1] (a uint8 image `u8` maps to `u8 / 127.5 - 1`).

Weights are a safetensors file whose metadata holds the architecture kwargs, the held-out accuracy
and the feature dimension, so `load_digits_net(path)` needs nothing else. The file is built by the
DAG rule `digits_feature_net` (which calls `train_digits_net`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.digits_data import digits_arrays
from eval.errors import UserError
from eval.io import atomic_save_safetensors, file_sha256, load_safetensors, read_safetensors_metadata
from eval.sample import dequantise_edm

FORMAT = "tfd-digits-net-v1"
DAG_RULE = "digits_feature_net"


def _data_arrays(data: str, split: str):
    """(images float32 NCHW in [-1, 1], labels int64) of a feature network's training `data`."""
    if data == "digits":
        return digits_arrays(split)
    from eval.modes import shapes_arrays
    return shapes_arrays(split, mode_labels=True)


# data -> (architecture defaults, max_shift default, what the labels are)
DATA = {
    "digits": ({}, 1, "eval.digits_data.digits_arrays('train'), held-out digits_arrays('test')"),
    "shapes": ({"num_classes": 48, "img_channels": 3}, 0,
               "eval.modes.shapes_arrays('train', mode_labels=True) (the 48 modes as classes), held-out 'test'"),
}


class DigitsNet(nn.Module):
    """conv(1->c1) -> conv(c1->c2) -> maxpool 2 -> conv(c2->c2) -> fc(feat_dim) -> fc(10).

    `features(x)` returns the penultimate activations (SiLU, so no unit is dead and the feature
    covariance stays full rank); `forward(x)` returns the 10 logits.
    """

    def __init__(self, c1: int = 32, c2: int = 64, feat_dim: int = 64, num_classes: int = 10,
                 img_resolution: int = 8, img_channels: int = 1):
        super().__init__()
        self.arch = dict(c1=c1, c2=c2, feat_dim=feat_dim, num_classes=num_classes,
                         img_resolution=img_resolution, img_channels=img_channels)
        self.conv1 = nn.Conv2d(img_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        r = img_resolution // 2
        self.fc1 = nn.Linear(c2 * r * r, feat_dim)
        self.fc2 = nn.Linear(feat_dim, num_classes)
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(x))
        x = F.silu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = F.silu(self.conv3(x))
        return F.silu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer shifts of up to `max_shift` pixels, padding with the background value -1."""
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * p)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return torch.gather(xp, 3, cols)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def train_digits_net(out_path: str | os.PathLike, seed: int = 0, epochs: int = 15, batch_size: int = 64,
                     lr: float = 2e-3, max_shift: int | None = None, num_threads: int | None = 1,
                     verbose: bool = False, data: str = "digits", **arch) -> dict:
    """Train the feature network on `data`'s train split and save it to `out_path`: `digits`
    (`digits_arrays('train')`, 10 classes) or `shapes` (`eval.modes.shapes_arrays('train')`, the 48
    modes as classes, RGB); UserError for another `data`. The data is recorded in the file (`data`).

    Light augmentation: random shifts of up to `max_shift` pixels (default: 1 for digits, 0 for
    shapes, whose position is part of the label). Adam with a cosine learning-rate
    decay. Evaluated on the fixed held-out split `digits_arrays('test')`. The safetensors file is
    written atomically (`eval.io.atomic_save_safetensors`). Returns `dict(test_acc, train_acc,
    train_seconds, epochs, seed, path, sha256)`.

    `num_threads` (default 1) caps torch's intra-op threads while training: the network is so small
    that extra threads only add synchronisation, and on a shared/busy CPU two spinning threads were
    measured 15x slower than one. The previous setting is restored afterwards.
    """
    prev_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    if data not in DATA:
        raise UserError(f"unknown feature-network data {data!r}: expected one of {sorted(DATA)}")
    arch = {**DATA[data][0], **arch}
    max_shift = DATA[data][1] if max_shift is None else max_shift
    try:
        return _train(out_path, seed, epochs, batch_size, lr, max_shift, verbose, arch, data)
    finally:
        torch.set_num_threads(prev_threads)


def _train(out_path, seed, epochs, batch_size, lr, max_shift, verbose, arch, data="digits") -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = (torch.from_numpy(a) for a in _data_arrays(data, "train"))
    xte, yte = (torch.from_numpy(a) for a in _data_arrays(data, "test"))
    net = DigitsNet(**arch)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            xb = _shift_augment(xtr[idx], g, max_shift) if max_shift > 0 else xtr[idx]
            loss = F.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {ep + 1}/{epochs} loss {loss.item():.4f} test_acc {accuracy(net, xte, yte):.4f}")
    net.eval()
    test_acc = accuracy(net, xte, yte)
    train_acc = accuracy(net, xtr, ytr)
    seconds = time.time() - t0

    out_path = Path(out_path)
    meta = {
        "format": FORMAT,
        "arch": json.dumps(net.arch, sort_keys=True),
        "feature_dim": str(net.feat_dim),
        "test_acc": repr(test_acc),
        "train_acc": repr(train_acc),
        "n_test": str(len(xte)),
        "train": json.dumps(dict(seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, max_shift=max_shift,
                                 data=DATA[data][2]), sort_keys=True),
        "torch": torch.__version__,
        **({"data": data} if data != "digits" else {}),   # digits files stay byte-identical
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_save_safetensors(state, out_path, meta)  # byte-reproducible (one sorted metadata key)
    return dict(test_acc=test_acc, train_acc=train_acc, train_seconds=seconds, epochs=epochs, seed=seed,
                path=str(out_path), sha256=file_sha256(out_path))


def missing_net_error(path) -> FileNotFoundError:
    return FileNotFoundError(
        f"digits feature network not found: {path}. It is built by the DAG rule `rule {DAG_RULE}` "
        f"(e.g. `snakemake <path>` for that output, or `python -c \"from eval.digits_net import "
        f"train_digits_net; train_digits_net('{path}')\"`)."
    )


def read_metadata(path: str | os.PathLike) -> dict:
    """The file's metadata (`eval.io.read_safetensors_metadata`)."""
    return read_safetensors_metadata(path)


def load_digits_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitsNet:
    """Load a network saved by `train_digits_net` (eval mode, no grad). Missing file ->
    FileNotFoundError naming the path and the DAG rule that builds it."""

    path = Path(path)
    if not path.is_file():
        raise missing_net_error(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a digits feature network (metadata format={meta.get('format')!r}, "
                         f"expected {FORMAT!r}); rebuild it with `rule {DAG_RULE}`")
    net = DigitsNet(**json.loads(meta["arch"]))
    net.load_state_dict(load_safetensors(path, "digits feature network")[0], strict=True)
    net.test_acc = float(meta.get("test_acc", "nan"))
    net.data = meta.get("data", "digits")
    net.requires_grad_(False)
    return net.eval().to(device)


def u8_to_float(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy) or NCHW (torch) -> float32 NCHW in [-1, 1] via `u8 / 127.5 - 1`
    (`eval.sample.dequantise_edm`). TypeError for non-uint8 input."""
    if isinstance(u8, np.ndarray):
        if u8.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got {u8.dtype}")
        u8 = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)
    if u8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {u8.dtype}")
    return dequantise_edm(u8)
