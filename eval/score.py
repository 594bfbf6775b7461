"""Library entry of the scoring CLI: sample npz -> one JSON file per metric.

Sample files follow the ADM/EDM exchange format: `arr_0` uint8 NHWC images, `arr_1` int labels.

Metric names (`metrics` accepts either these or the generic `fid`/`precision`/`recall`, which are
mapped to the extractor's names):

| extractor                      | FID          | precision          | recall          |
|--------------------------------|--------------|--------------------|-----------------|
| `digits`                       | `fid_digits` | `precision_digits` | `recall_digits` |
| `inception` (torch-fidelity)   | `fid`        | `precision`        | `recall`        |
| `clean-fid`, legacy_tensorflow | `fid`        | `precision`        | `recall`        |
| `clean-fid`, clean             | `fid_clean`  | `precision_clean`  | `recall_clean`  |

plus `max_ssim` (per-class max pairwise SSIM, any images), `class_acc` (share of samples whose
digits-net argmax equals the conditioning label; digits only) and `clip_score` (needs captions and
the `clip_*` config keys). Precision/recall use k=3 and need reference statistics that store the
reference features (`make_ref_stats(..., store_features=True)`, the default). The metrics, what
each needs and the function computing it are listed once, in `eval.metrics.METRICS`.

Each metric is written atomically to `out_dir/{metric}.json` =
`{"metric", "value", "n", "provenance": {...extractor provenance, "ref_stats", "ref_provenance",
"samples", "quantisation", ...}}`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from eval.features import FeatureExtractor, get_extractor
from eval.fid import feature_stats, save_ref_stats
from eval.io import atomic_write_json, file_sha256, git_commit, package_versions
from eval.metrics import GENERIC, METRICS, PR_K, MetricInputs, compute, metric_names, resolve_metric_names  # noqa: F401
from eval.sample import QUANTISATION, quantise_edm, to_nhwc_numpy


def _resolve_extractor(extractor, config) -> FeatureExtractor | None:
    if extractor is None or isinstance(extractor, FeatureExtractor):
        return extractor
    return get_extractor(extractor, config)


def load_samples(npz_path: str | os.PathLike, n_max: int | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """-> (images uint8 NHWC, labels or None, quantisation string)."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"sample file not found: {npz_path}")
    with np.load(npz_path, allow_pickle=False) as z:
        if "arr_0" not in z:
            raise ValueError(f"{npz_path}: no `arr_0` (uint8 NHWC images)")
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z else None
        quant = str(z["quantisation"]) if "quantisation" in z else QUANTISATION
    if labels is not None and labels.ndim == 2:  # one-hot (EDM's label format) -> class indices
        labels = labels.argmax(1)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{npz_path}: arr_0 must be uint8 NHWC, got {images.dtype} {images.shape}")
    if n_max is not None:
        images = images[:n_max]
        labels = None if labels is None else labels[:n_max]
    return images, labels, quant


# ----------------------------------------------------------------------------------------------


def features_in_memory(images: torch.Tensor, extractor: FeatureExtractor | str, config: Mapping | None = None,
                       batch_size: int | None = None) -> np.ndarray:
    """Features of a float [-1, 1] NCHW batch straight from a generator (EDM quantisation applied
    in memory, so the result equals scoring the same samples written to an npz or PNGs)."""
    return _resolve_extractor(extractor, config).features_in_memory(images, batch_size)


def make_ref_stats(real_u8_nhwc: np.ndarray, out_path: str | os.PathLike, extractor: FeatureExtractor | str, *,
                   config: Mapping | None = None, source: str = "", store_features: bool = True) -> dict:
    """Reference statistics (mu, sigma, provenance [+ features]) of real images -> npz at out_path."""
    ext = _resolve_extractor(extractor, config)
    feats = ext.features(real_u8_nhwc)
    mu, sigma = feature_stats(feats)
    prov = {**ext.provenance, "n": int(len(feats)), "source": source,
            "images": f"uint8 NHWC {tuple(real_u8_nhwc.shape[1:])}"}
    save_ref_stats(out_path, mu, sigma, prov, features=feats if store_features else None)
    return dict(mu=mu, sigma=sigma, provenance=prov)


