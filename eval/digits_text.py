"""`digits-text`: the embedded text-to-image dataset, scikit-learn's digits with measured captions.

The 1,797 8x8 handwritten digits of `sklearn.datasets.load_digits` (pixel values 0..16, ink
bright on a dark background, as in `eval.digits_data`) become `size` x `size` RGB uint8 images
(default 32) with several captions each, written as a COCO captions file so that the text-to-image
track reads them with the same code as COCO-2014 (`eval.coco.build_coco_prompts`).

Images. `v * 255 / 16` as float32, PIL bicubic resize (mode "F", `Image.BICUBIC`) from 8x8 to
`size` x `size`, clipped to [0, 255] (bicubic overshoots), rounded half to even (`np.rint`), the
gray value copied to R, G and B. `size` is a multiple of 8, so `eval.features.DigitsExtractor`
(input_size=`size`) area-averages them back to the 8x8 its network was trained on.

Captions name the class word ("seven") and three attributes measured on the 8x8 original (with
`p = v / sum(v)` the ink distribution over pixel centres, x = column, y = row, y pointing down):

* stroke weight: ink mass `sum(v)` divided by the median ink mass of the image's class:
  "thin" below `1 - WEIGHT_TOL`, "thick" above `1 + WEIGHT_TOL`, else none;
* slant: the second-moment skew `mu11 / mu02` (the shear that deskewing removes), minus the
  median skew of the class (the shape of a 7 alone has a strong skew): "leaning right" below
  `-SLANT_TOL` (negative: the ink moves right going up), "leaning left" above `SLANT_TOL`, else
  "upright";
* size: ink extent `sqrt(mu20 + mu02)` (radius of gyration) divided by the class median:
  "small" below `1 - SIZE_TOL`, "large" above `1 + SIZE_TOL`, else none. (The bounding-box
  height is 8 rows for all 1,797 digits: the source normalised their size, so it cannot be used.)

Every image gets one caption per template of `TEMPLATES` (4), all distinct and all naming the class
word, e.g. "a thick seven leaning right", "the digit seven (7), thick strokes, slanted to the right",
"a handwritten seven", "the number seven in thick strokes, leaning to the right".
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from eval.errors import UserError
from eval.io import MANIFEST, atomic_directory, atomic_write_json

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHT_TOL, SLANT_TOL, SIZE_TOL = 0.10, 0.06, 0.03
ATTRIBUTES = {"weight": ("thin", "thick", "none"), "slant": ("leaning left", "leaning right", "upright"),
              "size": ("small", "large", "none")}
TEMPLATES = ("phrase", "digit_list", "handwritten", "number")
CAPTIONS_FILE, IMAGES_DIR = "captions.json", "images"
SOURCE = "sklearn.datasets.load_digits (UCI ML hand-written digits, 1,797 8x8 images, values 0..16)"


# ----------------------------------------------------------------------------------------------
# measured attributes


def ink_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits `x` float [N, 8, 8] (non-negative ink) -> (mass, mu20, mu02, mu11), float64 [N] each:
    total ink and the ink-weighted central second moments in pixel units (x = column, y = row
    pointing down). ValueError when an image has no ink."""
    x = np.asarray(x, dtype=np.float64)
    mass = x.sum(axis=(1, 2))
    if np.any(mass <= 0):
        raise UserError(f"digit image {int(np.argmin(mass))} has no ink")
    yy, xx = np.mgrid[0:x.shape[1], 0:x.shape[2]].astype(np.float64)
    p = x / mass[:, None, None]
    mx, my = (p * xx).sum(axis=(1, 2)), (p * yy).sum(axis=(1, 2))
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    return mass, (p * dx * dx).sum(axis=(1, 2)), (p * dy * dy).sum(axis=(1, 2)), (p * dx * dy).sum(axis=(1, 2))


