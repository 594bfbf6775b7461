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
reference features (`make_ref_stats(..., store_features=True)`, the default).

Each metric is written atomically to `out_dir/{metric}.json` =
`{"metric", "value", "n", "provenance": {...extractor provenance, "ref_stats", "ref_provenance",
"samples", "quantisation", ...}}`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from eval.features import QUANTISATION, DigitsExtractor, FeatureExtractor, build_extractor, file_sha256, get_extractor
from eval.fid import check_provenance, feature_stats, frechet_distance, load_ref_stats, save_ref_stats

try:  # the sampler's own description of its quantisation (same formula as eval.features.quantise_edm)
    from eval.sample import QUANTISATION as SAMPLES_QUANTISATION
except ImportError:  # pragma: no cover
    SAMPLES_QUANTISATION = QUANTISATION

PR_K = 3
GENERIC = ("fid", "precision", "recall")


def metric_names(extractor: FeatureExtractor | str | None) -> dict[str, str]:
    """generic name (fid/precision/recall) -> the metric name for this extractor."""
    if extractor is None:
        return {}
    name = extractor if isinstance(extractor, str) else extractor.name
    if name == "digits":
        suffix = "_digits"
    elif name == "clean-fid" and getattr(extractor, "mode", "clean") == "clean":
        suffix = "_clean"
    else:
        suffix = ""
    return {g: g + suffix for g in GENERIC}


def _resolve_extractor(extractor, config) -> FeatureExtractor | None:
    if extractor is None or isinstance(extractor, FeatureExtractor):
        return extractor
    return get_extractor(extractor, config)


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


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
        quant = str(z["quantisation"]) if "quantisation" in z else SAMPLES_QUANTISATION
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


def _classifier(extractor, classifier_path, config) -> tuple[DigitsExtractor, dict]:
    if classifier_path is not None:
        clf = DigitsExtractor(classifier_path)
    elif isinstance(extractor, DigitsExtractor):
        clf = extractor
    elif config and config.get("digits_net_path"):
        clf = DigitsExtractor(config["digits_net_path"])
    else:
        raise ValueError("class_acc needs the digits classifier: pass classifier_path or use the digits extractor")
    prov = {"classifier": "digits", "weights": str(clf.weights_path), "sha256": clf.provenance["sha256"],
            "classifier_test_acc": clf.net.test_acc}
    return clf, prov


def compute_metrics(images_u8: np.ndarray, labels: np.ndarray | None, metrics: Iterable[str], *,
                    extractor: FeatureExtractor | str | None = None, ref_stats_path: str | os.PathLike | None = None,
                    classifier_path: str | os.PathLike | None = None, config: Mapping | None = None,
                    captions: Sequence[str] | None = None, feats: np.ndarray | None = None) -> dict[str, tuple]:
    """-> {metric: (value, provenance)} for uint8 NHWC images (or precomputed `feats`)."""
    ext = _resolve_extractor(extractor, config)
    names = metric_names(ext)
    generic_of = {v: k for k, v in names.items()}
    requested = []
    for m in metrics:
        m = names.get(m, m)
        if m not in requested:
            requested.append(m)
    out: dict[str, tuple] = {}
    feat_metrics = [m for m in requested if m in generic_of]
    unknown = [m for m in requested if m not in generic_of and m not in ("max_ssim", "class_acc", "clip_score")]
    if unknown:
        raise ValueError(f"unknown or inapplicable metrics {unknown} for extractor "
                         f"{getattr(ext, 'name', None)!r}; feature metrics here: {sorted(generic_of)}")
    if feat_metrics:
        if ref_stats_path is None:
            raise ValueError(f"{feat_metrics} need ref_stats_path")
        ref = load_ref_stats(ref_stats_path)
        check_provenance(ext.provenance, ref["provenance"], str(ref_stats_path))
        if feats is None:
            feats = ext.features(images_u8)
        if ref["mu"].shape != (feats.shape[1],):
            raise ValueError(f"reference statistics {ref_stats_path} have dimension {ref['mu'].shape}, "
                             f"extractor {ext.name} gives {feats.shape[1]}")
        base = {**ext.provenance, "ref_stats": str(ref_stats_path), "ref_provenance": ref["provenance"]}
        if names["fid"] in feat_metrics:
            mu, sigma = feature_stats(feats)
            out[names["fid"]] = (frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
                                 {**base, "formula": "Frechet distance, float64, scipy.linalg.sqrtm"})
        if names["precision"] in feat_metrics or names["recall"] in feat_metrics:
            if ref["features"] is None:
                raise ValueError(f"precision/recall need reference features, but {ref_stats_path} stores only "
                                 f"mu/sigma; rebuild it with make_ref_stats(..., store_features=True)")
            from eval.prdc import prdc

            pr = prdc(ref["features"], feats, k=PR_K)
            prov = {**base, "k": PR_K, "n_real": pr["n_real"],
                    "definition": "improved precision/recall (Kynkaanniemi et al. 2019), ADM evaluator convention"}
            for g in ("precision", "recall"):
                if names[g] in feat_metrics:
                    out[names[g]] = (pr[g], prov)
    if "max_ssim" in requested:
        from eval.ssim import max_pairwise_ssim, ssim_settings

        v, per_class = max_pairwise_ssim(images_u8, labels)
        out["max_ssim"] = (v, {"ssim": ssim_settings(images_u8.shape[1], images_u8.shape[2]),
                               "per_class": per_class,
                               "definition": "mean over classes of the max SSIM over pairs of samples of that class"})
    if "class_acc" in requested:
        if labels is None:
            raise ValueError("class_acc needs labels (arr_1)")
        clf, prov = _classifier(ext, classifier_path, config)
        pred = clf.logits(images_u8).argmax(1)
        out["class_acc"] = (float((pred == np.asarray(labels)).mean()),
                            {**prov, "definition": "share of samples whose digits-net argmax equals the label"})
    if "clip_score" in requested:
        if captions is None:
            raise ValueError("clip_score needs captions")
        from eval.clip_score import ClipScorer

        s = ClipScorer(config or {})
        out["clip_score"] = (s.score(images_u8, list(captions)), s.provenance)
    return out