def compute_metrics(images_u8: np.ndarray, labels: np.ndarray | None, metrics: Iterable[str], *,
                    extractor: FeatureExtractor | str | None = None, ref_stats_path: str | os.PathLike | None = None,
                    digits_weights_path: str | os.PathLike | None = None, config: Mapping | None = None,
                    captions: Sequence[str] | None = None, feats: np.ndarray | None = None,
                    device: str | torch.device | None = None) -> dict[str, tuple]:
    """-> {metric: (value, provenance)} for uint8 NHWC images (or precomputed `feats`), in the
    order of `eval.metrics.METRICS`.

    `metrics`: registry names or the generic `fid`/`precision`/`recall` (mapped to `extractor`'s
    names). `extractor`: a built extractor or a registry name built from `config`; may be None
    when no feature metric is asked for. `digits_weights_path` (or `config["digits_weights_path"]`,
    or a digits `extractor`): the classifier of `class_acc`. `device` (default `config["device"]`
    or cpu): where the classifier and the CLIP model run. ValueError for unknown or inapplicable
    metrics, or a missing input (reference statistics, labels, captions)."""
    ext = _resolve_extractor(extractor, config)
    requested = resolve_metric_names(metrics, ext)
    feature_metrics = [m for m in requested if METRICS[m].is_feature_metric]
    if feature_metrics and ref_stats_path is None:
        raise ValueError(f"{feature_metrics} need ref_stats_path")
    inputs = MetricInputs(images_u8, labels, extractor=ext, ref_stats_path=ref_stats_path, feats=feats,
                          digits_weights_path=digits_weights_path, config=config, captions=captions, device=device)
    return {name: compute(spec, inputs) for name, spec in METRICS.items() if name in requested}


def score_samples(npz_path: str | os.PathLike, out_dir: str | os.PathLike, metrics: Iterable[str], *,
                  extractor: FeatureExtractor | str | None, ref_stats_path: str | os.PathLike | None,
                  digits_weights_path: str | os.PathLike | None = None, n_max: int | None = None,
                  config: Mapping | None = None, captions: Sequence[str] | None = None,
                  device: str | torch.device | None = None, prompts=None,
                  resolution: int | None = None) -> dict[str, dict]:
    """Score a sample npz; write `out_dir/{metric}.json` per metric; return {metric: record}.

    `extractor` is a registry name (built from `config`, see eval.features) or a built extractor;
    it may be None when only `max_ssim` / `class_acc` are requested. The other arguments are
    those of `compute_metrics`; `n_max` scores only the first n samples. Text-to-image:
    `prompts` (an `eval.conditions.PromptTable`) gives each sample's caption from its condition
    id (`arr_1`), after checking the file's `conditions_sha256` is this table's (ValueError
    otherwise); `resolution`: images are centre-cropped and LANCZOS-resized to it first
    (`eval.coco.crop_resize_batch`, DMD2's COCO protocol), as the reference images were."""
    images, labels, quant = load_samples(npz_path, n_max)
    if prompts is not None:
        with np.load(npz_path, allow_pickle=False) as z:
            sha = str(z["conditions_sha256"]) if "conditions_sha256" in z else None
        if sha != prompts.sha256:
            raise ValueError(f"{npz_path} was sampled with prompt table {sha} but the given table "
                             f"{prompts.source or '(in memory)'} is {prompts.sha256}")
        captions = prompts.captions(labels)
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        from eval.coco import crop_resize_batch
        images = crop_resize_batch(images, resolution)
    res = compute_metrics(images, labels, metrics, extractor=extractor, ref_stats_path=ref_stats_path,
                          digits_weights_path=digits_weights_path, config=config, captions=captions, device=device)
    out_dir = Path(out_dir)
    records = {}
    made_by = {"git_commit": git_commit(), "versions": package_versions()}
    for name, (value, prov) in res.items():
        rec = {"metric": name, "value": float(value), "n": int(len(images)),
               "provenance": {**prov, "samples": str(npz_path), "samples_sha256": file_sha256(npz_path),
                              "quantisation": quant, "n_max": n_max, **made_by}}
        atomic_write_json(out_dir / f"{name}.json", rec)
        records[name] = rec
    return records


def score_in_memory(images: torch.Tensor, labels: np.ndarray | torch.Tensor | None, metrics: Iterable[str], *,
                    extractor: FeatureExtractor | str | None, ref_stats_path: str | os.PathLike | None = None,
                    digits_weights_path: str | os.PathLike | None = None, config: Mapping | None = None,
                    device: str | torch.device | None = None) -> dict[str, float]:
    """Score a float [-1, 1] NCHW batch straight from a generator (no files): {metric: value}.
    The batch is EDM-quantised (`eval.sample.quantise_edm`) exactly as sample files are."""
    u8 = to_nhwc_numpy(quantise_edm(images))
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    res = compute_metrics(u8, labels, metrics, extractor=extractor, ref_stats_path=ref_stats_path,
                          digits_weights_path=digits_weights_path, config=config, device=device)
    return {k: v for k, (v, _) in res.items()}
