"""KID (eval.kid) against torch-fidelity 0.4.0's `kid_features_to_metric` and a plain-loop MMD^2;
density and coverage (eval.prdc.density_coverage, k = DC_K = 5) against Naeem et al.'s definitions
written as plain Python loops; their registration in eval.metrics and the reference-features check."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from eval.errors import BadFile, UserError
from eval.kid import SEED, SUBSET_SIZE, SUBSETS, kid, mmd2_unbiased
from eval.metrics import (
    DC_K,
    METRICS,
    MetricInputs,
    check_metric_names,
    compute,
    metric_names,
    needs_ref_features,
    resolve_metric_names,
)
from eval.prdc import density_coverage, prdc

NEW = ("kid", "density", "coverage")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(prev)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------------------------
# KID


def _torch_fidelity_kid(samples, reference, subsets, subset_size):
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    # torch-fidelity's input1 = the generated samples, input2 = the reference; its defaults otherwise
    out = kid_features_to_metric(torch.from_numpy(samples), torch.from_numpy(reference), kid_subsets=subsets,
                                 kid_subset_size=subset_size, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


# (N samples, N reference, D, subsets, subset size): small and large D, subsets of all / part of the points
SHAPES = [(300, 250, 16, 10, 100), (1200, 1500, 64, 4, 1000), (150, 130, 2048, 3, 120), (80, 80, 8, 20, 80)]


@pytest.mark.parametrize("n1,n2,d,subsets,size", SHAPES)
def test_kid_equals_torch_fidelity(n1, n2, d, subsets, size):
    rng = np.random.default_rng(n1 + d)
    # ReLU-like features, as an extractor's; a small shift, so KID is small (~1e-3) and the estimator's
    # cancellation between its three O(1) terms is exercised
    samples = np.abs(rng.normal(0.05, 1.05, size=(n1, d)))
    reference = np.abs(rng.normal(size=(n2, d)))
    ours = kid(samples, reference, subsets=subsets, subset_size=size)
    mean, std = _torch_fidelity_kid(samples, reference, subsets, size)
    rel = max(_rel(ours["mean"], mean), _rel(ours["std"], std) if size < min(n1, n2) else 0.0)
    print(f"\nKID {n1}x{n2}x{d}: ours {ours['mean']:.10g} +- {ours['std']:.4g}, torch-fidelity {mean:.10g} +- "
          f"{std:.4g}, max rel diff {rel:.2e}")
    assert ours["mean"] == pytest.approx(mean, rel=1e-6)
    if size < min(n1, n2):  # all points in every subset: std is rounding noise (~1e-17), not compared
        assert ours["std"] == pytest.approx(std, rel=1e-6)
    assert (ours["subsets"], ours["subset_size"], ours["seed"]) == (subsets, size, 2020)


def test_kid_defaults_and_subset_size_capped_at_the_smaller_set():
    """Defaults are torch-fidelity's (100 subsets of 1000, seed 2020, degree 3, gamma 1/D, coef0 1);
    with fewer points than 1000 the subset size is min(1000, N, M) (torch-fidelity refuses)."""
    from torch_fidelity.defaults import DEFAULTS

    assert (SUBSETS, SUBSET_SIZE, SEED) == (DEFAULTS["kid_subsets"], DEFAULTS["kid_subset_size"], DEFAULTS["rng_seed"])
    assert (DEFAULTS["kid_kernel"], DEFAULTS["kid_kernel_poly_degree"], DEFAULTS["kid_kernel_poly_gamma"],
            DEFAULTS["kid_kernel_poly_coef0"]) == ("poly", 3, None, 1)
    rng = np.random.default_rng(3)
    samples, reference = rng.normal(size=(90, 6)), rng.normal(0.5, 1.0, size=(140, 6))
    ours = kid(samples, reference)
    assert (ours["subsets"], ours["subset_size"], ours["subset_size_requested"]) == (100, 90, 1000)
    assert ours["kernel"] == {"kind": "polynomial", "degree": 3, "gamma": 1 / 6, "coef0": 1.0}
    mean, std = _torch_fidelity_kid(samples, reference, 100, 90)
    assert ours["mean"] == pytest.approx(mean, rel=1e-6) and ours["std"] == pytest.approx(std, rel=1e-6)
    assert ours["mean"] > 0.05  # the shift is detected
    with pytest.raises(Exception, match="subset size"):
        _torch_fidelity_kid(samples, reference, 100, 1000)
    with pytest.raises(UserError, match="same D"):
        kid(samples, reference[:, :5])
    with pytest.raises(UserError, match=">= 2 points"):
        kid(samples[:1], reference)


def test_mmd2_equals_the_formula_as_loops():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.3, 1.0, size=(7, 3))

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / 3 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# density and coverage


def _loops(real, fake, k):
    """Naeem et al. 2020: r_i = distance from real X_i to its k-th nearest other real point;
    density = sum_j sum_i 1[|Y_j - X_i| <= r_i] / (k M); coverage = share of i with min_j |Y_j - X_i| <= r_i."""
    real, fake = real.tolist(), fake.tolist()
    radii = [sorted(math.dist(x, z) for j, z in enumerate(real) if j != i)[k - 1] for i, x in enumerate(real)]
    density = sum(math.dist(y, x) <= r for y in fake for x, r in zip(real, radii)) / (k * len(fake))
    coverage = sum(min(math.dist(y, x) for y in fake) <= r for x, r in zip(real, radii)) / len(real)
    return density, coverage


@pytest.mark.parametrize("n_real,n_fake,d,batch", [(60, 45, 3, 1024), (80, 120, 10, 17), (40, 40, 32, 7)])
def test_density_coverage_equal_the_definitions(n_real, n_fake, d, batch):
    rng = np.random.default_rng(n_real + d)
    real = rng.normal(size=(n_real, d))
    fake = rng.normal(0.4, 1.3, size=(n_fake, d))
    ours = density_coverage(real, fake, k=DC_K, batch_size=batch)
    dens, cov = _loops(real, fake, DC_K)
    diff = max(abs(ours["density"] - dens), abs(ours["coverage"] - cov))
    print(f"\ndensity/coverage {n_real}x{n_fake}x{d}: ours {ours['density']:.10g}/{ours['coverage']:.10g}, "
          f"loops {dens:.10g}/{cov:.10g}, max abs diff {diff:.1e}")
    assert ours["density"] == pytest.approx(dens, rel=1e-6, abs=1e-12)
    assert ours["coverage"] == pytest.approx(cov, rel=1e-6, abs=1e-12)
    assert 0 < ours["coverage"] < 1 and ours["k"] == DC_K == 5
    full = prdc(real, fake, k=DC_K, batch_size=batch)  # the same numbers from the k = 3 code's function
    assert (full["density"], full["coverage"]) == pytest.approx((ours["density"], ours["coverage"]), rel=1e-12)


def test_density_coverage_by_hand_ties_count_as_inside():
    real = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])  # k = 1 radii: 1, 1, 2, 3, 4
    d = density_coverage(real, np.array([[0.5], [20.0]]), k=1)
    assert (d["density"], d["coverage"]) == (2 / 2, 2 / 5)
    d = density_coverage(real, np.array([[2.0]]), k=1)  # on the boundary of the balls of 1 and 3
    assert (d["density"], d["coverage"]) == (2.0, 2 / 5)
    with pytest.raises(UserError, match="more than k=5"):
        density_coverage(real, real, k=5)


# ----------------------------------------------------------------------------------------------
# registration


def test_registered_per_extractor_and_pure():
    for suffix, kind in (("", "inception"), ("_digits", "digits"), ("_clean", "clean-fid")):
        names = metric_names(kind)
        for g in NEW:
            assert names[g] == f"{g}{suffix}" and needs_ref_features(f"{g}{suffix}")
    assert not needs_ref_features("fid_digits") and needs_ref_features("precision_digits")
    assert not needs_ref_features("max_ssim") and not needs_ref_features("no_such_metric")
    assert resolve_metric_names(["kid", "density", "coverage_digits"], "digits") == \
        ["kid_digits", "density_digits", "coverage_digits"]
    assert check_metric_names(["fid_digits", "kid_digits", "density_digits", "coverage_digits"], "digits") == []
    (p,) = check_metric_names(["kid"], "digits")
    assert "named 'kid_digits'" in p
    (p,) = check_metric_names(["density_clean"], "digits")
    assert "density_clean" in p and "clean-fid:clean" in p
    (p,) = check_metric_names(["kid_digit"], "digits")
    assert "did you mean 'kid_digits'" in p

    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(300, 4)), rng.normal(0.3, 1.0, size=(200, 4))
    v, details = METRICS["kid_digits"].fn(features=fake, ref_features=real)
    ref = kid(fake, real)
    assert v == ref["mean"] and details["kid_std"] == ref["std"] and details["kid_std"] > 0
    assert (details["subsets"], details["subset_size"], details["seed"]) == (100, 200, 2020)
    dc = density_coverage(real, fake, k=DC_K)
    value, details = METRICS["density_clean"].fn(dc=dc)
    assert value == dc["density"] and (details["k"], details["n_real"]) == (5, 300) and "Naeem" in details["definition"]
    assert METRICS["coverage"].fn(dc=dc)[0] == dc["coverage"]


class _Ext:
    name, provenance = "digits", {"extractor": "digits", "sha256": "0" * 64}


def test_inputs_use_the_reference_features_and_refuse_without_them(tmp_path):
    from eval.fid import check_ref_stats, feature_stats, save_ref_stats

    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(120, 4)), rng.normal(0.3, 1.0, size=(100, 4))
    mu, sigma = feature_stats(real)
    inputs = MetricInputs(np.zeros((100, 8, 8, 1), np.uint8), None, extractor=_Ext(), ref_stats_path="ref.npz",
                          feats=fake)
    inputs._cache["ref"] = {"mu": mu, "sigma": sigma, "features": real, "provenance": {"extractor": "digits"}}
    value, prov = compute(METRICS["density_digits"], inputs)
    assert value == density_coverage(real, fake, k=5)["density"] and prov["k"] == 5 and prov["ref_stats"] == "ref.npz"
    assert compute(METRICS["kid_digits"], inputs)[0] == kid(fake, real)["mean"]
    assert compute(METRICS["precision_digits"], inputs)[1]["k"] == 3  # precision/recall stay at k = 3

    no_feats = MetricInputs(np.zeros((100, 8, 8, 1), np.uint8), None, extractor=_Ext(), ref_stats_path="ref.npz",
                            feats=fake)
    no_feats._cache["ref"] = {"mu": mu, "sigma": sigma, "features": None, "provenance": {"extractor": "digits"}}
    assert compute(METRICS["fid_digits"], no_feats)[0] > 0
    for name in ("kid_digits", "coverage_digits"):
        with pytest.raises(UserError, match="reference features"):
            compute(METRICS[name], no_feats)

    path = tmp_path / "ref.npz"
    save_ref_stats(path, mu, sigma, {"extractor": "digits"})  # mu/sigma only
    check_ref_stats(path, ["fid_digits", "max_ssim"])
    for name in ("kid_digits", "density_digits", "coverage", "precision_clean"):
        with pytest.raises(BadFile, match=f"{name} need the reference features"):
            check_ref_stats(path, ["fid_digits", name])


def test_config_lists_the_new_digits_metrics():
    import yaml

    from tests.helpers import ROOT

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["benchmarks"]
    for bench, names in (("digits", ["kid_digits", "density_digits", "coverage_digits"]),
                         ("digits_text", ["kid_digits"])):
        e = cfg[bench]["eval"]
        assert e["feature_extractor"] == "digits" and set(names) <= set(e["metrics"])
        assert check_metric_names(e["metrics"], e["feature_extractor"]) == []
