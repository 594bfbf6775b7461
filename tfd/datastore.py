"""The dataset stage: EDM's dataset zip converted ONCE into a memory-mapped uint8 store.

`tfd.data.load_edm_zip` decodes every PNG on one core and holds the data as float32 (ImageNet-64:
1.28M x 3x64x64 x 4 B = 63 GB before step 0). `build_store` decodes the zip once, with worker
processes, into a folder the trainer maps instead (`open_store`; `tfd.data.StoreSampler` reads
only the rows it draws and converts them to float on the device):

    store/images.npy         uint8 [N, H, W, C]   the images (NHWC, as decoded; grayscale: C = 1)
    store/labels.npy         int64 [N]            class index of each image
    store/class_rows.npy     int64 [N]            image rows grouped by class, ascending within a class
    store/class_offsets.npy  int64 [K + 1]        class c's rows: class_rows[offsets[c]:offsets[c + 1]]
    store/store.json         shape, dtype, count per class, each array's sha256, the source zip's
                             size and sha256, and the store's `sha256` (its identity, see `store_sha256`)

Rows are in EDM's order (`ImageFolderDataset`: the zip's PNG members sorted by name), exactly the
order of `load_edm_zip`, and `tfd.data.dequantise_u8(images[i])` is bit-identical to its float32
image `i`. The `.npy` files are numpy's own format (`numpy.lib.format.open_memmap`): `np.load(path,
mmap_mode="r")` reads them anywhere.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.errors import BadFile, UserError

STORE_FORMAT = "tfd-datastore"
STORE_VERSION = 1
META_FILE = "store.json"
ARRAYS = {"images": np.uint8, "labels": np.int64, "class_rows": np.int64, "class_offsets": np.int64}
BUILD_HINT = "build it with `tfd prepare-data --zip DATASET.zip --out STORE` (rule prepare_data)"


def edm_zip_index(path: str | Path) -> tuple[list[str], np.ndarray]:
    """The members and labels of an EDM dataset zip, in EDM's order (`ImageFolderDataset`: the PNG
    members sorted by name; `dataset.json` holds `{"labels": [[member, class], ...]}`).

    Returns `(names, labels [N] int64)`. FileNotFoundError for a missing zip; UserError naming the
    zip (and the member) for a file that is not a zip, no PNG, no `dataset.json` or no labels in
    it, a PNG without a label, or a label that is not a class index >= 0."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset zip not found: {path} (build it with EDM's dataset_tool.py)")
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
            names = sorted(n for n in members if n.lower().endswith(".png"))
            if not names:
                raise UserError(f"{path}: no PNG files in the zip")
            if "dataset.json" not in members:
                raise UserError(f"{path}: no dataset.json with labels (class-conditional data needs it)")
            meta = json.loads(z.read("dataset.json"))
    except zipfile.BadZipFile as e:
        raise BadFile(path, "not a readable zip file", found=e) from None
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise BadFile(path, "dataset.json is not JSON", found=e) from None
    pairs = meta.get("labels") if isinstance(meta, dict) else None
    if not pairs:
        raise UserError(f"{path}: dataset.json has no labels (class-conditional data needs them)")
    labels = dict(pairs)
    missing = [n for n in names if n not in labels]
    if missing:
        raise UserError(f"{path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    bad = [n for n in names if not isinstance(labels[n], int) or isinstance(labels[n], bool) or labels[n] < 0]
    if bad:
        raise UserError(f"{path}: dataset.json: label of {bad[0]} is {labels[bad[0]]!r}, not a class index >= 0")
    return names, np.array([labels[n] for n in names], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# decoding (runs in the worker processes: imports only numpy and PIL)

_OPEN: dict[str, object] = {}  # per process: the zip and the output array, opened once


def _opened(key: str, opener):
    if key not in _OPEN:
        _OPEN[key] = opener()
    return _OPEN[key]


def _describe(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]} with {a.shape[2]} channel(s) of {a.dtype}"


def decode_png(data: bytes) -> np.ndarray:
    """One member's bytes -> uint8-or-wider array `[H, W, C]` as EDM reads it (`np.array(PIL.Image)`,
    no mode conversion; grayscale gets C = 1). ValueError when the bytes are not a PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG (reads as {im.format})")
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def read_member(z: zipfile.ZipFile, zip_path: str | Path, name: str) -> np.ndarray:
    """`decode_png` of member `name` of the open zip `z`; BadFile naming the zip and the member when
    it cannot be read or decoded."""
    try:
        return decode_png(z.read(name))
    except Exception as e:  # any decoder or zip failure of this member: named with the member
        raise BadFile(zip_path, f"not a readable PNG ({type(e).__name__}: {e})", key=f"member {name}") from None


def _decode_chunk(zip_path: str, images_path: str, names: list[str], start: int,
                  shape: tuple[int, int, int]) -> tuple[int, str | None, str | None]:
    """Decode `names` into rows `start ...` of the `.npy` at `images_path` (opened `r+`, shared).
    Returns `(count, None, None)`, or `(done, member, problem)` at the first bad member."""
    z = _opened(zip_path, lambda: zipfile.ZipFile(zip_path))
    out = _opened(images_path, lambda: np.load(images_path, mmap_mode="r+"))
    for i, name in enumerate(names):
        try:
            a = decode_png(z.read(name))
        except Exception as e:  # any decoder or zip failure of this member: reported naming the member
            return i, name, f"not a readable PNG ({type(e).__name__}: {e})"
        if a.shape != shape or a.dtype != np.uint8:
            return i, name, (f"image is {_describe(a)}, but the first image is "
                             f"{_describe(np.empty(shape, np.uint8))} (every image must have the same size, "
                             "channels and 8-bit depth)")
        out[start + i] = a
    out.flush()
    return len(names), None, None


# ----------------------------------------------------------------------------------------------
# building


def store_sha256(arrays: dict[str, dict]) -> str:
    """The store's identity: sha256 of its arrays' names, shapes, dtypes and sha256s (canonical
    JSON), so equal data gives an equal hash wherever the zip or the store lies. `arrays`: the
    `store.json` `arrays` entry."""
    body = {k: {f: v[f] for f in ("shape", "dtype", "sha256")} for k, v in sorted(arrays.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _class_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class_rows [N] int64: rows grouped by class, ascending within each; offsets [K + 1] int64)."""
    rows = np.argsort(labels, kind="stable").astype(np.int64)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    return rows, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _run_chunks(zip_path: Path, images: Path, names: list[str], shape, workers: int, chunk_images: int, bar):
    """Decode every chunk (in this process for `workers` 1, else in a spawn pool); BadFile naming
    the zip and the member at the first bad one (pending chunks are cancelled)."""
    jobs = [(str(zip_path), str(images), names[s:s + chunk_images], s, shape)
            for s in range(0, len(names), chunk_images)]
    pool = None if workers == 1 else cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        results = (map(lambda j: _decode_chunk(*j), jobs) if pool is None
                   else (f.result() for f in cf.as_completed([pool.submit(_decode_chunk, *j) for j in jobs])))
        for done, member, problem in results:
            bar.update(done)
            if problem:
                raise BadFile(zip_path, problem, key=f"member {member}", hint="fix or remove it and rebuild the zip")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _OPEN.pop(str(images), None)  # workers 1: this process's handles
        z = _OPEN.pop(str(zip_path), None)
        if z is not None:
            z.close()


def build_store(zip_path: str | Path, out: str | Path, workers: int = 1, progress: bool = True,
                chunk_images: int = 256) -> dict:
    """Convert EDM dataset zip `zip_path` into the store folder `out` (see the module docstring);
    returns its `store.json` record.

    `workers` processes decode chunks of `chunk_images` PNGs in parallel, each writing its rows
    into the shared `images.npy` (1: decode in this process); a tqdm bar counts images. Written
    atomically (`eval.io.atomic_directory`): the folder is filled beside `out` and renamed into
    place at the end, so a failure or an interrupt (KeyboardInterrupt, SystemExit: the CLI turns
    SIGTERM into one) leaves no half-written store and an existing `out` untouched; only SIGKILL
    can leave a `.<name>.tmp-*` folder beside it. Errors: FileNotFoundError for a missing zip;
    UserError / BadFile naming the zip and the member for a missing label, a member that is not a
    readable 8-bit PNG, or an image whose size or channels differ from the first one; ValueError
    for `workers` or `chunk_images` < 1."""
    from tqdm import tqdm

    from eval.io import atomic_directory, atomic_write_json, file_sha256, provenance

    if workers < 1 or chunk_images < 1:
        raise ValueError(f"workers ({workers}) and chunk_images ({chunk_images}) must be >= 1")
    zip_path, out = Path(zip_path).resolve(), Path(out)
    names, labels = edm_zip_index(zip_path)
    with zipfile.ZipFile(zip_path) as z:  # the first image fixes the shape every other must have
        first = read_member(z, zip_path, names[0])
    if first.dtype != np.uint8:
        raise BadFile(zip_path, f"image is {_describe(first)}; the store holds 8-bit images", key=f"member {names[0]}")
    with atomic_directory(out) as tmp:
        from numpy.lib.format import open_memmap
        open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(names), *first.shape)).flush()
        with tqdm(total=len(names), unit="img", desc=f"prepare-data {zip_path.name}", disable=not progress) as bar:
            _run_chunks(zip_path, tmp / "images.npy", names, first.shape, workers, chunk_images, bar)
        rows, offsets = _class_index(labels)
        for name, arr in (("labels", labels), ("class_rows", rows), ("class_offsets", offsets)):
            np.save(tmp / f"{name}.npy", arr)
        arrays = {}
        for name in ARRAYS:
            a = np.load(tmp / f"{name}.npy", mmap_mode="r")
            arrays[name] = {"file": f"{name}.npy", "shape": list(a.shape), "dtype": str(a.dtype),
                            "bytes": (tmp / f"{name}.npy").stat().st_size, "sha256": file_sha256(tmp / f"{name}.npy")}
            del a
        meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "count": len(names),
                "image_shape_hwc": list(first.shape), "num_classes": len(offsets) - 1,
                "count_per_class": np.diff(offsets).tolist(),
                "order": "the zip's PNG members sorted by name (EDM ImageFolderDataset, tfd.data.load_edm_zip)",
                "to_float": "u8 / 127.5 - 1 in float32, NHWC -> NCHW (tfd.data.dequantise_u8)",
                "arrays": arrays, "sha256": store_sha256(arrays),
                "source": {"zip": str(zip_path), "bytes": zip_path.stat().st_size, "sha256": file_sha256(zip_path)},
                "written_by": provenance(workers=workers)}
        atomic_write_json(tmp / META_FILE, meta)
    return meta