def score_samples(npz_path: str | os.PathLike, out_dir: str | os.PathLike, metrics: Iterable[str], *,
                  extractor: FeatureExtractor | str | None, ref_stats_path: str | os.PathLike | None,
                  classifier_path: str | os.PathLike | None = None, n_max: int | None = None,
                  config: Mapping | None = None, captions: Sequence[str] | None = None) -> dict[str, dict]:
    """Score a sample npz; write `out_dir/{metric}.json` per metric; return {metric: record}.

    `extractor` is a registry name (built from `config`, see eval.features) or a built extractor;
    it may be None when only `max_ssim` / `class_acc` are requested."""
    images, labels, quant = load_samples(npz_path, n_max)
    res = compute_metrics(images, labels, metrics, extractor=extractor, ref_stats_path=ref_stats_path,
                          classifier_path=classifier_path, config=config, captions=captions)
    from tfd.utils import git_commit, package_versions

    out_dir = Path(out_dir)
    records = {}
    made_by = {"git_commit": git_commit(), "versions": package_versions()}
    for name, (value, prov) in res.items():
        rec = {"metric": name, "value": float(value), "n": int(len(images)),
               "provenance": {**prov, "samples": str(npz_path), "samples_sha256": file_sha256(npz_path),
                              "quantisation": quant, "n_max": n_max, **made_by}}
        _write_json_atomic(out_dir / f"{name}.json", rec)
        records[name] = rec
    return records


def score_in_memory(images: torch.Tensor, labels: np.ndarray | torch.Tensor | None, metrics: Iterable[str], *,
                    extractor: FeatureExtractor | str | None, ref_stats_path: str | os.PathLike | None = None,
                    classifier_path: str | os.PathLike | None = None, config: Mapping | None = None) -> dict[str, float]:
    """Score a float [-1, 1] NCHW batch straight from a generator (no files): {metric: value}."""
    from eval.features import quantise_edm

    u8 = quantise_edm(images).cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    res = compute_metrics(u8, labels, metrics, extractor=extractor, ref_stats_path=ref_stats_path,
                          classifier_path=classifier_path, config=config)
    return {k: v for k, (v, _) in res.items()}


def convergence_eval_fn(b, feature_net_path, ref_stats_path, method_cls, params, *, num: int | None = None,
                        batch_size: int | None = None):
    """The trainer's `eval_fn(generator, step) -> {fid name: value}` for convergence curves.

    Samples `b.eval.convergence_samples` images from the live generator with the method's own
    evaluation sampler (`method_cls.sampler_for`), balanced labels `i % num_classes` and per-image
    seeds `b.eval.base_seed + i` (the same images every call), and scores them in memory against
    `ref_stats_path`. A bare EDM network is wrapped in `tfd.teacher.Teacher(trainable=True)` (so it
    is not frozen); the network's train/eval mode is restored afterwards."""
    from eval.fid import check_provenance as _check
    from tfd.sampling import StackedRandom

    ext = build_extractor(b.eval.feature_net, weights_path=feature_net_path or b.eval.feature_extractor_weights_path)
    ref = load_ref_stats(ref_stats_path)
    _check(ext.provenance, ref["provenance"], str(ref_stats_path))
    name = metric_names(ext)["fid"]
    shape = (b.channels, b.resolution, b.resolution)
    n = int(num or b.eval.convergence_samples)
    bs = int(batch_size or b.eval.batch_size)
    num_classes = int(b.num_classes)

    def eval_fn(net: torch.nn.Module, step: int) -> dict:
        from tfd.teacher import Teacher

        gen = net if hasattr(net, "denoise") else Teacher(net, trainable=True)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        sampler = method_cls.sampler_for(gen, params, shape)
        feats = []
        try:
            with torch.no_grad():
                for s0 in range(0, n, bs):
                    idx = np.arange(s0, min(n, s0 + bs))
                    y = torch.as_tensor(idx % num_classes if num_classes else np.zeros_like(idx), device=device)
                    x = sampler(y, StackedRandom(b.eval.base_seed + idx, device=device))
                    feats.append(ext.features_in_memory(x))
        finally:
            net.train(was_training)
        mu, sigma = feature_stats(np.concatenate(feats))
        return {name: frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), f"{name}_n": n}

    return eval_fn

