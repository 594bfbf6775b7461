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

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from eval.errors import BadFile, UserError
from eval.features import FeatureExtractor, get_extractor
from eval.fid import feature_stats, save_ref_stats
from eval.io import (  # noqa: F401  (record_sha256: the metric record's checksum, re-exported)
    atomic_write_json,
    check_record,
    file_sha256,
    git_commit,
    package_versions,
    record_sha256,
)
from eval.metrics import GENERIC, METRICS, PR_K, MetricInputs, compute, metric_names, resolve_metric_names  # noqa: F401
from eval.sample import QUANTISATION, SampleSpec, quantise_edm, read_samples, to_nhwc_numpy  # noqa: F401


def _resolve_extractor(extractor, config) -> FeatureExtractor | None:
    if extractor is None or isinstance(extractor, FeatureExtractor):
        return extractor
    return get_extractor(extractor, config)


def load_samples(npz_path: str | os.PathLike, n_max: int | None = None,
                 spec: SampleSpec | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """-> (images uint8 NHWC, labels or None, quantisation string) of a sample npz, read and
    checked by `eval.sample.read_samples` against `spec` (None: the format only; seeds may be
    absent). `n_max`: only the first n samples (after the checks)."""
    z = read_samples(npz_path, spec, need_seeds=spec is not None)
    images, labels = z["arr_0"], z["arr_1"]
    if n_max is not None:
        images = images[:n_max]
        labels = None if labels is None else labels[:n_max]
    return images, labels, z["quantisation"]


def _check_finite_metric(name: str, value, npz_path) -> float:
    """A metric value about to be written, as a float; UserError naming the metric and the samples
    when it is NaN/inf (JSON has no such numbers; a table must never show one as a result)."""
    v = float(value)
    if not np.isfinite(v):
        raise UserError(f"metric {name} of {npz_path} is {v}: refusing to write it (non-finite features or "
                        "reference statistics?)")
    return v


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
        raise UserError(f"{feature_metrics} need ref_stats_path")
    inputs = MetricInputs(images_u8, labels, extractor=ext, ref_stats_path=ref_stats_path, feats=feats,
                          digits_weights_path=digits_weights_path, config=config, captions=captions, device=device)
    return {name: compute(spec, inputs) for name, spec in METRICS.items() if name in requested}


def score_samples(npz_path: str | os.PathLike, out_dir: str | os.PathLike, metrics: Iterable[str], *,
                  extractor: FeatureExtractor | str | None, ref_stats_path: str | os.PathLike | None,
                  digits_weights_path: str | os.PathLike | None = None, n_max: int | None = None,
                  config: Mapping | None = None, captions: Sequence[str] | None = None,
                  device: str | torch.device | None = None, prompts=None,
                  resolution: int | None = None, spec: SampleSpec | None = None) -> dict[str, dict]:
    """Score a sample npz; write `out_dir/{metric}.json` per metric; return {metric: record}.

    `extractor` is a registry name (built from `config`, see eval.features) or a built extractor;
    it may be None when only `max_ssim` / `class_acc` are requested. The other arguments are
    those of `compute_metrics`; `n_max` scores only the first n samples. Text-to-image:
    `prompts` (an `eval.conditions.PromptTable`) gives each sample's caption from its condition
    id (`arr_1`), after checking the file's `conditions_sha256` is this table's (ValueError
    otherwise); `resolution`: images are centre-cropped and LANCZOS-resized to it first
    (`eval.coco.crop_resize_batch`, DMD2's COCO protocol), as the reference images were.

    Checked before anything is computed: the sample file (`eval.sample.read_samples` against
    `spec`, the benchmark's protocol: layout, condition ids, the complete seed set; with `n_max`
    the count is not checked) and the reference statistics (`eval.fid.check_ref_stats`: finite,
    the extractor's dimension, features when precision/recall are asked). Every value is checked
    finite before any file is written; each record carries its sample set (`seeds` first/last,
    sha256) and the reference statistics' sha256, which the table checks against the config, and a
    `warning` when N < the feature dimension."""
    z = read_samples(npz_path, spec if n_max is None else (spec or SampleSpec()).without_count(),
                     need_seeds=spec is not None)
    images, labels, quant, seeds = z["arr_0"], z["arr_1"], z["quantisation"], z["seeds"]
    if n_max is not None:
        images, labels = images[:n_max], None if labels is None else labels[:n_max]
        seeds = None if seeds is None else seeds[:n_max]
    ext = _resolve_extractor(extractor, config)
    requested = resolve_metric_names(metrics, ext)
    if ref_stats_path is not None and any(METRICS[m].is_feature_metric for m in requested):
        # the reference statistics checked before any feature is computed (finite, dimension, features)
        from eval.fid import check_ref_stats
        check_ref_stats(ref_stats_path, requested, dim=getattr(ext, "dim", None))
    if prompts is not None:
        sha = z["conditions_sha256"]
        if sha != prompts.sha256:
            raise UserError(f"{npz_path} was sampled with prompt table {sha} but the given table "
                             f"{prompts.source or '(in memory)'} is {prompts.sha256}")
        captions = prompts.captions(labels)
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        from eval.coco import crop_resize_batch
        images = crop_resize_batch(images, resolution)
    res = compute_metrics(images, labels, requested, extractor=ext, ref_stats_path=ref_stats_path,
                          digits_weights_path=digits_weights_path, config=config, captions=captions, device=device)
    values = {name: _check_finite_metric(name, value, npz_path) for name, (value, _) in res.items()}
    out_dir = Path(out_dir)
    records = {}
    made_by = {"git_commit": git_commit(), "versions": package_versions()}
    sample_set = {"samples": str(npz_path), "samples_sha256": file_sha256(npz_path), "quantisation": quant,
                  "n_max": n_max, "seeds": None if seeds is None or not len(seeds) else
                  [int(seeds.min()), int(seeds.max())]}
    for name, (_, prov) in res.items():
        rec = {"metric": name, "value": values[name], "n": int(len(images)),
               "provenance": {**prov, **sample_set, **made_by}}
        if "ref_stats" in prov and ref_stats_path is not None:
            rec["provenance"]["ref_stats_sha256"] = file_sha256(ref_stats_path)
        dim = getattr(ext, "dim", None)
        if METRICS[name].is_feature_metric and dim and len(images) < dim:
            rec["warning"] = few_samples_warning(len(images), dim)
        rec["record_sha256"] = record_sha256(rec)
        atomic_write_json(out_dir / f"{name}.json", rec)
        records[name] = rec
    if any("warning" in r for r in records.values()):
        warnings.warn(few_samples_warning(len(images), getattr(ext, "dim", 0)), stacklevel=2)
    return records


def read_metric(path: Path, metric: str | None = None) -> dict:
    """Read and check a metric JSON written by `score_samples` (the one reader of the format): a
    JSON object with `metric` (== `metric` when given), a finite number `value`, an int `n`, and
    its own checksum `record_sha256` when it has one. BadFile naming the file otherwise;
    FileNotFoundError (naming it and the rule that writes it) when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "metric file not found (rule score writes it: run the workflow, or "
                                   "`tfd score` for this run)", str(path))
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(path, "not a readable metric JSON (truncated or damaged)", found=e) from None
    if not isinstance(rec, dict) or not {"metric", "value", "n"} <= set(rec):
        raise BadFile(path, "not a metric record", expected="a JSON object with metric, value, n",
                      found=f"keys {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
    if metric is not None and rec["metric"] != metric:
        raise BadFile(path, "holds another metric", key="metric", expected=metric, found=rec["metric"])
    check_record(rec, path, "metric record")  # (a changed digit: rescore it)
    v = rec["value"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadFile(path, "metric value is not a finite number", key="value", found=repr(v))
    return rec


def few_samples_warning(n: int, dim: int) -> str:
    """The warning of a feature metric computed on fewer samples than feature dimensions: the sample
    covariance is singular, so FID is dominated by its bias (it falls as N grows)."""
    return (f"{n} samples < {dim} feature dimensions: the covariance is singular and FID/KID are strongly "
            "biased upwards; compare only numbers computed on the same number of samples")


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
