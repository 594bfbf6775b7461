"""Small shared helpers: the JSONL logger; atomic writes, hashing and provenance come from `eval.io`
(re-exported here, so `tfd` code keeps importing them from `tfd.utils`)."""
from __future__ import annotations

import json
from pathlib import Path

from eval.io import (  # noqa: F401  (re-exports)
    atomic_savez,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    git_commit,
    package_versions,
    provenance,
)


class JsonlLogger:
    """Appends one JSON object per line (`stats.jsonl`)."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
