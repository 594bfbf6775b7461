"""File helpers shared by `eval/` and `tfd/`: atomic writes, file hashing and provenance.

Atomic writes. Every output file of the suite is written through `atomic_write` (or one of its
wrappers): the bytes go to a temporary file in the destination's folder, named
`.<name>.tmp<pid>` (unique per process), which then replaces the destination with `os.replace`,
so a killed job leaves either the old file or the new one, never half a file, and the temporary
file is removed when writing fails. A destination that names one of the process's file descriptors
(`--out /dev/stdout`, `/dev/fd/N`) or exists and is not a regular file (a FIFO, `/dev/null`)
cannot be replaced: it is written directly instead.

Hashing. `file_sha256(path)`: the hex sha256 of a file's bytes, cached by (resolved path, size,
mtime_ns) so that large weight files are hashed once per process.

Provenance. `provenance(**extra)`: git commit of this checkout (`+dirty` when tracked files
differ), versions of the packages that produce numbers, host and time.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import re
import stat
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Callable

# ----------------------------------------------------------------------------------------------
# atomic writes


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary sibling that `atomic_write` uses for `path`: `.<name>.tmp<pid>` in the same
    folder (same file system, so `os.replace` is atomic; one per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _own_fd(path: Path) -> int | None:
    """The file descriptor of this process that `path` names (`/dev/stdout` -> 1, `/dev/stderr` -> 2,
    `/dev/fd/N`, `/proc/self/fd/N`, `/proc/<pid>/fd/N` -> N), or None."""
    p = os.path.abspath(path)
    std = {"/dev/stdout": 1, "/dev/stderr": 2}
    if p in std:
        return std[p]
    m = re.fullmatch(rf"/(?:dev/fd|proc/self/fd|proc/{os.getpid()}/fd)/(\d+)", p)
    return int(m.group(1)) if m else None


def _not_regular(path: Path) -> bool:
    """True when `path` exists and is not a regular file (FIFO, `/dev/null`, socket, ...)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of `data` to the open descriptor `fd` (after flushing Python's own stdout/stderr
    buffers, so the bytes land after what was printed before and before what is printed later)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.fileno() == fd:
                stream.flush()
        except (AttributeError, OSError, ValueError):  # replaced or closed streams (pytest capture, ...)
            pass
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` with `f` a binary file open for writing, and make the result `path`.

    Regular destinations (existing or not) are written atomically: the parent folders are
    created, `write` fills `temp_path(path)`, which is closed and `os.replace`d onto `path`;
    if `write` raises, the temporary file is removed and `path` is left untouched.
    Destinations that name one of this process's file descriptors (`/dev/stdout`, `/dev/fd/N`:
    written through that descriptor, wherever the shell pointed it) or that exist and are not
    regular files (FIFO, `/dev/null`: opened and written) get the bytes `write` produced (buffered
    in memory) directly, not atomically.
    Returns `path` as a Path; raises whatever `write` or the file system raises."""
    path = Path(path)
    fd = _own_fd(path)
    if fd is not None or _not_regular(path):
        buf = io.BytesIO()  # writers that seek (zip: npz, torch.save) cannot seek a pipe or /dev/null
        write(buf)
        if fd is not None:  # our own stdout/fd: write through it, sharing its file offset
            _write_fd(fd, buf.getvalue())
        else:
            with open(path, "wb") as f:
                f.write(buf.getvalue())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    return path


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Write a folder atomically: `with atomic_directory(out) as tmp:` fill `tmp` (a fresh sibling
    folder); on success `tmp` becomes `out` by renames (an existing `out` is moved aside first and
    deleted after), so `out` is always the old complete folder or the new one, never half of one
    (a killed job leaves a `.<name>.tmp-*` folder beside it, never a broken `out`). On an
    exception `tmp` is removed and `out` is untouched. Used for diffusers `save_pretrained`
    folders and the embedded text data."""
    import shutil
    import tempfile

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: the mode any new folder gets
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write the string `text` (encoded with `encoding`) to `path` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for the suite's outputs: numpy integers -> int, numpy floats ->
    float, numpy arrays -> lists, anything else -> `str(o)` (paths, dtypes, ...)."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as JSON (indent 2, sorted keys, trailing newline, numpy values via `json_default`)
    written to `path` atomically (see `atomic_write`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """`np.savez` of `arrays` (uncompressed npz) to `path` atomically (see `atomic_write`).
    The file is written through a file object, so `path` is used as given (no `.npz` appended)."""
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, ...)` to `path` atomically (see `atomic_write`); same argument order as
    `torch.save`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


# The one metadata key of the suite's safetensors files. safetensors writes its metadata map in a
# random order on every call (a Rust HashMap: the same tensors and metadata give different bytes in
# two processes), so the suite stores its metadata as ONE sorted JSON string under this key, which
# makes a file's bytes a function of its contents (checked by tests/test_eval_io.py).
SAFETENSORS_META_KEY = "tfd"


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write `tensors` ({name: contiguous CPU torch.Tensor}) as safetensors with `metadata`
    (JSON-able values) under `SAFETENSORS_META_KEY`, atomically; byte-reproducible."""
    from safetensors.torch import save

    meta = {SAFETENSORS_META_KEY: json.dumps(metadata, sort_keys=True, default=json_default)}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors file as a dict: the suite's one JSON key unpacked, or the
    file's plain string map (older files, other tools). Raises ValueError naming the file when it
    is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if SAFETENSORS_META_KEY in meta:
        try:
            return json.loads(meta[SAFETENSORS_META_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata key {SAFETENSORS_META_KEY!r} is not JSON ({e})") from None
    return meta


# ----------------------------------------------------------------------------------------------
# hashing

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes (read in `chunk`-byte blocks), cached by (resolved path,
    size, mtime_ns), so large weights are hashed once per process. FileNotFoundError if absent."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------------------------
# provenance


def git_commit() -> str | None:
    """HEAD of the git checkout holding this package, with `+dirty` when tracked files differ;
    None outside a checkout or without git."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names=("torch", "numpy", "tfd-bench", "torch-fidelity", "clean-fid", "snakemake")) -> dict:
    """{distribution name: installed version or None} for `names`, plus `python`."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    out["python"] = platform.python_version()
    return out


def provenance(**extra) -> dict:
    """What produced an output: git commit, package versions, host, time, plus `extra`."""
    return {"git_commit": git_commit(), "versions": package_versions(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