# ----------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class DataStore:
    """An opened store (`open_store`): `images` a read-only memory map uint8 `[N, H, W, C]` (rows
    are read from disk when indexed), `labels` `[N]` int64, `class_rows` `[N]` and `class_offsets`
    `[K + 1]` int64 (in memory), `meta` the `store.json` record, `path` the folder."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    class_rows: np.ndarray
    class_offsets: np.ndarray
    meta: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_offsets) - 1

    @property
    def sha256(self) -> str:
        """The store's identity (`store_sha256`), recorded in the provenance of what reads it."""
        return self.meta["sha256"]

    def rows_of_class(self, c: int) -> np.ndarray:
        """Rows of class `c`, ascending: int64 `[count]` (empty for a class with no image)."""
        return self.class_rows[self.class_offsets[c]:self.class_offsets[c + 1]]


def _read_meta(folder: Path) -> dict:
    if not folder.is_dir():
        raise BadFile(folder, "not a dataset store folder", hint=BUILD_HINT)
    f = folder / META_FILE
    if not f.is_file():
        raise BadFile(f, "missing: the folder is not a (complete) dataset store", hint=BUILD_HINT)
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:
        raise BadFile(f, "not JSON", found=e, hint=BUILD_HINT) from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise BadFile(f, "not a dataset store record", key="format/version",
                      expected=f"{STORE_FORMAT} {STORE_VERSION}",
                      found=f"{meta.get('format')} {meta.get('version')}" if isinstance(meta, dict) else type(meta),
                      hint=BUILD_HINT)
    return meta


