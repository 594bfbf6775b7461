"""Small shared helpers: the JSONL logger, the run-folder lock; atomic writes, hashing and
provenance come from `eval.io` (re-exported here, so `tfd` code keeps importing them from `tfd.utils`)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from eval.errors import RunBusy
from eval.io import (  # noqa: F401  (re-exports)
    atomic_savez,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    file_sha256,
    git_commit,
    package_versions,
    provenance,
    seal_record,
    temp_path,
)


def path_sha256(path: str | Path) -> str:
    """sha256 identifying a file (its bytes, `file_sha256`) or a folder (a diffusers pipeline: the
    sha256 of its files' relative paths and hashes, in sorted order). FileNotFoundError if absent."""
    import hashlib

    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return hashlib.sha256("\n".join(f"{f.relative_to(path)} {file_sha256(f)}" for f in files).encode()).hexdigest()


def trim_jsonl(path: str | Path, last_step: int) -> int:
    """Rewrite the JSONL log `path` (atomically) keeping only the records whose `step` is <= `last_step`,
    in their order; lines that are not a JSON object with a numeric `step` (a torn last line of a killed
    job) are dropped too. Used on resume, so the steps after the resumed checkpoint, which the resumed
    run writes again, appear once. Returns the number of lines dropped (0 when `path` does not exist,
    which is then left absent)."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    kept, dropped = [], 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= last_step
        except ValueError:  # a torn line (killed mid-write)
            ok = False
        if ok:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped or (raw and not raw.endswith(b"\n")):  # (a last line without its newline is completed)
        atomic_write_text(path, "".join(kept))
    return dropped


class JsonlLogger:
    """Appends one JSON object per line (`stats.jsonl`, `convergence.jsonl`), each with its checksum
    `record_sha256` (so a flipped digit in a log is detected by its reader).

    `append=False` starts a new log (an existing file is removed); `append=True` continues it.
    `resume_step=s` continues it after trimming it to the records of steps <= `s` (`trim_jsonl`): what a
    run resumed from its step-`s` checkpoint wants. Each `write` opens, appends one line and closes."""

    def __init__(self, path: str | Path, append: bool = False, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            trim_jsonl(self.path, resume_step)
        elif not append and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        """Append `record` (values JSON can't hold as floats) with its checksum `record_sha256`
        (`eval.io.seal_record`; the reader, `tfd.tables.read_convergence`, verifies it per line)."""
        rec = seal_record(json.loads(json.dumps(record, default=float)))
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


class RunLock:
    """An exclusive, non-blocking lock on a folder, so that one process at a time works in it (one
    trainer per run folder).

    `acquire()` takes an flock on `<folder>/<name>` (the `filelock` library) and writes who holds it
    (host, pid, start time, command line) to `<folder>/<name>.holder` (JSON, atomically). When another
    live process holds it, `acquire()` raises `eval.errors.RunBusy` naming that holder, at once. The
    kernel drops an flock when its process dies, so a lock left by a killed job (kill -9, node lost)
    never blocks (its stale `.holder` file is overwritten). `release()` (also on leaving a `with`
    block) removes the `.holder` file and drops the lock; the empty lock file stays (removing it would
    let two processes lock two different files). Not reentrant: a second `RunLock` on the same folder
    in the same process is refused like any other. On file systems without flock `filelock` falls back
    to its own soft lock, which breaks a lock left by a dead process by the pid and host it recorded."""

    def __init__(self, folder: str | Path, what: str = "run folder", name: str = "train.lock"):
        self.folder, self.what = Path(folder), what
        self.lock_path = self.folder / name
        self.holder_path = self.folder / f"{name}.holder"
        self._lock = None

    def holder(self) -> str:
        """The holder as recorded in the `.holder` file, in words ('unknown' when absent or unreadable)."""
        try:
            h = json.loads(self.holder_path.read_text())
            return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"unknown: {self.holder_path.name} is missing or unreadable"

    def acquire(self) -> "RunLock":
        import sys

        import filelock

        lock = filelock.FileLock(self.lock_path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunBusy(f"{self.folder}: {self.what} is in use by another process ({self.holder()}); wait for "
                          f"it to finish or stop it (lock file {self.lock_path})") from None
        self._lock = lock
        try:
            atomic_write_json(self.holder_path, {"host": platform.node(), "pid": os.getpid(),
                                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                 "argv": list(sys.argv)})
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the `.holder` file and drop the lock (nothing when not held)."""
        if self._lock is None:
            return
        try:
            self.holder_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
