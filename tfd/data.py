"""Datasets: the embedded `digits` and `shapes` benchmarks and EDM's ImageNet-64 dataset zip.

Images are float32 NCHW in [-1, 1]; labels are int64 class indices.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from eval.digits_data import digits_arrays  # noqa: F401
from eval.errors import UserError
from eval.modes import shapes_arrays  # noqa: F401


def load_edm_zip(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an EDM dataset zip (PNG files + `dataset.json` with `{"labels": [[fname, label], ...]}`).

    Returns `(images [N,C,H,W] float32 in [-1,1], labels [N] int64)`, ordered by file name as
    EDM's `ImageFolderDataset` does.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset zip not found: {path} (build it with EDM's dataset_tool.py)")
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith(".png"))
        if not names:
            raise UserError(f"{path}: no PNG files in the zip")
        if "dataset.json" not in z.namelist():
            raise UserError(f"{path}: no dataset.json with labels (class-conditional data needs it)")
        labels = dict(json.loads(z.read("dataset.json"))["labels"])
        imgs = []
        for n in names:
            a = np.asarray(Image.open(io.BytesIO(z.read(n))))
            imgs.append(a[:, :, None] if a.ndim == 2 else a)
    x = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    missing = [n for n in names if n not in labels]
    if missing:
        raise UserError(f"{path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    y = np.array([labels[n] for n in names], dtype=np.int64)
    return x, y


class ConditionSampler(Protocol):
    """What a method draws its real data from: "k real examples of each of G conditions".

    `sample(G, k)` -> (examples `[G, k, *sample_shape]` float32, condition ids `[G]` int64);
    `random_conditions(n)` -> condition ids `[n]` int64 drawn uniformly; every draw uses
    `generator`, which the trainer checkpoints (exact resume). `ClassBalancedSampler` is the
    class-conditional implementation; a text-to-image benchmark serves prompt ids and their
    positives (real images or teacher samples) the same way.
    """

    generator: torch.Generator

    def sample(self, G: int, k: int, conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def random_conditions(self, n: int) -> torch.Tensor:
        ...


@dataclass
class ClassBalancedSampler:
    """"Give me `k` real examples of each of `G` conditions", for class conditions: draws `k`
    examples of each of `G` classes (TFD: 4 positives + 4 anchors per class).

    `images` `[N, C, H, W]` float32, `labels` `[N]` int64 in `0 .. num_conditions - 1`
    (default: `labels.max() + 1`). `sample(G, k)` returns images `[G, k, C, H, W]` and the
    condition ids `[G]`; conditions are drawn without replacement (when G <= their number),
    examples within a class without replacement when the class has >= k. `random_conditions(n)`
    draws n condition ids uniformly with replacement (DMD2's labels). Every draw uses
    `generator`, which the trainer checkpoints. Raises ValueError for a class with no example.
    """

    images: torch.Tensor
    labels: torch.Tensor
    generator: torch.Generator
    num_conditions: int | None = None

    def __post_init__(self):
        top = int(self.labels.max()) + 1
        if self.num_conditions is None:
            self.num_conditions = top
        elif top > self.num_conditions or int(self.labels.min()) < 0:
            raise UserError(f"labels range {int(self.labels.min())}..{top - 1} is outside the benchmark's "
                             f"{self.num_conditions} conditions")
        self.by_class = [torch.nonzero(self.labels == c).flatten() for c in range(self.num_conditions)]
        empty = [c for c, idx in enumerate(self.by_class) if len(idx) == 0]
        if empty:
            raise UserError(f"classes {empty} have no examples")

    def sample_conditions(self, G: int) -> torch.Tensor:
        if G <= self.num_conditions:
            return torch.randperm(self.num_conditions, generator=self.generator)[:G]
        return torch.randint(self.num_conditions, (G,), generator=self.generator)

    def random_conditions(self, n: int) -> torch.Tensor:
        """n condition ids `[n]` int64, uniform with replacement."""
        return torch.randint(max(self.num_conditions, 1), (n,), generator=self.generator)

    def sample(self, G: int, k: int, conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        conditions = self.sample_conditions(G) if conditions is None else conditions
        out = []
        for c in conditions.tolist():
            idx = self.by_class[c]
            if len(idx) >= k:
                pick = idx[torch.randperm(len(idx), generator=self.generator)[:k]]
            else:
                pick = idx[torch.randint(len(idx), (k,), generator=self.generator)]
            out.append(self.images[pick])
        return torch.stack(out), conditions
