"""Conditions as a type: the condition list of a benchmark.

A benchmark evaluates its generators on a fixed *condition list*: the class indices of a
class-conditional benchmark (`ClassConditions`), or the rows of a prompt table of a text-to-image
one (`PromptTable`: id, caption, optional real-image ids and file names; `load_prompt_table` reads
the suite's `.jsonl` / `.csv` and DMD2's `.txt` / `.pkl` caption lists, `eval.coco` builds a COCO
subset). Sample `i` of an evaluation gets the condition `conditions[i % len(conditions)]` and the
seed `base_seed + i` (the suite's sampling rule; EDM's `generate.py` draws class `i % C` the same
way for balanced classes), for every sampler and for the convergence record. Conditions travel as
int64 *condition ids* (a class index, or a prompt row id); the denoiser encodes them. Sample files
store the ids in `arr_1` and, for a prompt table, its sha256 (`conditions_sha256`), so a score can
check it reads the right captions.
"""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from eval.errors import BadFile, UserError


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
    """A prompt table: one row per prompt with an int64 `id` (for a COCO subset: the caption
    annotation id), the caption `text` and, where known, the real images it captions: `image_ids`
    (e.g. COCO image ids, as strings) and `file_names` (their image files, relative to an image
    folder). Each of the two is either `()` (unknown for the whole table) or one tuple per row
    (possibly empty). The row order is the condition order: sample `i` gets row `i % len`.
    ValueError (naming `source`) on mismatched lengths, an empty table or duplicate ids."""

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    image_ids: tuple[tuple[str, ...], ...] = ()
    source: str = ""
    file_names: tuple[tuple[str, ...], ...] = ()
    kind: str = field(default="prompt", init=False)

    def __post_init__(self):
        name = self.source or "(in memory)"
        if len(self.ids) != len(self.texts):
            raise UserError(f"prompt table {name}: {len(self.ids)} ids for {len(self.texts)} texts")
        if not self.ids:
            raise UserError(f"prompt table {name} is empty")
        if len(set(self.ids)) != len(self.ids):
            raise UserError(f"prompt table {name}: duplicate prompt ids")
        for key in ("image_ids", "file_names"):
            rows = getattr(self, key)
            if rows and len(rows) != len(self.ids):
                raise UserError(f"prompt table {name}: {key} has {len(rows)} rows, expected {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def row_of(self) -> dict[int, int]:
        return {i: r for r, i in enumerate(self.ids)}

    def for_samples(self, idx) -> np.ndarray:
        """Prompt ids of evaluation samples `idx`: `ids[i % len]`, int64."""
        return np.asarray(self.ids, dtype=np.int64)[np.asarray(idx, dtype=np.int64) % len(self)]

    def captions(self, cond_ids) -> list[str]:
        """Captions of condition ids (int array); UserError names an id not in the table (a sample
        file drawn with another prompt table)."""
        rows = self.row_of
        try:
            return [self.texts[rows[int(i)]] for i in np.asarray(cond_ids).ravel()]
        except KeyError as e:
            where = self.source or "(in memory)"
            raise UserError(f"prompt id {e.args[0]} is not in the prompt table {where}") from None

    def _row_dicts(self) -> list[dict]:
        """The rows as dicts {id, text, image_ids[, file_names]} (file_names only when the table has them)."""
        out = []
        for r, (i, t) in enumerate(zip(self.ids, self.texts)):
            row = {"id": int(i), "text": t, "image_ids": list(self.image_ids[r]) if self.image_ids else []}
            if self.file_names:
                row["file_names"] = list(self.file_names[r])
            out.append(row)
        return out

    @property
    def sha256(self) -> str:
        """sha256 of the canonical JSON of the rows `[id, text, image_ids]` (`+ [file_names]` when the
        table has file names, so tables without them keep their hash): the table's identity in
        sample files."""
        rows = [list(row.values()) for row in self._row_dicts()]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def describe(self) -> str:
        return f"{len(self)} prompts (sha256 {self.sha256[:12]}); sample i gets prompt row i % {len(self)}"

    def save_jsonl(self, path: str | Path) -> None:
        """One JSON object per line: {"id", "text", "image_ids"[, "file_names"]} (written atomically;
        the same table always gives the same bytes), and its checksum sidecar `<name>.sha256`
        (`eval.io.atomic_write_text_sealed`), verified by `load_prompt_table`."""
        from eval.io import atomic_write_text_sealed

        lines = [json.dumps(row, ensure_ascii=False) for row in self._row_dicts()]
        atomic_write_text_sealed(path, "\n".join(lines) + "\n")


def _str_tuple(value, path: Path, n: int, key: str) -> tuple[str, ...]:
    """A JSON list of strings/ints (or null) -> tuple of str; ValueError naming the file, line and key."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise UserError(f"{path}:{n}: '{key}' must be a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _read_jsonl(path: Path) -> tuple[list, list, list, list]:
    """Rows of a `.jsonl` table -> (ids, texts, image_ids, file_names)."""
    ids, texts, images, files = [], [], [], []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids.append(int(row["id"]))
            texts.append(str(row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{n}: expected a JSON object with 'id' and 'text' ({e})") from None
        images.append(_str_tuple(row.get("image_ids"), path, n, "image_ids"))
        files.append(_str_tuple(row.get("file_names"), path, n, "file_names"))
    return ids, texts, images, files


def _read_csv(path: Path) -> tuple[list, list, list, list]:
    """Rows of a `.csv` table (columns id, text, optional image_ids / file_names split on `;`)."""
    ids, texts, images, files = [], [], [], []
    import io

    with io.StringIO(_text(path), newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"id", "text"} <= set(reader.fieldnames):
            raise UserError(f"{path}: needs the columns 'id' and 'text' (found {reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            try:
                ids.append(int(row["id"]))
            except ValueError:
                raise UserError(f"{path}:{n}: id {row['id']!r} is not an integer") from None
            texts.append(row["text"])
            images.append(tuple(v for v in (row.get("image_ids") or "").split(";") if v))
            files.append(tuple(v for v in (row.get("file_names") or "").split(";") if v))
    return ids, texts, images, files


def _read_txt(path: Path) -> list[str]:
    """A `.txt` table: one caption per line, blank lines skipped (DMD2's `captions_coco14_test.txt`)."""
    return [t for t in _text(path).splitlines() if t.strip()]


def _text(path: Path) -> str:
    """The file as UTF-8 text; BadFile naming it when it is not (a binary or damaged file)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(path, "prompt table is not UTF-8 text (damaged or another kind of file)", found=e) from None


class _CaptionUnpickler(pickle.Unpickler):
    """An unpickler that builds only pickle's built-in types (list, tuple, str, dict, numbers...):
    every global (class or function) is refused, so loading runs no code from the file."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def _read_pkl(path: Path) -> list[str]:
    """DMD2's `coco10k/all_prompts.pkl`: a pickled list (or tuple) of caption strings, kept in order
    and verbatim. Loaded with `_CaptionUnpickler`; ValueError naming the file for anything else."""
    try:
        with path.open("rb") as f:
            obj = _CaptionUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
        raise UserError(f"{path}: not a pickled list of caption strings ({type(e).__name__}: {e})") from None
    if not isinstance(obj, (list, tuple)):
        raise UserError(f"{path}: expected a pickled list of caption strings (DMD2's all_prompts.pkl), "
                         f"got a {type(obj).__name__}")
    for i, t in enumerate(obj):
        if not isinstance(t, str):
            raise UserError(f"{path}: element {i} of the caption list is a {type(t).__name__}, not a str")
    return list(obj)


_READERS = {".jsonl": _read_jsonl, ".csv": _read_csv, ".txt": _read_txt, ".pkl": _read_pkl}


def load_prompt_table(path: str | Path) -> PromptTable:
    """Read a prompt table, dispatching on the suffix:

    * `.jsonl`: objects with `id`, `text`, optional `image_ids`, optional `file_names` (what
      `PromptTable.save_jsonl` and `eval.coco.build_coco_prompts` write);
    * `.csv`: columns `id`, `text`, optional `image_ids` / `file_names` separated by `;`;
    * `.txt`: one caption per line, ids 0..n-1 (DMD2's 30k SD1.5 prompt format);
    * `.pkl`: a pickled list of caption strings, ids 0..n-1 in list order (DMD2's
      `coco10k/all_prompts.pkl`), read with an unpickler that builds no classes.

    A table with a checksum sidecar `<name>.sha256` (what `save_jsonl` writes) is verified against it
    first. Raises FileNotFoundError / ValueError (BadFile for a damaged file) naming the file (and
    line, for `.jsonl` / `.csv`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt table not found: {path}")
    if path.suffix not in _READERS:
        raise UserError(f"{path}: unknown prompt table format {path.suffix!r} (use {', '.join(_READERS)})")
    from eval.io import check_sidecar

    check_sidecar(path, "prompt table")  # the suite's own tables (save_jsonl): truncated, changed or replaced
    if path.suffix in (".txt", ".pkl"):
        texts = _READERS[path.suffix](path)
        return PromptTable(tuple(range(len(texts))), tuple(texts), source=str(path))
    ids, texts, images, files = _READERS[path.suffix](path)
    return PromptTable(tuple(ids), tuple(texts), tuple(images) if any(images) else (), source=str(path),
                       file_names=tuple(files) if any(files) else ())