def _class_median(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each element's class median of `values` ([N] float64)."""
    med = {c: np.median(values[labels == c]) for c in np.unique(labels)}
    return np.array([med[c] for c in labels], dtype=np.float64)


def _three_way(v: np.ndarray, lo: float, hi: float, names: tuple[str, str, str]) -> np.ndarray:
    """names[0] where v < lo, names[1] where v > hi, names[2] otherwise -> object array [N]."""
    return np.where(v < lo, names[0], np.where(v > hi, names[1], names[2])).astype(object)


def measure_attributes(x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Digits `x` float [N, 8, 8] (0..16) and int `labels` [N] -> {"weight", "slant", "size": str
    arrays [N]} (values in `ATTRIBUTES`), plus the class-relative measurements `weight_ratio`,
    `slant_offset`, `size_ratio` (float64 [N]). See the module docstring for the rules."""
    labels = np.asarray(labels)
    mass, mu20, mu02, mu11 = ink_moments(x)
    weight = mass / _class_median(mass, labels)
    skew = mu11 / mu02
    slant = skew - _class_median(skew, labels)
    extent = np.sqrt(mu20 + mu02)
    size = extent / _class_median(extent, labels)
    return {"weight": _three_way(weight, 1 - WEIGHT_TOL, 1 + WEIGHT_TOL, ("thin", "thick", "none")),
            "slant": _three_way(slant, -SLANT_TOL, SLANT_TOL, ("leaning right", "leaning left", "upright")),
            "size": _three_way(size, 1 - SIZE_TOL, 1 + SIZE_TOL, ("small", "large", "none")),
            "weight_ratio": weight, "slant_offset": slant, "size_ratio": size}


# ----------------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    """'an' before a vowel sound ('an eight', 'an upright'), else 'a' ('a one')."""
    return "an" if word[0] in "aeiou" and word != "one" else "a"


def captions_for(label: int, weight: str, slant: str, size: str) -> list[str]:
    """The captions of one digit, one per template of `TEMPLATES` (distinct, each naming the class
    word). `weight`, `slant`, `size`: values of `ATTRIBUTES`. KeyError for an unknown value."""
    word = CLASS_WORDS[int(label)]
    w = {"thin": "thin", "thick": "thick", "none": None}[weight]
    s = {"small": "small", "large": "large", "none": None}[size]
    lean = {"leaning left": "left", "leaning right": "right", "upright": None}[slant]
    adjectives = [a for a in (s, w, None if lean else "upright") if a]
    phrase = " ".join(adjectives + [word]) + (f" leaning {lean}" if lean else "")
    parts = [f"the digit {word} ({int(label)})"] + ([f"{w} strokes"] if w else []) + ([s] if s else [])
    parts.append(f"slanted to the {lean}" if lean else "upright")
    handwritten = " ".join([a for a in (s,) if a] + ["handwritten", word])
    number = (f"the number {word} in {w or 'regular'} strokes, "
              + (f"leaning to the {lean}" if lean else "standing upright"))
    return [f"{_article(phrase)} {phrase}", ", ".join(parts), f"{_article(handwritten)} {handwritten}", number]


# ----------------------------------------------------------------------------------------------
# images and the COCO file


def upsample_digits(x: np.ndarray, size: int = 32) -> np.ndarray:
    """Digits float [N, 8, 8] (0..16) -> uint8 RGB [N, size, size, 3]: `v * 255 / 16`, PIL bicubic
    (mode "F") to `size`, clip to [0, 255], round half to even, gray copied to 3 channels.
    ValueError unless `size` is a positive multiple of 8."""
    from PIL import Image

    if not isinstance(size, (int, np.integer)) or size < 8 or size % 8:
        raise UserError(f"digits-text image size must be a positive multiple of 8, got {size!r}")
    out = np.empty((len(x), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(np.asarray(x, dtype=np.float32)):
        f = Image.fromarray(img * np.float32(255 / 16)).resize((size, size), Image.BICUBIC)
        out[i] = np.rint(np.clip(np.asarray(f), 0, 255)).astype(np.uint8)[..., None]
    return out


def _coco_dict(images: np.ndarray, labels: np.ndarray, attrs: dict, size: int) -> dict:
    """The COCO captions dict (info, licenses, images, annotations) of the digits-text set; image
    `i` (sklearn index) has id `i + 1` and file `digit_<i:04d>.png`; caption k of image i has id
    `i * len(TEMPLATES) + k + 1`."""
    imgs, anns = [], []
    for i, label in enumerate(labels):
        a = {k: str(attrs[k][i]) for k in ATTRIBUTES}
        imgs.append({"id": i + 1, "file_name": f"digit_{i:04d}.png", "width": size, "height": size,
                     "label": int(label), "attributes": a, "sklearn_index": i})
        for k, text in enumerate(captions_for(label, a["weight"], a["slant"], a["size"])):
            anns.append({"id": i * len(TEMPLATES) + k + 1, "image_id": i + 1, "caption": text})
    info = {"description": "digits-text: scikit-learn digits with captions from measured attributes "
                           "(eval/digits_text.py)", "source": SOURCE, "version": "1", "size": size,
            "upsampling": "v*255/16, PIL bicubic (mode F) 8 -> size, clip [0,255], round half to even, gray -> RGB",
            "attributes": {"weight": f"ink mass / class median: thin < {1 - WEIGHT_TOL}, thick > {1 + WEIGHT_TOL}",
                           "slant": f"mu11/mu02 - class median: leaning right < -{SLANT_TOL}, "
                                    f"leaning left > {SLANT_TOL}",
                           "size": f"sqrt(mu20+mu02) / class median: small < {1 - SIZE_TOL}, "
                                   f"large > {1 + SIZE_TOL}"}}
    return {"info": info, "licenses": [], "images": imgs, "annotations": anns}


def _counts(labels: np.ndarray, attrs: dict, n_captions: int) -> dict:
    """Images, captions, and images per class and per attribute value."""
    out = {"images": int(len(labels)), "captions": int(n_captions),
           "class": {CLASS_WORDS[c]: int(n) for c, n in sorted(Counter(labels.tolist()).items())}}
    for k, values in ATTRIBUTES.items():
        counts = Counter(attrs[k].tolist())
        out[k] = {v: int(counts.get(v, 0)) for v in values}
    return out


def _is_previous_output(out: Path) -> bool:
    """True when `out` holds nothing but what `write_digits_coco` writes (safe to replace)."""
    return out.is_dir() and {p.name for p in out.iterdir()} <= {CAPTIONS_FILE, IMAGES_DIR, MANIFEST}


def write_digits_coco(out_dir: str | os.PathLike, size: int = 32) -> dict:
    """Write the digits-text set: `out_dir/images/digit_<i:04d>.png` (RGB uint8, `size` x `size`)
    and `out_dir/captions.json` (COCO captions format; images carry `label`, `attributes`,
    `sklearn_index` as extra keys) and the folder's checksum manifest (`eval.io.MANIFEST`, verified
    by `eval.coco.load_coco`). Deterministic (byte-identical on rerun) and atomic: built in a
    sibling temporary folder, then renamed into place.

    Returns {"paths": {"dir", "images", "captions"}, "counts": {images, captions, class,
    weight, slant, size}} (images per class and per attribute value). FileExistsError when
    `out_dir` exists and holds anything else than a previous output; ValueError for a bad `size`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    if out.exists() and not _is_previous_output(out):
        raise FileExistsError(f"{out} exists and is not a digits-text folder (only {IMAGES_DIR}/ and "
                              f"{CAPTIONS_FILE}): refusing to replace it")
    d = load_digits()
    x, labels = d.images.astype(np.float64), d.target.astype(np.int64)
    images = upsample_digits(x, size)
    attrs = measure_attributes(x, labels)
    coco = _coco_dict(images, labels, attrs, size)
    with atomic_directory(out, manifest=True) as tmp:  # + its checksum manifest (eval.coco verifies it)
        (tmp / IMAGES_DIR).mkdir()
        for rec, img in zip(coco["images"], images):
            Image.fromarray(img).save(tmp / IMAGES_DIR / rec["file_name"], format="PNG")
        atomic_write_json(tmp / CAPTIONS_FILE, coco)
    return {"paths": {"dir": str(out), "images": str(out / IMAGES_DIR), "captions": str(out / CAPTIONS_FILE)},
            "counts": _counts(labels, attrs, len(coco["annotations"]))}


def digits_text_arrays(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """Read a `write_digits_coco` folder back through pycocotools: (images uint8 RGB NHWC
    [N, size, size, 3], captions [N] lists of every caption of the image in annotation id order,
    labels int64 [N]), images in increasing image id order (= sklearn order).

    FileNotFoundError naming a missing file; ValueError naming the captions file and image when
    an image lacks the `label` key or its PNG has another size than the others."""
    from eval.coco import load_coco, open_image_rgb

    root = Path(out_dir)
    path = root / CAPTIONS_FILE
    coco = load_coco(path)
    images, captions, labels = [], [], []
    for image_id in sorted(coco.getImgIds()):
        rec = coco.imgs[image_id]
        if "label" not in rec or "file_name" not in rec:
            raise UserError(f"{path}: image {image_id} lacks the key 'label' or 'file_name'")
        png = root / IMAGES_DIR / rec["file_name"]
        if not png.is_file():
            raise FileNotFoundError(f"digits-text image not found: {png} (listed in {path})")
        images.append(open_image_rgb(png))
        if images[-1].shape != images[0].shape:
            raise UserError(f"{path}: image {image_id} ({png.name}) is {images[-1].shape}, others {images[0].shape}")
        captions.append([coco.anns[a]["caption"] for a in sorted(coco.getAnnIds(imgIds=[image_id]))])
        labels.append(int(rec["label"]))
    return np.stack(images), captions, np.asarray(labels, dtype=np.int64)
