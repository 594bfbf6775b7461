"""Datasets: the embedded `digits` and `shapes` benchmarks and EDM's ImageNet-64 dataset zip.

Images are float32 NCHW in [-1, 1]; labels are int64 class indices.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from eval.digits_data import digits_arrays  # noqa: F401
from eval.errors import UserError
from eval.modes import shapes_arrays  # noqa: F401

if TYPE_CHECKING:
    from tfd.datastore import DataStore


def load_edm_zip(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an EDM dataset zip (PNG files + `dataset.json` with `{"labels": [[fname, label], ...]}`)
    into memory (all of it, decoded on one core: for large data use the store, `tfd.datastore`).

    Returns `(images [N,C,H,W] float32 in [-1,1], labels [N] int64)`, ordered by file name as
    EDM's `ImageFolderDataset` does (`tfd.datastore.edm_zip_index`, whose errors it raises).
    """
    from tfd.datastore import edm_zip_index, read_member

    path = Path(path)
    names, y = edm_zip_index(path)
    with zipfile.ZipFile(path) as z:
        imgs = [read_member(z, path, n) for n in names]
    x = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return x, y


def dequantise_table(device: str | torch.device = "cpu") -> torch.Tensor:
    """The float32 value of each uint8 `v` (`[256]`, on `device`): `v / 127.5 - 1` computed by numpy
    on the CPU exactly as `load_edm_zip` computes it. Looking values up in this table gives the same
    bits on every device (CUDA's division by a scalar multiplies by its reciprocal, which differs
    from true division in the last bit for 111 of the 256 values)."""
    return torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0).to(device)


def dequantise_u8(u8_nhwc: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images `[..., H, W, C]` -> float32 `[..., C, H, W]` in [-1, 1] on their device,
    bit-identical to `load_edm_zip`'s values (`dequantise_table`; pass `table` on that device to
    reuse it)."""
    table = dequantise_table(u8_nhwc.device) if table is None else table
    return table[u8_nhwc.long()].movedim(-1, -3).contiguous()


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


class ClassDraws:
    """The draws of the class-balanced samplers, shared so that `ClassBalancedSampler` (images in
    memory) and `StoreSampler` (rows of a memory-mapped store) draw the same indices, conditions
    and images from the same `generator` state. A subclass sets `by_class` (class c's rows, `[n_c]`
    int64, ascending), `num_conditions` and `generator`, and reads rows with `rows`."""

    by_class: list[torch.Tensor]
    num_conditions: int
    generator: torch.Generator

    def _check_classes(self, lo: int, top: int) -> None:
        """Set `num_conditions` (default: `top`, one more than the largest label); UserError for
        labels outside it (`lo` < 0 or `top` > num_conditions)."""
        if self.num_conditions is None:
            self.num_conditions = top
        elif top > self.num_conditions or lo < 0:
            raise UserError(f"labels range {lo}..{top - 1} is outside the benchmark's "
                            f"{self.num_conditions} conditions")

    def _check_nonempty(self) -> None:
        empty = [c for c, idx in enumerate(self.by_class) if len(idx) == 0]
        if empty:
            raise UserError(f"classes {empty} have no examples")

    def sample_conditions(self, G: int) -> torch.Tensor:
        """G condition ids `[G]` int64: without replacement when G <= num_conditions, else with."""
        if G <= self.num_conditions:
            return torch.randperm(self.num_conditions, generator=self.generator)[:G]
        return torch.randint(self.num_conditions, (G,), generator=self.generator)

    def random_conditions(self, n: int) -> torch.Tensor:
        """n condition ids `[n]` int64, uniform with replacement."""
        return torch.randint(max(self.num_conditions, 1), (n,), generator=self.generator)

    def draw(self, G: int, k: int, conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows `[G, k]` int64 on `by_class`'s device, condition ids `[G]`): `k` rows of each
        condition, without replacement when its class has >= k rows."""
        conditions = self.sample_conditions(G) if conditions is None else conditions
        picks = []
        for c in conditions.tolist():
            idx = self.by_class[c]
            if len(idx) >= k:
                picks.append(idx[torch.randperm(len(idx), generator=self.generator)[:k]])
            else:
                picks.append(idx[torch.randint(len(idx), (k,), generator=self.generator)])
        return torch.stack(picks), conditions

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Images of `rows` `[G, k]`: float32 `[G, k, C, H, W]` in [-1, 1]."""
        raise NotImplementedError

    def sample(self, G: int, k: int, conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images `[G, k, C, H, W]` float32, condition ids `[G]` int64); see `draw`."""
        rows, conditions = self.draw(G, k, conditions)
        return self.rows(rows), conditions


@dataclass
class ClassBalancedSampler(ClassDraws):
    """"Give me `k` real examples of each of `G` conditions", for class conditions: draws `k`
    examples of each of `G` classes (TFD: 4 positives + 4 anchors per class).

    `images` `[N, C, H, W]` float32, `labels` `[N]` int64 in `0 .. num_conditions - 1`
    (default: `labels.max() + 1`). `sample(G, k)` returns images `[G, k, C, H, W]` and the
    condition ids `[G]`; conditions are drawn without replacement (when G <= their number),
    examples within a class without replacement when the class has >= k. `random_conditions(n)`
    draws n condition ids uniformly with replacement (DMD2's labels). Every draw uses
    `generator`, which the trainer checkpoints. Raises ValueError for a class with no example.
    `StoreSampler` draws the same from a memory-mapped store.
    """

    images: torch.Tensor
    labels: torch.Tensor
    generator: torch.Generator
    num_conditions: int | None = None

    def __post_init__(self):
        self._check_classes(int(self.labels.min()), int(self.labels.max()) + 1)
        self.by_class = [torch.nonzero(self.labels == c).flatten() for c in range(self.num_conditions)]
        self._check_nonempty()

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows]


@dataclass
class StoreSampler(ClassDraws):
    """`ClassBalancedSampler` over a dataset store (`tfd.datastore.open_store`): the same draws
    from the same `generator` state (rows, conditions and bit-identical images), but only the
    drawn rows are read from the memory-mapped uint8 `[N, H, W, C]` array, moved to `device` as
    uint8 and converted there to float32 `[G, k, C, H, W]` in [-1, 1] (`dequantise_u8`). The
    process holds the labels and class index (16 B per image), not the images: its memory does
    not grow with the data set (the pages it reads are the kernel's file cache). UserError for
    labels outside `num_conditions` or a class with no example."""

    store: "DataStore"
    generator: torch.Generator
    num_conditions: int | None = None
    device: str | torch.device = "cpu"

    def __post_init__(self):
        labels = self.store.labels
        self._check_classes(int(labels.min()), int(labels.max()) + 1)
        k = self.store.num_classes
        self.by_class = [torch.from_numpy(self.store.rows_of_class(c).copy()) if c < k else
                         torch.zeros(0, dtype=torch.int64) for c in range(self.num_conditions)]
        self._check_nonempty()
        self._table = dequantise_table(self.device)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        u8 = torch.from_numpy(np.asarray(self.store.images[rows.flatten().cpu().numpy()]))  # reads these rows only
        x = dequantise_u8(u8.to(self.device), self._table)
        return x.reshape(*rows.shape, *x.shape[1:])
