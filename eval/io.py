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
differ), versions of the packages that produce numbers, host and time. The versions carry
`compute` (`compute_environment()`): what decides the bits of a float result besides the code and
the seed (CPU capability and model, thread counts, determinism flags, GPU model and CUDA / cuDNN
versions), so that two records made on different machines say why their numbers differ.
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

from eval.errors import BadFile

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
        with open(tmp, "wb") as raw:
            f = _ErrnoKeepingFile(raw)
            try:
                write(f)
            except Exception as e:  # a writer that wraps the OSError (torch.save: "inline_container.cc")
                if f.os_error is not None and not isinstance(e, OSError):
                    raise OSError(f.os_error.errno, f.os_error.strerror, str(path)) from e
                raise
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    return path


class _ErrnoKeepingFile:
    """A binary file whose `write` remembers the OSError it raised (disk full, file too large), so
    `atomic_write` can report it even when the writer (torch.save's C++ zip writer) replaces it
    with its own error."""

    def __init__(self, f):
        self._f, self.os_error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.os_error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` (a folder) if needed and check that a file can be created in it, before any
    work starts. Returns it as a Path; raises `eval.errors.BadFile` naming the folder otherwise
    (permission, read-only file system, a file in the way)."""
    from eval.errors import BadFile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise BadFile(path, f"{what} is not writable", found=e.strerror or type(e).__name__) from None
    return path


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, manifest: bool = False):
    """Write a folder atomically: `with atomic_directory(out) as tmp:` fill `tmp` (a fresh sibling
    folder); on success `tmp` becomes `out` by renames (an existing `out` is moved aside first and
    deleted after), so `out` is always the old complete folder or the new one, never half of one
    (a killed job leaves a `.<name>.tmp-*` folder beside it, never a broken `out`). On an
    exception `tmp` is removed and `out` is untouched. Used for diffusers `save_pretrained`
    folders and the embedded text data. `manifest`: the finished folder also gets its checksum
    manifest (`write_folder_manifest`), verified by its reader with `check_folder_manifest`."""
    import shutil
    import tempfile

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        yield tmp
        if manifest:
            write_folder_manifest(tmp)
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


def read_npz(path: str | os.PathLike, what: str) -> dict:
    """All arrays of an npz file (read eagerly, no pickles): {name: np.ndarray}. FileNotFoundError
    naming `what` (e.g. "sample file") when missing; `BadFile` naming the file when it is not a
    readable npz (truncated, damaged: zip CRC errors included). The format readers (samples,
    reference statistics) check the arrays themselves."""
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{what} not found", str(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the machine's (permission, I/O), not the file's
            raise
        raise BadFile(path, f"not a readable npz ({what}; truncated or damaged)",
                      found=f"{type(e).__name__}: {e}") from None


def tensors_sha256(tensors: dict) -> str:
    """Hex sha256 of a {name: torch.Tensor} dict's contents: per name in sorted order its name,
    dtype, shape and raw bytes (any dtype, bf16 included). Stored by `atomic_save_safetensors` and
    verified by `load_safetensors`: safetensors itself has no checksum, so a flipped byte in a
    tensor would otherwise load silently."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write `tensors` ({name: contiguous CPU torch.Tensor}) as safetensors with `metadata`
    (JSON-able values) and the tensors' checksum `tensors_sha256` under `SAFETENSORS_META_KEY`,
    atomically; byte-reproducible."""
    from safetensors.torch import save

    meta = {SAFETENSORS_META_KEY: json.dumps({**metadata, "tensors_sha256": tensors_sha256(tensors)},
                                             sort_keys=True, default=json_default)}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_safetensors(path: str | os.PathLike, what: str = "") -> tuple[dict, dict[str, Any]]:
    """Read a safetensors file written by the suite (or another tool): -> ({name: CPU tensor},
    metadata as `read_safetensors_metadata` gives it). `BadFile` naming the file (and `what` it is)
    when it is missing, its header or tensors are unreadable (truncated, damaged), or the stored
    `tensors_sha256` does not match its tensors (flipped bytes); files without a checksum (older
    or foreign ones) load unverified."""
    from safetensors.torch import load_file

    from eval.errors import BadFile

    label = f"{what} " if what else ""
    if not Path(path).is_file():
        raise FileNotFoundError(2, f"{label}file not found".strip().capitalize(), str(path))
    meta = read_safetensors_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types
        raise BadFile(path, f"{label}tensors not readable (truncated or damaged file)", found=e) from None
    want = meta.get("tensors_sha256") if isinstance(meta, dict) else None
    if want and tensors_sha256(tensors) != want:
        raise BadFile(path, f"{label}checksum mismatch: the tensors were changed after the file was written "
                      "(damaged copy or disk)", key="tensors_sha256", hint="rebuild or copy it again")
    return tensors, meta


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors file as a dict: the suite's one JSON key unpacked, or the
    file's plain string map (older files, other tools). Raises ValueError naming the file when it
    is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise BadFile(path, "not a readable safetensors file", found=e) from None
    if SAFETENSORS_META_KEY in meta:
        try:
            return json.loads(meta[SAFETENSORS_META_KEY])
        except json.JSONDecodeError as e:
            raise BadFile(path, "metadata is not JSON", key=SAFETENSORS_META_KEY, found=e) from None
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
# checksums of the suite's text outputs: sealed JSON records, sha256 sidecars, folder manifests
#
# Text formats have no integrity check of their own: a flipped digit in a JSON value, or a table cut
# at a line boundary, reads back as a valid, wrong file. The suite's writers therefore record a
# checksum and the one reader of each format verifies it (files without one, written by older
# versions or by the user, load unverified):
#
# * JSON records (metric files, train.json, each line of convergence.jsonl / stats.jsonl): the key
#   `record_sha256`, the sha256 of the record's canonical JSON without that key (`seal_record`,
#   `check_record`);
# * whole files that other tools read too (prompt tables, table csvs, the tiny CLIP's model
#   config): a sidecar `<name>.sha256` in `sha256sum` format (`atomic_write_text_sealed`,
#   `check_sidecar`);
# * folders (a diffusers pipeline or VAE, the embedded digits-text data): a manifest
#   `tfd-manifest.sha256` of every file in it (`atomic_directory(..., manifest=True)`,
#   `check_folder_manifest`).

RECORD_KEY = "record_sha256"


def _canonical(rec: dict) -> dict:
    """`rec` as it reads back from JSON (tuples as lists, numpy values and paths as `json_default`
    makes them), so a checksum computed before writing equals the one of the file read back."""
    return json.loads(json.dumps(rec, default=json_default))


def record_sha256(rec: dict) -> str:
    """sha256 of a JSON record's canonical form (sorted keys) without its `record_sha256` key."""
    body = {k: v for k, v in _canonical(rec).items() if k != RECORD_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=json_default).encode()).hexdigest()


def seal_record(rec: dict) -> dict:
    """A copy of `rec` with its checksum under `record_sha256` (verified by `check_record`)."""
    body = {k: v for k, v in rec.items() if k != RECORD_KEY}
    return {**body, RECORD_KEY: record_sha256(body)}


def check_record(rec: dict, where: str | os.PathLike, what: str = "record") -> dict:
    """Verify the `record_sha256` of a JSON record read from `where` (a file, or `file:line`);
    returns the record without that key. BadFile naming `where` when the checksum does not match
    (a changed digit); a record without one passes unverified."""
    want = rec.get(RECORD_KEY)
    if want is not None and record_sha256(rec) != want:
        raise BadFile(where, f"checksum mismatch: the {what} was changed after it was written (damaged copy or "
                      "disk)", key=RECORD_KEY, found=f"a record hashing to {record_sha256(rec)[:12]}..., stored "
                      f"{str(want)[:12]}...", hint="rebuild it")
    return {k: v for k, v in rec.items() if k != RECORD_KEY}


def sidecar_path(path: str | os.PathLike) -> Path:
    """The checksum sidecar of `path`: `<name>.sha256` beside it (`sha256sum` format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _sha256_now(path: Path) -> str:
    """Hex sha256 of the file's bytes as they are now (no cache: a damaged file is seen as it is)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def atomic_write_text_sealed(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_text(path, text)` and its sidecar `<name>.sha256` (verified by `check_sidecar`).
    The old sidecar is removed first, so a job killed between the two writes leaves a file without
    a sidecar (unverified), never a good file that looks damaged. Not for `/dev/stdout`-like paths
    (no sidecar is written beside those)."""
    path = Path(path)
    if _own_fd(path) is not None or _not_regular(path):
        return atomic_write_text(path, text)
    side = sidecar_path(path)
    side.unlink(missing_ok=True)
    data = text.encode("utf-8")
    atomic_write_bytes(path, data)
    atomic_write_text(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


def check_sidecar(path: str | os.PathLike, what: str) -> None:
    """Verify file `path` against its sidecar `<name>.sha256` when there is one (`what` names the
    kind of file in the message). BadFile naming the file when the bytes do not match (truncated,
    flipped, replaced) or the sidecar holds no sha256; nothing when there is no sidecar."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        return
    words = side.read_text(errors="replace").split()
    want = words[0] if words else ""
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise BadFile(side, f"checksum file of the {what} holds no sha256", hint=f"rebuild {path.name}")
    got = _sha256_now(path)
    if got != want:
        raise BadFile(path, f"{what} checksum mismatch: the file was changed after it was written (truncated, "
                      f"damaged or replaced)", key=side.name, expected=want[:12] + "...", found=got[:12] + "...",
                      hint=f"rebuild it (or delete {side.name} to use an edited file as it is)")