def _open_array(folder: Path, name: str, entry: dict | None, mmap: bool) -> np.ndarray:
    """Array `name` of the store, checked against its `store.json` entry (shape, dtype). BadFile naming the file."""
    f = folder / f"{name}.npy"
    if entry is None:
        raise BadFile(folder / META_FILE, "no entry for an array of the store", key=f"arrays.{name}", hint=BUILD_HINT)
    if not f.is_file():
        raise BadFile(f, "array of the dataset store is missing", hint=BUILD_HINT)
    try:
        a = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadFile(f, "not a readable .npy array (truncated or damaged?)", found=e, hint=BUILD_HINT) from None
    want = (tuple(entry.get("shape", ())), str(entry.get("dtype")))
    if (a.shape, str(a.dtype)) != want or str(a.dtype) != np.dtype(ARRAYS[name]).name:
        raise BadFile(f, "does not match the store's record (store.json)", key=name,
                      expected=f"shape {want[0]} {want[1]}", found=f"shape {a.shape} {a.dtype}", hint=BUILD_HINT)
    return a


def open_store(path: str | Path, verify: bool = False) -> DataStore:
    """Open the store folder `path` (made by `build_store`): `images` memory-mapped, the rest read.

    Checks every array's shape and dtype against `store.json` and that they agree (N rows, K + 1
    offsets, counts per class); `verify` also re-hashes every array file against its recorded
    sha256 (reads the whole store: minutes for ImageNet-64). BadFile naming the file (and key) on
    any mismatch, a missing or damaged file, or a folder that is not a store."""
    from eval.io import file_sha256

    folder = Path(path)
    meta = _read_meta(folder)
    entries = meta.get("arrays") or {}
    arrays = {n: _open_array(folder, n, entries.get(n), mmap=n == "images") for n in ARRAYS}
    n, k = len(arrays["images"]), len(arrays["class_offsets"]) - 1
    counts = np.diff(arrays["class_offsets"]).tolist()
    if (meta.get("count") != n or len(arrays["labels"]) != n or len(arrays["class_rows"]) != n
            or meta.get("num_classes") != k or meta.get("count_per_class") != counts):
        raise BadFile(folder / META_FILE, "the store's arrays do not agree with its record", key="count/num_classes",
                      expected=f"{meta.get('count')} images in {meta.get('num_classes')} classes",
                      found=f"{n} images, {len(arrays['labels'])} labels, {k} classes", hint=BUILD_HINT)
    if verify:
        for name in ARRAYS:
            f = folder / f"{name}.npy"
            if file_sha256(f) != entries[name].get("sha256"):
                raise BadFile(f, "changed after the store was built (sha256 differs from store.json)", hint=BUILD_HINT)
    return DataStore(folder, arrays["images"], np.asarray(arrays["labels"]), np.asarray(arrays["class_rows"]),
                     np.asarray(arrays["class_offsets"]), meta)


def check_store_fits(store: DataStore, zip_path: str | Path | None, resolution: int, channels: int) -> None:
    """Refuse a store that is not the benchmark's data: images other than `resolution` x
    `resolution` x `channels`, or (when the configured zip `zip_path` exists) built from a zip of
    another size (a cheap check; the zip's sha256 is in `store.json`). BadFile naming the store."""
    hwc = tuple(store.images.shape[1:])
    if hwc != (resolution, resolution, channels):
        raise BadFile(store.path, "dataset store does not fit the benchmark", key="images",
                      expected=f"{resolution}x{resolution} images with {channels} channel(s)",
                      found=f"{hwc[1]}x{hwc[0]} with {hwc[2]}")
    src = store.meta.get("source", {})
    if zip_path and Path(zip_path).is_file() and Path(zip_path).stat().st_size != src.get("bytes"):
        raise BadFile(store.path, "dataset store was built from another zip", key="source",
                      expected=f"{zip_path} ({Path(zip_path).stat().st_size} bytes)",
                      found=f"{src.get('zip')} ({src.get('bytes')} bytes)", hint=BUILD_HINT)
