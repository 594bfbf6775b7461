"""Conditions as a type: the condition list of a benchmark.

A benchmark evaluates its generators on a fixed *condition list*: the class indices of a
class-conditional benchmark (`ClassConditions`), or the rows of a prompt table of a text-to-image
one (`PromptTable`: id, caption, optional real-image ids). Sample `i` of an evaluation gets the
condition `conditions[i % len(conditions)]` and the seed `base_seed + i` (the suite's sampling rule;
EDM's `generate.py` draws class `i % C` the same way for balanced classes), for every sampler and for
the convergence record. Conditions travel as int64 *condition ids* (a class index, or a prompt
row id); the denoiser encodes them. Sample files store the ids in `arr_1` and, for a prompt
table, its sha256 (`conditions_sha256`), so a score can check it reads the right captions.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ClassConditions:
    """The class indices `0 .. num_classes - 1`; an unconditional benchmark (`num_classes` 0) has
    one condition, id 0, which the denoiser ignores."""

    num_classes: int
    kind: str = field(default="class", init=False)

    @property
    def ids(self) -> np.ndarray:
        """Condition ids, int64 `[len]`."""
        return np.arange(max(self.num_classes, 1), dtype=np.int64)

    def __len__(self) -> int:
        return max(self.num_classes, 1)

    @property
    def sha256(self) -> Optional[str]:
        """None: a class list is described by its length alone."""
        return None

    def for_samples(self, idx) -> np.ndarray:
        """Condition ids of evaluation samples `idx` (int array): `ids[i % len]`, int64."""
        return self.ids[np.asarray(idx, dtype=np.int64) % len(self)]

    def describe(self) -> str:
        return f"{len(self)} classes; sample i gets class i % {len(self)}"


@dataclass(frozen=True)
class PromptTable:
    """A prompt table: one row per prompt with an int64 `id`, the caption `text` and, where known,
    the real images it captions (`image_ids`, e.g. COCO image ids; empty when none). The row order
    is the condition order: sample `i` gets row `i % len`."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    image_ids: tuple[tuple[str, ...], ...] = ()
    source: str = ""
    kind: str = field(default="prompt", init=False)

    def __post_init__(self):
        if len(self.ids) != len(self.texts):
            raise ValueError(f"prompt table {self.source or '(in memory)'}: {len(self.ids)} ids for "
                             f"{len(self.texts)} texts")
        if not self.ids:
            raise ValueError(f"prompt table {self.source or '(in memory)'} is empty")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"prompt table {self.source or '(in memory)'}: duplicate prompt ids")
        if self.image_ids and len(self.image_ids) != len(self.ids):
            raise ValueError(f"prompt table {self.source or '(in memory)'}: image_ids has {len(self.image_ids)} rows, "
                             f"expected {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def row_of(self) -> dict[int, int]:
        return {i: r for r, i in enumerate(self.ids)}

    def for_samples(self, idx) -> np.ndarray:
        """Prompt ids of evaluation samples `idx`: `ids[i % len]`, int64."""
        return np.asarray(self.ids, dtype=np.int64)[np.asarray(idx, dtype=np.int64) % len(self)]

    def captions(self, cond_ids) -> list[str]:
        """Captions of condition ids (int array); KeyError names an id not in the table."""
        rows = self.row_of
        try:
            return [self.texts[rows[int(i)]] for i in np.asarray(cond_ids).ravel()]
        except KeyError as e:
            raise KeyError(f"prompt id {e.args[0]} is not in the prompt table {self.source or '(in memory)'}") from None

    @property
    def sha256(self) -> str:
        """sha256 of the canonical JSON of (id, text, image ids) rows: the table's identity in sample files."""
        rows = [[int(i), t, list(self.image_ids[r]) if self.image_ids else []]
                for r, (i, t) in enumerate(zip(self.ids, self.texts))]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def describe(self) -> str:
        return f"{len(self)} prompts (sha256 {self.sha256[:12]}); sample i gets prompt row i % {len(self)}"

    def save_jsonl(self, path: str | Path) -> None:
        """One JSON object per line: {"id", "text", "image_ids"} (written atomically)."""
        from eval.io import atomic_write_text

        lines = [json.dumps({"id": int(i), "text": t, "image_ids": list(self.image_ids[r]) if self.image_ids else []},
                            ensure_ascii=False) for r, (i, t) in enumerate(zip(self.ids, self.texts))]
        atomic_write_text(path, "\n".join(lines) + "\n")


def load_prompt_table(path: str | Path) -> PromptTable:
    """Read a prompt table: `.jsonl` (objects with `id`, `text`, optional `image_ids`), `.csv`
    (columns `id`, `text`, optional `image_ids` separated by `;`) or `.txt` (one caption per line,
    ids 0..n-1, DMD2's COCO prompt format). Raises FileNotFoundError / ValueError naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt table not found: {path}")
    ids, texts, images = [], [], []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids.append(int(row["id"]))
                texts.append(str(row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'id' and 'text' ({e})") from None
            images.append(tuple(str(v) for v in row.get("image_ids") or ()))
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"id", "text"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: needs the columns 'id' and 'text' (found {reader.fieldnames})")
            for n, row in enumerate(reader, 2):
                try:
                    ids.append(int(row["id"]))
                except ValueError:
                    raise ValueError(f"{path}:{n}: id {row['id']!r} is not an integer") from None
                texts.append(row["text"])
                images.append(tuple(v for v in (row.get("image_ids") or "").split(";") if v))
    elif path.suffix == ".txt":
        texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        ids = list(range(len(texts)))
    else:
        raise ValueError(f"{path}: unknown prompt table format {path.suffix!r} (use .jsonl, .csv or .txt)")
    has_images = any(images)
    return PromptTable(tuple(ids), tuple(texts), tuple(images) if has_images else (), source=str(path))
