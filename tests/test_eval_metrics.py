"""The metric registry (eval.metrics): one list of metrics, pure metric functions, and the
config-time check of metric names (`tfd check-config`, `snakemake -n`)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from eval.metrics import (
    METRICS,
    MetricInputs,
    check_metric_names,
    compute,
    known_metrics,
    metric_names,
    resolve_metric_names,
)

ROOT = Path(__file__).resolve().parents[1]
FEATURE = ("fid", "precision", "recall", "kid", "density", "coverage")  # per extractor: generic, _digits, _clean, ...
EMBEDDING = ("fd_dinov2", "cmmd")  # feature metrics of the dinov2 / cmmd_clip extractors (cluster)
MODES = ("modes_covered", "mode_tv", "rare_recall", "off_mode")  # the shapes benchmark's rule (tests/test_modes.py)
DIVERSITY = ("diversity_digits", "diversity_dinov2", "diversity_clip")  # DP-DMD's, per feature network
DOCUMENTED = [*FEATURE, *(f"{g}_digits" for g in FEATURE), *(f"{g}_clean" for g in FEATURE),
              *(f"{g}_shapes" for g in FEATURE), "max_ssim", "class_acc", "clip_score", *EMBEDDING, *MODES,
              *DIVERSITY]


def test_registry_lists_every_metric_once():
    assert known_metrics() == DOCUMENTED
    for name, spec in METRICS.items():
        assert spec.name == name and callable(spec.fn) and spec.needs
        assert spec.is_feature_metric == (name.split("_")[0] in FEATURE or name in EMBEDDING + DIVERSITY)
    assert metric_names("digits") == {g: f"{g}_digits" for g in FEATURE}
    assert metric_names("shapes") == {g: f"{g}_shapes" for g in FEATURE}
    assert metric_names("inception") == {g: g for g in FEATURE}
    assert metric_names("clean-fid")["fid"] == "fid_clean" and metric_names(None) == {}


def test_check_metric_names():
    digits = ["fid_digits", "precision_digits", "recall_digits", "max_ssim", "class_acc"]
    assert check_metric_names(digits, "digits") == []
    assert check_metric_names(["fid", "precision", "recall", "max_ssim"], "inception") == []
    (p,) = check_metric_names(["fid_digit", "max_ssim"], "digits")
    assert "'fid_digit'" in p and "did you mean 'fid_digits'" in p and ", ".join(DOCUMENTED) in p
    (p,) = check_metric_names(["fid_digits"], "inception")
    assert "fid_digits" in p and "inception" in p
    (p,) = check_metric_names(["fid"], "digits")  # the file would be fid_digits.json
    assert "named 'fid_digits'" in p
    (p,) = check_metric_names(["max_ssim", "class_acc"], "inception")
    assert "class_acc" in p and "digits" in p
    assert check_metric_names(["max_ssim", "max_ssim"], "digits") == ["metric 'max_ssim' is listed twice"]


def test_resolve_maps_generic_names_and_rejects_others():
    assert resolve_metric_names(["fid", "fid_digits", "max_ssim"], "digits") == ["fid_digits", "max_ssim"]
    with pytest.raises(ValueError, match="inapplicable.*fid_clean"):
        resolve_metric_names(["fid_clean"], "digits")
    with pytest.raises(ValueError, match="fid_digit"):
        resolve_metric_names(["fid_digit"], None)


def test_metric_functions_are_pure_and_the_loop_adds_provenance():
    """fid/precision/recall from their inputs alone equal the reference implementations; the loop
    (`compute`) adds the extractor + reference provenance to feature metrics only."""
    from eval.fid import feature_stats, fid_from_features
    from eval.prdc import prdc

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 4)), rng.normal(0.3, 1.0, size=(150, 4))
    mu, sigma = feature_stats(real)
    ref = {"mu": mu, "sigma": sigma, "features": real, "provenance": {"extractor": "x"}}
    v, details = METRICS["fid"].fn(features=fake, ref=ref)
    assert v == pytest.approx(fid_from_features(fake, real), rel=1e-12) and "formula" in details
    pr = prdc(real, fake, k=3)
    assert METRICS["precision_digits"].fn(pr=pr)[0] == pr["precision"]
    assert METRICS["recall_clean"].fn(pr=pr)[0] == pr["recall"]

    class Ext:
        name, provenance = "digits", {"extractor": "digits", "sha256": "0" * 64}

    inputs = MetricInputs(np.zeros((150, 8, 8, 1), np.uint8), None, extractor=Ext(), ref_stats_path="ref.npz",
                          feats=fake)
    inputs._cache["ref"] = ref  # as loaded (and provenance-checked) from ref.npz
    value, prov = compute(METRICS["fid_digits"], inputs)
    assert value == v and prov["ref_stats"] == "ref.npz" and prov["extractor"] == "digits"
    assert prov["ref_provenance"] == {"extractor": "x"} and prov["formula"] == details["formula"]


# ----------------------------------------------------------------------------------------------
# a misspelt metric name fails before any job: `tfd check-config` and `snakemake -n`


def _config(tmp_path, mutate) -> Path:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    mutate(cfg["benchmarks"]["digits"]["eval"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "config.yaml"


def _misspelt(e):
    e["metrics"] = ["fid_digit", "precision_digits", "max_ssim"]


def _old_key(e):
    e["feature_net"] = e.pop("feature_extractor")


CASES = [(_misspelt, ["fid_digit", "did you mean 'fid_digits'", "valid metrics: " + ", ".join(DOCUMENTED)]),
         (_old_key, ["eval.feature_net was renamed to", "eval.feature_extractor"])]


@pytest.mark.parametrize("mutate,expected", CASES, ids=["misspelt_metric", "old_feature_net_key"])
def test_check_config_names_the_bad_key(tmp_path, mutate, expected):
    from tfd.cli import main

    path = _config(tmp_path, mutate)
    with pytest.raises(SystemExit) as e:
        main(["check-config", "--config", str(path)])
    msg = str(e.value.code)
    assert msg.startswith("tfd check-config: error:")
    for text in expected:
        assert text in msg, msg


@pytest.mark.parametrize("mutate,expected", CASES, ids=["misspelt_metric", "old_feature_net_key"])
def test_snakemake_dry_run_names_the_bad_key(tmp_path, mutate, expected, run_snakemake):
    _config(tmp_path, mutate)
    r = run_snakemake(tmp_path, "-n", "results/table1.csv")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for text in expected:
        assert text in out, out[-3000:]
    assert not (tmp_path / "results").exists()
