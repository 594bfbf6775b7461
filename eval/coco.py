"""COCO-2014 prompt subsets and real images, with DMD2's zero-shot evaluation protocol.

* `build_coco_prompts(captions_json, num_prompts, seed)`: a reproducible subset of a COCO captions
  file (`captions_val2014.json`, or any file in that format such as the embedded digits set of
  `eval.digits_text`) read with pycocotools: `num_prompts` distinct images, one caption each, as a
  `PromptTable` whose rows carry the caption annotation id (the prompt `id`), the caption, the
  image id and the image's file name. `table.save_jsonl(path)` writes it as the shareable prompts
  file (its sha256, `table.sha256`, is the subset's identity in sample files). DMD2 ships a fixed
  10k subset instead (`coco10k/all_prompts.pkl`, read by `eval.conditions.load_prompt_table`).
* `load_real_images(table, images_dir, size)` / `iter_real_images(...)`: the FID reference images
  of a table (each row's first file); `load_image_folder(images_dir, size)`: every image of a
  folder (DMD2's `coco10k/subset`, whose `.pkl` prompt list has no file names); and
  `crop_resize_batch(images, size)`: the same transform for generated images.
  Both are DMD2's `eval_res` protocol (Table 2: generate at 1024, evaluate at 512): centre-crop the
  long edge to a square, PIL LANCZOS to `size` (`eval.clip_score.crop_resize`), then clean-fid's
  "clean" mode resizes to 299 inside the extractor.

pycocotools prints progress ("loading annotations into memory...") on stdout; `load_coco` sends
it to this module's logger at DEBUG level instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from eval.clip_score import crop_resize
from eval.conditions import PromptTable
from eval.errors import BadFile, UserError

log = logging.getLogger(__name__)

MISSING_SHOWN = 5  # how many missing image files an error lists by name


def load_coco(captions_json: str | os.PathLike):
    """`pycocotools.coco.COCO(captions_json)` with its prints routed to the log (DEBUG).

    Raises FileNotFoundError naming the file when absent, ValueError naming it when it is not a
    COCO annotation file (not JSON, not a JSON object, or annotations without `id` / `image_id`)."""
    from pycocotools.coco import COCO

    path = Path(captions_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}")
    check_data_folder(path.parent)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    finally:
        for line in out.getvalue().splitlines():
            log.debug("pycocotools: %s", line)
    return coco


def _caption(coco, ann_id: int, path: Path) -> str:
    """The caption of annotation `ann_id`, stripped of surrounding whitespace; ValueError naming
    the file and the annotation when the `caption` key is missing or not a non-empty string."""
    text = coco.anns[ann_id].get("caption")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path}: annotation {ann_id} has no caption (key 'caption': {text!r})")
    return text.strip()


def _file_name(coco, image_id: int, path: Path) -> str:
    """The `file_name` of image `image_id`; ValueError naming the file and image when missing."""
    name = coco.imgs[image_id].get("file_name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{path}: image {image_id} has no 'file_name'")
    return name


def check_image_files(file_names, images_dir: str | os.PathLike) -> None:
    """FileNotFoundError listing the first `MISSING_SHOWN` of `file_names` (relative paths) that do
    not exist under `images_dir`, and how many are missing in all; nothing when all exist."""
    root = Path(images_dir)
    missing = [f for f in file_names if not (root / f).is_file()]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise FileNotFoundError(f"{len(missing)} of {len(file_names)} image files are missing under {root}: {shown}")


def build_coco_prompts(captions_json: str | os.PathLike, num_prompts: int, seed: int = 0,
                       images_dir: str | os.PathLike | None = None) -> PromptTable:
    """A seeded COCO prompt subset: `num_prompts` distinct images, one caption each.

    With `rng = numpy.random.default_rng(seed)`: the images are `rng.choice(ids, num_prompts,
    replace=False)` from the sorted ids of the images that have at least one caption; then, in
    increasing image id order, each image's caption is `rng.integers(k)`-th of its k caption
    annotations sorted by annotation id. Rows are in increasing image id order; row = (caption
    annotation id as `id`, caption stripped of surrounding whitespace, `image_ids=(str(image_id),)`,
    `file_names=(file_name,)`). The same file and seed give the same table (and the same
    `save_jsonl` bytes). Source of the protocol: DMD2's COCO-10k evaluation (one caption per
    image of `captions_val2014.json`).

    `images_dir`: when given, every chosen image file must exist there (FileNotFoundError listing
    the first few missing and their count). ValueError naming the file when `num_prompts` is not
    in 1..(number of captioned images) or an annotation lacks its caption / file name."""
    path = Path(captions_json)
    coco = load_coco(path)
    ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=[i]))
    if not isinstance(num_prompts, (int, np.integer)) or not 1 <= num_prompts <= len(ids):
        raise UserError(f"{path}: num_prompts must be in 1..{len(ids)} (the number of captioned images), "
                         f"got {num_prompts!r}")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(ids[k]) for k in rng.choice(len(ids), size=int(num_prompts), replace=False))
    rows = []
    for image_id in chosen:
        anns = sorted(coco.getAnnIds(imgIds=[image_id]))
        ann_id = int(anns[int(rng.integers(len(anns)))])
        rows.append((ann_id, _caption(coco, ann_id, path), str(image_id), _file_name(coco, image_id, path)))
    if images_dir is not None:
        check_image_files([r[3] for r in rows], images_dir)
    return PromptTable(ids=tuple(r[0] for r in rows), texts=tuple(r[1] for r in rows),
                       image_ids=tuple((r[2],) for r in rows), file_names=tuple((r[3],) for r in rows),
                       source=str(path))


def crop_resize_batch(images_u8_nhwc: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images (any H, W; 1 or 3 channels) -> uint8 RGB [N, size, size, 3], each image
    centre-cropped to a square on its long edge and PIL-LANCZOS-resized to `size`
    (`eval.clip_score.crop_resize`, DMD2's `resize_and_center_crop`). TypeError for non-uint8,
    ValueError for another shape."""
    a = np.asarray(images_u8_nhwc)
    if a.dtype != np.uint8:
        raise TypeError(f"crop_resize_batch expects uint8 images, got {a.dtype}")
    if a.ndim != 4 or a.shape[3] not in (1, 3):
        raise UserError(f"crop_resize_batch expects NHWC images with 1 or 3 channels, got shape {a.shape}")
    out = np.empty((len(a), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(a):
        out[i] = np.asarray(crop_resize(img, size))
    return out


def _first_files(table: PromptTable) -> list[str]:
    """Each row's first file name; ValueError naming the table when it has none for some row."""
    if not table.file_names:
        raise UserError(f"prompt table {table.source or '(in memory)'} has no image file names (build it with "
                         f"eval.coco.build_coco_prompts, or use the image folder directly)")
    empty = [r for r, f in enumerate(table.file_names) if not f]
    if empty:
        raise UserError(f"prompt table {table.source or '(in memory)'}: {len(empty)} rows have no image file "
                         f"(first: row {empty[0]}, id {table.ids[empty[0]]})")
    return [f[0] for f in table.file_names]


def check_data_folder(folder: str | os.PathLike) -> None:
    """Verify a data folder written by the suite (the embedded digits-text data: captions json and
    images) against its checksum manifest (`eval.io.check_folder_manifest`); nothing for a folder
    without one (COCO from the site paths). BadFile naming the damaged or missing file."""
    from eval.io import check_folder_manifest

    check_folder_manifest(folder, "data folder")


def open_image_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (PIL; the one image reader of the data sets).
    FileNotFoundError naming a missing file; BadFile naming a file PIL cannot decode (truncated,
    damaged, not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) and e.errno is not None:
            raise  # the machine's (permission, I/O), not the file's
        raise BadFile(path, "not a readable image (truncated or damaged)", found=f"{type(e).__name__}: {e}") from None


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 RGB [size, size, 3] (PIL convert RGB, then `crop_resize`);
    FileNotFoundError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"real image not found: {path}")
    return np.asarray(crop_resize(open_image_rgb(path), size))


def iter_real_images(table: PromptTable, images_dir: str | os.PathLike, size: int,
                     batch_size: int = 256) -> Iterator[np.ndarray]:
    """`load_real_images` in batches of up to `batch_size` rows (uint8 [B, size, size, 3]), for
    reference sets too large for memory (10k COCO images at 512 are 7.9 GB)."""
    files = _first_files(table)
    root = Path(images_dir)
    check_data_folder(root.parent)  # the embedded data's manifest (data/images -> data)
    for start in range(0, len(files), batch_size):
        yield np.stack([read_image(root / f, size) for f in files[start:start + batch_size]])


def load_real_images(table: PromptTable, images_dir: str | os.PathLike, size: int) -> np.ndarray:
    """The real image of each row (its first file name, under `images_dir`) as uint8 NHWC
    [N, size, size, 3]: PIL open, convert RGB, centre-crop the long edge, LANCZOS to `size` (the
    same as `crop_resize_batch` does to generated images). FileNotFoundError naming a missing file;
    ValueError when the table has no file names."""
    return np.concatenate(list(iter_real_images(table, images_dir, size)))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_image_folder(images_dir: str | os.PathLike, size: int) -> np.ndarray:
    """Every image file of a folder (suffix in `IMAGE_SUFFIXES`, any case; not recursive), sorted
    by file name, as uint8 NHWC [N, size, size, 3] with the transform of `load_real_images`: the
    reference set of DMD2's COCO-10k evaluation (`--ref_dir coco10k/subset`, read as a folder).
    FileNotFoundError naming the folder when it is missing or holds no image."""
    root = Path(images_dir)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {root}")
    return np.stack([read_image(p, size) for p in files])
