"""The metric registry: every metric the suite writes, what it needs, and the function computing it.

`METRICS` maps a metric name to a `MetricSpec`: the function (`fn(**inputs) -> (value, details)`,
pure given its inputs), the names of the inputs it needs (`needs`, see `INPUTS`) and, for the
feature metrics, the feature extractor whose features it is computed on. One metric file is
written per name (`eval.score.score_samples`), so the names are also file names and table columns.

| name                                                | needs                        | extractor                     |
|-----------------------------------------------------|------------------------------|-------------------------------|
| `fid` / `precision` / `recall`                      | features + ref (+ pr)        | `inception`, clean-fid legacy |
| `kid` / `density` / `coverage`                      | features + ref_features / dc | `inception`, clean-fid legacy |
| `fid_digits` / `precision_digits` / `recall_digits` | features + ref (+ pr)        | `digits`                      |
| `kid_digits` / `density_digits` / `coverage_digits` | features + ref_features / dc | `digits`                      |
| `fid_shapes` / `precision_shapes` / ... (as digits) | features + ref (+ pr, dc)    | `shapes`                      |
| `fid_clean` / `precision_clean` / `recall_clean`    | features + ref (+ pr)        | `clean-fid` mode `clean`      |
| `kid_clean` / `density_clean` / `coverage_clean`    | features + ref_features / dc | `clean-fid` mode `clean`      |
| `fd_dinov2` (EDM2's FD_DINOv2)                   | features + ref            | `dinov2` (local folder)       |
| `cmmd` (CMMD, RBF sigma 10, x1000)               | features + ref features   | `cmmd_clip` (local folder)    |
| `diversity_digits` / `_dinov2` / `_clip` (DP-DMD)   | features, labels             | digits / dinov2 / cmmd_clip   |
| `max_ssim`                                          | images, labels               | -                             |
| `class_acc`                                         | classifier, images, labels   | digits classifier             |
| `clip_score`                                        | clip, images, captions       | -                             |
| `modes_covered` / `mode_tv` / `rare_recall` / `off_mode` | modes, labels           | - (the `shapes` rule)         |

Per extractor: `fid*` the Frechet distance (float64, `eval.fid`); `precision*`/`recall*` improved
precision/recall with k = `PR_K` = 3 (ADM); `kid*` the Kernel Inception Distance as torch-fidelity
0.4.0 computes it (`eval.kid`: cubic polynomial kernel, unbiased MMD^2, mean over `eval.kid.SUBSETS`
= 100 subsets of min(`eval.kid.SUBSET_SIZE` = 1000, N, N_ref), seed 2020; the std over the subsets in
the details); `density*`/`coverage*` Naeem et al. 2020 with k = `DC_K` = 5 (`eval.prdc.density_coverage`).
All but `fid*` need the reference features stored in the reference statistics (`REF_FEATURE_INPUTS`,
`needs_ref_features`; `eval.fid.check_ref_stats` refuses a file without them).

The generic names `fid`/`precision`/`recall`/`kid`/`density`/`coverage` (`GENERIC`) given to
`eval.score.compute_metrics` are mapped to the extractor's names (`metric_names`).
`check_metric_names` is the config-time check (`tfd check-config`, Snakemake's parse-time check):
it lists unknown names and names that the configured extractor cannot compute, before any job runs.

The mode metrics (`MODE_METRICS`) read each sample's mode with the exact rule of the `shapes`
benchmark (`eval.modes.read_modes`, no network) and compare, per conditioning class, the samples'
sub-mode histogram with the true frequencies (`eval.modes.TRUE_FREQ`); see each function.

`fid_key` answers "which column/key holds the FID" for convergence records and tables.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from eval.embed_metrics import cmmd
from eval.errors import UserError

PR_K = 3  # improved precision/recall: k of the k-NN balls, ADM's evaluator (Kynkaanniemi et al. use 3 too)
DC_K = 5  # density/coverage: k of the k-NN balls, Naeem et al. 2020's recommended k (their experiments, their code)
GENERIC = ("fid", "precision", "recall", "kid", "density", "coverage")
FEATURE_INPUTS = ("features", "ref", "ref_features", "pr", "dc")
REF_FEATURE_INPUTS = ("ref_features", "pr", "dc")  # inputs built from the reference FEATURES (not mu/sigma)

# What a metric function can ask for; `MetricInputs` builds each at most once per scoring call.
INPUTS = {
    "images": "uint8 NHWC numpy array of the samples",
    "labels": "int64 [N] condition (class) ids of the samples, or None",
    "captions": "list of N captions (text-to-image)",
    "features": "float64 [N, D] numpy features of the samples from the feature extractor",
    "ref": "reference statistics dict from eval.fid.load_ref_stats (mu, sigma, features, provenance), "
           "checked against the extractor's provenance",
    "ref_features": "[M, D] reference features stored in the reference statistics (float32 as stored); "
                    "UserError when the file holds only mu/sigma",
    "pr": "eval.prdc.prdc(reference features, sample features, k=PR_K)",
    "dc": "eval.prdc.density_coverage(reference features, sample features, k=DC_K)",
    "diversity_r": "int: samples per condition of the diversity metrics (`eval.diversity_per_condition`; 0: all)",
    "bootstrap": "int: resamples of the sample images for FID's interval (`eval.bootstrap`; 0: none)",
    "classifier": "(eval.features.DigitsExtractor, provenance dict) of the digits classifier",
    "clip": "eval.clip_score.ClipScorer",
    "modes": "int64 [N, 3] (shape, colour, position) of each sample by the shapes rule, -1 off-mode "
             "(eval.modes.read_modes)",
}


# ----------------------------------------------------------------------------------------------
# the metric functions: (inputs) -> (value, details for the metric file's provenance)


def fid(features: np.ndarray, ref: Mapping, bootstrap: int = 0) -> tuple[float, dict]:
    """Frechet distance between the Gaussian of `features` (float64 [N, D], N >= 2) and the
    reference `mu` [D] / `sigma` [D, D], in float64 (`eval.fid.frechet_distance`). `bootstrap` > 0:
    also the sample-set part of its uncertainty, the 95% percentile interval of the FID over that
    many resamples of the sample images (`fid_bootstrap`), in the details as `ci95` [lo, hi]."""
    from eval.fid import feature_stats, frechet_distance

    mu, sigma = feature_stats(features)
    details = {"formula": "Frechet distance, float64, scipy.linalg.sqrtm"}
    if bootstrap:
        details.update(fid_bootstrap(features, ref, bootstrap))
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), details


BOOTSTRAP_SEED = 0


def fid_bootstrap(features: np.ndarray, ref: Mapping, resamples: int, seed: int = BOOTSTRAP_SEED) -> dict:
    """The sample-set uncertainty of a FID (Efron's percentile bootstrap): the FID of `resamples`
    sets of N rows of `features` (float [N, D]) drawn with replacement (numpy `default_rng(seed)`),
    against the fixed reference statistics; -> {"ci95": [2.5th, 97.5th percentile], "bootstrap":
    {"resamples", "seed", "method"}}. It says how much the number would move with another set of
    N sample images from the same generator, not with another training seed."""
    from eval.fid import feature_stats, frechet_distance

    f = np.asarray(features, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(resamples)):
        mu, sigma = feature_stats(f[rng.integers(0, len(f), len(f))])
        values.append(frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return {"ci95": [float(lo), float(hi)],
            "bootstrap": {"resamples": int(resamples), "seed": seed, "method": "percentile, sample images resampled"}}


_PR_DEFINITION = "improved precision/recall (Kynkaanniemi et al. 2019), ADM evaluator convention"


def _pr_details(pr: Mapping) -> dict:
    return {"k": PR_K, "n_real": pr["n_real"], "definition": _PR_DEFINITION}


def precision(pr: Mapping) -> tuple[float, dict]:
    """Improved precision (share of samples inside the k-NN balls of the reference features) from
    `pr` = `eval.prdc.prdc(ref_features, features, k=PR_K)`; a number in [0, 1]."""
    return pr["precision"], _pr_details(pr)


def recall(pr: Mapping) -> tuple[float, dict]:
    """Improved recall (share of reference features inside the k-NN balls of the samples), from
    the same `pr` as `precision`; a number in [0, 1]."""
    return pr["recall"], _pr_details(pr)


def kid(features: np.ndarray, ref_features: np.ndarray) -> tuple[float, dict]:
    """Kernel Inception Distance (Binkowski et al. 2018) of sample `features` [N, D] against
    `ref_features` [M, D] as torch-fidelity 0.4.0 computes it (`eval.kid.kid`, float64): the mean of
    the unbiased MMD^2 with kernel (<x,y>/D + 1)^3 over `eval.kid.SUBSETS` random subsets of
    min(`eval.kid.SUBSET_SIZE`, N, M), seed `eval.kid.SEED`. Details: the std over the subsets
    (`kid_std`), the subset count and size, the seed, the kernel."""
    from eval.kid import DEFINITION
    from eval.kid import kid as kid_estimate

    r = kid_estimate(features, ref_features)
    return r["mean"], {"kid_std": r["std"], **{k: v for k, v in r.items() if k not in ("mean", "std")},
                       "definition": DEFINITION}


_DC_DEFINITION = "density and coverage (Naeem et al. 2020), k-NN balls of the reference features"


def _dc_details(dc: Mapping) -> dict:
    return {"k": dc["k"], "n_real": dc["n_real"], "definition": _DC_DEFINITION}


def density(dc: Mapping) -> tuple[float, dict]:
    """Density: the mean number of reference k-NN balls (k = DC_K) containing a sample, divided by
    k, from `dc` = `eval.prdc.density_coverage(ref_features, features, k=DC_K)`; >= 0, ~1 when the
    samples follow the reference distribution, may exceed 1."""
    return dc["density"], _dc_details(dc)


def coverage(dc: Mapping) -> tuple[float, dict]:
    """Coverage: share of reference features whose k-NN ball (k = DC_K) contains a sample, from the
    same `dc` as `density`; a number in [0, 1]."""
    return dc["coverage"], _dc_details(dc)


def diversity(features: np.ndarray, labels: np.ndarray | None, diversity_r: int = 0) -> tuple[float, dict]:
    """DP-DMD's diversity across seeds (Wu et al. 2026, `test_diversity.py`): for each condition, the
    first `diversity_r` samples of that condition in sample (seed) order (0: all of them), their
    features L2-normalised, and 1 - the mean cosine similarity over all pairs i < j; the value is the
    mean over conditions (`labels` None: one condition). Higher is more diverse; 0 when every sample
    of a condition has the same direction. float64 throughout. Details: R, the per-condition values."""
    f = np.asarray(features, dtype=np.float64)
    lab = np.zeros(len(f), dtype=np.int64) if labels is None else np.asarray(labels)
    r = int(diversity_r or 0)
    if r == 1:
        raise UserError("diversity needs at least 2 samples per condition (eval.diversity_per_condition)")
    per, sizes = {}, set()
    for c in np.unique(lab):
        x = f[lab == c]
        if r:
            if len(x) < r:
                raise UserError(f"diversity: condition {int(c)} has {len(x)} samples, fewer than "
                                f"eval.diversity_per_condition = {r}")
            x = x[:r]
        n = len(x)
        if n < 2:
            raise UserError(f"diversity: condition {int(c)} has {n} sample; it needs at least 2 per condition")
        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = u.sum(axis=0)
        pair_sum = (s @ s - (u * u).sum()) / 2.0  # sum over i < j of <u_i, u_j>
        per[int(c)] = float(1.0 - pair_sum / (n * (n - 1) / 2.0))
        sizes.add(n)
    value = float(np.mean(list(per.values())))
    return value, {"per_condition": per, "samples_per_condition": sorted(sizes), "diversity_per_condition": r,
                   "definition": "DP-DMD diversity: mean over conditions of 1 - mean pairwise cosine similarity "
                                 "of L2-normalised features over the condition's samples (seeds)"}


def max_ssim(images: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Mean over classes of the max SSIM over pairs of samples of that class (`labels` None: one
    class), on uint8 NHWC `images` (`eval.ssim.max_pairwise_ssim`); details hold the SSIM settings
    and the per-class values."""
    from eval.ssim import max_pairwise_ssim, ssim_settings

    v, per_class = max_pairwise_ssim(images, labels)
    return v, {"ssim": ssim_settings(images.shape[1], images.shape[2]), "per_class": per_class,
               "definition": "mean over classes of the max SSIM over pairs of samples of that class"}


def class_acc(classifier: tuple, images: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Share of samples whose digits-classifier argmax equals the label. `classifier` =
    (extractor with `.logits(uint8 NHWC) -> [N, 10]`, its provenance). ValueError without labels."""
    if labels is None:
        raise UserError("class_acc needs labels (arr_1)")
    clf, prov = classifier
    pred = clf.logits(images).argmax(1)
    return (float((pred == np.asarray(labels)).mean()),
            {**prov, "definition": "share of samples whose digits-net argmax equals the label"})


def clip_score(clip, images: np.ndarray, captions: Sequence[str] | None) -> tuple[float, dict]:
    """Mean raw cosine between CLIP image and text embeddings (DMD2's protocol, see
    eval.clip_score); `clip` a ClipScorer. ValueError without captions."""
    if captions is None:
        raise UserError("clip_score needs captions")
    return clip.score(images, list(captions)), clip.provenance


def _mode_hist(modes: np.ndarray, labels: np.ndarray | None, name: str) -> np.ndarray:
    from eval.modes import class_histogram

    if labels is None:
        raise UserError(f"{name} needs labels (arr_1): the conditioning class of each sample")
    return class_histogram(modes, labels)


def _mode_details(definition: str, **extra) -> dict:
    from eval import modes as M

    return {"definition": definition, "rule": "eval.modes.read_modes", "num_modes": M.NUM_MODES,
            "submodes_per_class": M.SUBMODES, "fg_threshold": M.FG_THRESHOLD, "colour_tol": M.COLOUR_TOL, **extra}


def modes_covered(modes: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Share of the benchmark's 48 modes (class x sub-mode) with at least one sample conditioned on
    that class and read (`eval.modes.read_modes`, `modes` int64 [N, 3]) as that mode; in [0, 1].
    `labels` int64 [N] the conditioning classes (UserError when None). Details: per-class counts."""
    hist = _mode_hist(modes, labels, "modes_covered")[:, :-1]
    return float((hist > 0).mean()), _mode_details(
        "share of the modes (class x sub-mode) with >= 1 sample of that class read as that mode",
        per_class=[int(v) for v in (hist > 0).sum(1)])


def mode_tv(modes: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Mean over the 4 classes of the total variation distance between the samples' sub-mode
    histogram (12 sub-modes + an `off` bin for samples not read as a mode of their class) and the
    true frequencies (`eval.modes.TRUE_FREQ`, `off` 0): 0.5 * sum |p - q|, in [0, 1]; a class with
    no sample counts 1. `modes` int64 [N, 3], `labels` int64 [N] (UserError when None). A perfect
    generator still has TV > 0 by chance: an i.i.d. draw of n per class from the true frequencies has
    a mean TV of about 0.12 at n = 100, 0.06 at n = 400 (99th percentile 0.10), 0.037 at n = 1000."""
    from eval.modes import total_variation

    tv = total_variation(_mode_hist(modes, labels, "mode_tv"))
    return float(tv.mean()), _mode_details(
        "mean over classes of the TV distance between the sample sub-mode histogram (+ off bin) and the true "
        "frequencies", per_class=[float(v) for v in tv])


def rare_recall(modes: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Share of the rare modes (`eval.modes.RARE`: the 4 least frequent sub-modes of each class, true
    frequency <= `RARE_MAX_FREQ` = 3.65%, 16 modes) hit by at least one sample of their class; in
    [0, 1]. `modes` int64 [N, 3], `labels` int64 [N] (UserError when None)."""
    from eval.modes import RARE, RARE_MAX_FREQ

    hit = _mode_hist(modes, labels, "rare_recall")[:, :-1] > 0
    return float(hit[RARE].mean()), _mode_details(
        "share of the rare modes (true frequency <= rare_max_freq) with >= 1 sample of their class",
        rare_max_freq=RARE_MAX_FREQ, num_rare=int(RARE.sum()),
        missed=[[int(c), int(s)] for c, s in zip(*np.nonzero(RARE & ~hit))])


def off_mode(modes: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
    """Share of samples not read as a mode of their conditioning class (off-mode by the rule, or a
    mode of another class); in [0, 1]. `modes` int64 [N, 3], `labels` int64 [N] (UserError when None)."""
    hist = _mode_hist(modes, labels, "off_mode")
    n = hist.sum()
    return (float(hist[:, -1].sum() / n) if n else 0.0), _mode_details(
        "share of samples not read as a mode of their conditioning class",
        per_class=[float(h[-1] / h.sum()) if h.sum() else 0.0 for h in hist])


# ----------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class MetricSpec:
    """One metric: `fn(**{need: input})` -> (value, details); `needs` are keys of `INPUTS`;
    `extractors` the feature-extractor kinds whose features it uses (`digits`, `inception`,
    `clean-fid:clean`, `clean-fid:legacy_tensorflow`; empty: not a feature metric)."""

    name: str
    fn: Callable[..., tuple[float, dict]]
    needs: tuple[str, ...]
    extractors: tuple[str, ...] = ()

    @property
    def is_feature_metric(self) -> bool:
        return bool(self.extractors)


def _feature_specs(suffix: str, extractors: tuple[str, ...]) -> dict[str, MetricSpec]:
    return {f"fid{suffix}": MetricSpec(f"fid{suffix}", fid, ("features", "ref", "bootstrap"), extractors),
            f"precision{suffix}": MetricSpec(f"precision{suffix}", precision, ("pr",), extractors),
            f"recall{suffix}": MetricSpec(f"recall{suffix}", recall, ("pr",), extractors),
            f"kid{suffix}": MetricSpec(f"kid{suffix}", kid, ("features", "ref_features"), extractors),
            f"density{suffix}": MetricSpec(f"density{suffix}", density, ("dc",), extractors),
            f"coverage{suffix}": MetricSpec(f"coverage{suffix}", coverage, ("dc",), extractors)}


# Order = the order in which metrics are computed and returned.
METRICS: dict[str, MetricSpec] = {
    **_feature_specs("", ("inception", "clean-fid:legacy_tensorflow")),
    **_feature_specs("_digits", ("digits",)),
    **_feature_specs("_clean", ("clean-fid:clean",)),
    **_feature_specs("_shapes", ("shapes",)),
    "max_ssim": MetricSpec("max_ssim", max_ssim, ("images", "labels")),
    "class_acc": MetricSpec("class_acc", class_acc, ("classifier", "images", "labels")),
    "clip_score": MetricSpec("clip_score", clip_score, ("clip", "images", "captions")),
    # cluster metrics (eval.embed_metrics): EDM2's FD_DINOv2, and CMMD on the stored reference embeddings
    "fd_dinov2": MetricSpec("fd_dinov2", fid, ("features", "ref"), ("dinov2",)),
    "cmmd": MetricSpec("cmmd", cmmd, ("features", "ref_features"), ("cmmd_clip",)),
    # the known modes of the `shapes` benchmark (eval.modes)
    "modes_covered": MetricSpec("modes_covered", modes_covered, ("modes", "labels")),
    "mode_tv": MetricSpec("mode_tv", mode_tv, ("modes", "labels")),
    "rare_recall": MetricSpec("rare_recall", rare_recall, ("modes", "labels")),
    "off_mode": MetricSpec("off_mode", off_mode, ("modes", "labels")),
    # DP-DMD's diversity across seeds, per feature network (digits: the domain feature network)
    "diversity_digits": MetricSpec("diversity_digits", diversity, ("features", "labels", "diversity_r"), ("digits",)),
    "diversity_dinov2": MetricSpec("diversity_dinov2", diversity, ("features", "labels", "diversity_r"), ("dinov2",)),
    "diversity_clip": MetricSpec("diversity_clip", diversity, ("features", "labels", "diversity_r"), ("cmmd_clip",)),
}
MODE_METRICS = ("modes_covered", "mode_tv", "rare_recall", "off_mode")


def known_metrics() -> list[str]:
    """Every metric name the suite can compute, in registry order."""
    return list(METRICS)


def needs_ref_features(name: str) -> bool:
    """True when registry metric `name` needs the reference features (not only mu/sigma), i.e. one
    of its inputs is in `REF_FEATURE_INPUTS`; False for unknown names."""
    spec = METRICS.get(name)
    return spec is not None and any(n in REF_FEATURE_INPUTS for n in spec.needs)


def extractor_kind(extractor, cleanfid_mode: str = "clean") -> str | None:
    """`digits`, `inception`, `clean-fid:clean` or `clean-fid:legacy_tensorflow` for a built
    extractor or an extractor name (a clean-fid name uses `cleanfid_mode`); None for None."""
    if extractor is None:
        return None
    name = extractor if isinstance(extractor, str) else extractor.name
    if name == "clean-fid":
        return f"clean-fid:{getattr(extractor, 'mode', cleanfid_mode)}"
    return name


def metric_names(extractor) -> dict[str, str]:
    """generic name (`GENERIC`: fid/precision/recall/kid/density/coverage) -> the metric name for
    this extractor (a built extractor or a registry name; a clean-fid name means mode `clean`); {}
    for None."""
    kind = extractor_kind(extractor)
    if kind is None:
        return {}
    names = {}
    for g in GENERIC:
        match = [n for n, s in METRICS.items() if s.fn is METRICS[g].fn and kind in s.extractors]
        names[g] = match[0] if match else g
    return names


def resolve_metric_names(metrics: Iterable[str], extractor) -> list[str]:
    """The metrics to compute for `metrics` with `extractor`: generic names mapped to the
    extractor's, duplicates dropped, order kept. ValueError naming unknown or inapplicable names."""
    names = metric_names(extractor)
    kind = extractor_kind(extractor)
    requested = []
    for m in metrics:
        m = names.get(m, m)
        if m not in requested:
            requested.append(m)
    bad = [m for m in requested
           if m not in METRICS or (METRICS[m].is_feature_metric and kind not in METRICS[m].extractors)]
    if bad:
        feature_here = sorted(n for n, s in METRICS.items() if kind in s.extractors)
        raise UserError(f"unknown or inapplicable metrics {bad} for extractor "
                         f"{getattr(extractor, 'name', extractor)!r}; feature metrics here: {feature_here}; "
                         f"all metrics: {known_metrics()}")
    return requested


def check_metric_names(names: Iterable[str], extractor_kind: str | None, cleanfid_mode: str = "clean") -> list[str]:
    """Config-time check of a metric list (`eval.metrics`): one message per problem, [] if none.

    `extractor_kind` is the configured feature extractor (`digits`, `inception`, `clean-fid`
    (with `cleanfid_mode`), or None). Problems: a name not in the registry (with the closest
    known names and the full list), a feature metric of another extractor, a generic name that
    this extractor writes under another name (the metric files are named by the config's names),
    `class_acc` without the digits extractor, and duplicates."""
    kind = extractor_kind if extractor_kind != "clean-fid" else f"clean-fid:{cleanfid_mode}"
    own = metric_names(kind) if kind else {}
    problems, seen = [], set()
    for n in names:
        if n in seen:
            problems.append(f"metric {n!r} is listed twice")
            continue
        seen.add(n)
        spec = METRICS.get(n)
        if spec is None:
            close = difflib.get_close_matches(n, known_metrics(), n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            problems.append(f"unknown metric {n!r}{hint}; valid metrics: {', '.join(known_metrics())}")
        elif spec.is_feature_metric and kind not in spec.extractors:
            mapped = own.get(n) if n in GENERIC else None
            if mapped and mapped != n:
                problems.append(f"metric {n!r}: with feature extractor {extractor_kind!r} it is named {mapped!r}")
            else:
                problems.append(f"metric {n!r} uses {' or '.join(spec.extractors)} features, but the feature "
                                f"extractor is {extractor_kind!r} (its metrics: {', '.join(own.values()) or 'none'})")
        elif "classifier" in spec.needs and kind != "digits":
            problems.append(f"metric {n!r} needs the digits classifier, i.e. feature extractor 'digits' "
                            f"(got {extractor_kind!r})")
    return problems


def is_fid_key(key) -> bool:
    """True for a FID column/record key: a name starting with `fid` that is not a sample count
    (`*_n`, e.g. the convergence record's `fid_digits_n`)."""
    return str(key).startswith("fid") and not str(key).endswith("_n")


def fid_key(keys: Iterable, default: Any = None):
    """The first key of `keys` (column names, or a record's keys) that holds a FID (`is_fid_key`),
    as a str; `default` when there is none."""
    return next((str(k) for k in keys if is_fid_key(k)), default)


# ----------------------------------------------------------------------------------------------
# the inputs of one scoring call


class MetricInputs:
    """The inputs of one scoring call, each built at most once and only when a metric needs it.

    `images` uint8 NHWC, `labels` [N] or None, `extractor` a built FeatureExtractor or None,
    `ref_stats_path` reference statistics npz, `feats` precomputed sample features (skips the
    extractor), `digits_weights_path`/`config` where the digits classifier comes from,
    `captions` for clip_score, `device` where the classifier and the CLIP model run.
    `feature_provenance()` is the common provenance of the feature metrics."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, *, extractor=None,
                 ref_stats_path: str | os.PathLike | None = None, feats: np.ndarray | None = None,
                 digits_weights_path: str | os.PathLike | None = None, config: Mapping | None = None,
                 captions: Sequence[str] | None = None, device=None):
        self.extractor, self.ref_stats_path, self.config = extractor, ref_stats_path, config
        self.digits_weights_path = digits_weights_path
        self.device = device if device is not None else (config or {}).get("device", "cpu")
        self._given_features = feats
        self._cache: dict[str, Any] = {"images": images, "labels": labels, "captions": captions}

    def __getitem__(self, key: str):
        if key not in self._cache:
            if key not in INPUTS:
                raise KeyError(f"unknown metric input {key!r} (known: {sorted(INPUTS)})")
            self._cache[key] = getattr(self, f"_make_{key}")()
        return self._cache[key]

    def _make_ref(self) -> dict:
        from eval.fid import check_provenance, load_ref_stats

        if self.ref_stats_path is None:
            raise UserError("feature metrics need ref_stats_path")
        ref = load_ref_stats(self.ref_stats_path)
        check_provenance(self.extractor.provenance, ref["provenance"], str(self.ref_stats_path))
        return ref

    def _make_features(self) -> np.ndarray:
        ref = self["ref"]  # provenance checked before features are computed
        feats = self._given_features if self._given_features is not None else self.extractor.features(self["images"])
        if ref["mu"].shape != (feats.shape[1],):
            raise UserError(f"reference statistics {self.ref_stats_path} have dimension {ref['mu'].shape}, "
                             f"extractor {self.extractor.name} gives {feats.shape[1]}")
        return feats

    def _make_ref_features(self) -> np.ndarray:
        ref = self["ref"]
        if ref["features"] is None:
            raise UserError(f"precision/recall/kid/density/coverage need reference features, but "
                            f"{self.ref_stats_path} stores only mu/sigma; rebuild it with "
                            f"make_ref_stats(..., store_features=True)")
        return ref["features"]

    def _make_pr(self) -> dict:
        from eval.prdc import prdc

        return prdc(self["ref_features"], self["features"], k=PR_K)

    def _make_bootstrap(self) -> int:
        return int((self.config or {}).get("bootstrap", 0) or 0)

    def _make_diversity_r(self) -> int:
        return int((self.config or {}).get("diversity_per_condition", 0) or 0)

    def _make_dc(self) -> dict:
        from eval.prdc import density_coverage

        return density_coverage(self["ref_features"], self["features"], k=DC_K)

    def _make_classifier(self) -> tuple:
        from eval.features import DigitsExtractor

        cfg_path = (self.config or {}).get("digits_weights_path")
        if self.digits_weights_path is not None:
            clf = DigitsExtractor(self.digits_weights_path, device=self.device)
        elif isinstance(self.extractor, DigitsExtractor):
            clf = self.extractor
        elif cfg_path:
            clf = DigitsExtractor(cfg_path, device=self.device)
        else:
            raise UserError("class_acc needs the digits classifier: pass digits_weights_path or use the digits "
                             "extractor")
        prov = {"classifier": "digits", "weights": str(clf.weights_path), "sha256": clf.provenance["sha256"],
                "classifier_test_acc": clf.net.test_acc}
        return clf, prov

    def _make_modes(self) -> np.ndarray:
        from eval.modes import read_modes

        return read_modes(self["images"])

    def _make_clip(self):
        from eval.clip_score import ClipScorer

        return ClipScorer(self.config or {}, device=self.device)

    def feature_provenance(self) -> dict:
        """Extractor provenance + the reference statistics file and its provenance."""
        return {**self.extractor.provenance, "ref_stats": str(self.ref_stats_path),
                "ref_provenance": self["ref"]["provenance"]}


def compute(spec: MetricSpec, inputs: MetricInputs) -> tuple[float, dict]:
    """Run one metric on `inputs`: (value, provenance); feature metrics get the extractor and
    reference provenance (`MetricInputs.feature_provenance`) under their own details."""
    value, details = spec.fn(**{k: inputs[k] for k in spec.needs})
    if spec.is_feature_metric:
        details = {**inputs.feature_provenance(), **details}
    return value, details