MANIFEST = "tfd-manifest.sha256"


def write_folder_manifest(folder: str | os.PathLike) -> Path:
    """Write `folder/tfd-manifest.sha256`: `<sha256>  <relative path>` of every file below `folder`
    (sorted; `sha256sum -c tfd-manifest.sha256` in the folder checks it by hand). Call it on a
    finished folder before it is renamed into place (`atomic_directory(..., manifest=True)`)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{_sha256_now(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    return atomic_write_text(folder / MANIFEST, "\n".join(lines) + "\n")


def check_folder_manifest(folder: str | os.PathLike, what: str) -> None:
    """Verify every file listed in `folder/tfd-manifest.sha256` (when the folder has one): present and
    of the listed sha256 (`what` names the folder's kind in the message). BadFile naming the first
    damaged or missing file; nothing without a manifest (a folder of another tool)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    for n, line in enumerate(manifest.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        want, _, rel = line.partition("  ")
        if len(want) != 64 or not rel:
            raise BadFile(f"{manifest}:{n}", f"not a sha256sum line of the {what}'s manifest", found=repr(line[:80]))
        p = folder / rel
        if not p.is_file():
            raise BadFile(p, f"file of the {what} is missing (listed in {MANIFEST})", hint="rebuild the folder")
        got = _sha256_now(p)
        if got != want:
            raise BadFile(p, f"file of the {what} was changed after it was written (truncated, damaged or replaced)",
                          key=MANIFEST, expected=want[:12] + "...", found=got[:12] + "...", hint="rebuild the folder")


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


def _cpu_model() -> str | None:
    """The CPU's model name: the first `model name` line of /proc/cpuinfo (Linux), else
    `platform.processor()`; None when neither says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


_FIXED_COMPUTE: dict | None = None  # the part of compute_environment() that a process cannot change


def _fixed_compute() -> dict:
    """The process-constant part of `compute_environment()`, computed once per process: torch's
    build (`torch.__version__`, with its local tag: `+cu130`, `+cpu`), CPU capability and model,
    and when CUDA is available the GPUs with the CUDA / cuDNN versions (None otherwise)."""
    global _FIXED_COMPUTE
    if _FIXED_COMPUTE is None:
        import torch

        out = {"torch_build": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu_model": _cpu_model(), "gpus": None, "cuda": None, "cudnn": None}
        if torch.cuda.is_available():
            out.update(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        _FIXED_COMPUTE = out
    return dict(_FIXED_COMPUTE)


#: environment variables that change float results or the threads that compute them (OMP_WAIT_POLICY: only speed)
COMPUTE_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "ATEN_CPU_CAPABILITY",
                    "CUBLAS_WORKSPACE_CONFIG")


def compute_environment() -> dict:
    """What decides the bits of a float result besides the code, the inputs and the seed: torch's
    CPU kernel set (`cpu_capability`, as `torch.backends.cpu.get_cpu_capability()` reports it:
    DEFAULT, AVX2, AVX512, ...; `ATEN_CPU_CAPABILITY` forces a lower one), the CPU model, torch's
    intra-op and inter-op thread counts (`torch.get_num_threads()` / `get_num_interop_threads()`),
    the environment variables of `COMPUTE_ENV_VARS` (None when unset),
    `torch.are_deterministic_algorithms_enabled()`, cuDNN's `deterministic` / `benchmark` flags,
    and with CUDA the GPU models (`gpus`) and the CUDA / cuDNN versions (None without CUDA).
    Same values (`torch_build` included): byte-identical results; any difference may change the
    order of float reductions, so results differ in the last bits and training runs drift apart
    (README, "What reproduces"). Cheap: the fixed part is cached."""
    import torch

    out = _fixed_compute()
    out.update(threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
               env={k: os.environ.get(k) for k in COMPUTE_ENV_VARS},
               deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
               cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
               cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    return out


def package_versions(names=("torch", "numpy", "tfd-bench", "torch-fidelity", "clean-fid", "snakemake")) -> dict:
    """{distribution name: installed version or None} for `names`, plus `python` and `compute`
    (`compute_environment()`: the torch build's CPU capability, thread counts, determinism flags and
    GPU / CUDA versions; here so that every record that states its versions, metric records
    included, states these too)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    out["python"] = platform.python_version()
    out["compute"] = compute_environment()
    return out


def provenance(**extra) -> dict:
    """What produced an output: git commit, package versions with the compute environment
    (`versions.compute`, see `compute_environment`), host, time, plus `extra`."""
    return {"git_commit": git_commit(), "versions": package_versions(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
