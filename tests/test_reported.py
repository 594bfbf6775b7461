"""`method: reported` rows: the paper's numbers of a method the suite does not retrain (Table 1's
iCT-deep, EMD, CTM on imagenet64). Never trained, sampled or scored; `tfd table` shows the row with
its `paper_*` numbers and empty measured columns; training keys on such a row are config errors."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tfd.config import REPORTED_STATUS, Config, ConfigError, from_dict, load_config, read_yaml
from tfd.tables import read_csv, write_manifest, write_table

from tests.helpers import ROOT

REPORTED = {"method": "reported", "label": "EMD (paper's number, not retrained)", "nfe": 1, "paper": {"fid": 2.2}}


def _cfg(runs=None, **bench):
    over = {"text_benchmark": None, "benchmarks": {"digits": {"runs": runs or {}, **bench}}}
    return load_config(ROOT / "config.yaml", over)


def _metric(d, metric, value, n):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{metric}.json").write_text(json.dumps({"metric": metric, "value": value, "n": n}))


def test_reported_row_in_table_with_paper_number_and_no_measured_values(tmp_path):
    cfg = _cfg({"paper_emd": REPORTED}, table1=["teacher_ode", "paper_emd"], compare_to=None, ablations={})
    b = cfg.bench()
    run = b.runs["paper_emd"]
    assert run.reported and not run.trains
    for m in b.eval.metrics:  # the scored row's files only: the reported row has none
        _metric(tmp_path / "digits" / "heun" / "teacher_ode" / "metrics", m, 5.0 if m == "fid_digits" else 0.5,
                b.eval.num_samples)
    df = write_table(cfg, tmp_path, tmp_path / "table1.csv")
    assert not (tmp_path / "digits" / "reported").exists()
    csv = read_csv(tmp_path / "table1.csv").set_index("run")
    for t in (df.set_index("run"), csv):
        row = t.loc["paper_emd"]
        assert row["paper_fid"] == pytest.approx(2.2) and row["status"] == REPORTED_STATUS
        assert row["method"] == REPORTED["label"] and row["nfe"] == 1
        assert all(pd.isna(row[m]) for m in b.eval.metrics), row
        assert t.loc["teacher_ode", "fid_digits"] == pytest.approx(5.0) and pd.isna(t.loc["teacher_ode", "status"])
    assert REPORTED_STATUS in (tmp_path / "table1.md").read_text()
    man = write_manifest(cfg, tmp_path, ["teacher_ode", "paper_emd"], tmp_path / "m.json", table="t")
    assert man["runs"]["paper_emd"]["status"] == REPORTED_STATUS and "files" not in man["runs"]["paper_emd"]


@pytest.mark.parametrize("key,value", [("train", {"steps": 10}), ("seeds", [0, 1]), ("params", {"batch_per_rank": 2}),
                                       ("sampler", {"steps": 18}), ("addons", {"el_style": {}})])
def test_reported_row_with_training_keys_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"runs\.paper_emd\.{key}: a 'reported' row"):
        _cfg({"paper_emd": {**REPORTED, key: value}})


def test_reported_row_needs_paper_numbers():
    with pytest.raises(ConfigError, match=r"runs\.paper_emd\.paper: a 'reported' row needs"):
        _cfg({"paper_emd": {k: v for k, v in REPORTED.items() if k != "paper"}})


def test_imagenet64_table1_is_the_papers():
    """Every row of the paper's Table 1 is in imagenet64's table1: retrained rows with their training
    blocks, the paper-only rows as `reported` with the paper's one-step FID."""
    cfg = from_dict(Config, read_yaml(ROOT / "config.yaml"), "config")  # typed; imagenet64's paths are unfilled
    b = cfg.bench("imagenet64")
    assert b.table1 == ["teacher_ode", "teacher_sde", "tfd", "tfd_el", "dmd2", "dmd2_nogan", "dmd", "dmd2_4step",
                        "dpdmd", "cd_l2", "paper_ict_deep", "paper_emd", "paper_ctm"]
    reported = {r: b.runs[r].paper["fid"] for r in b.table1 if b.runs[r].reported}
    assert reported == {"paper_ict_deep": 3.25, "paper_emd": 2.20, "paper_ctm": 1.92}
    assert all("paper's number" in b.runs[r].label for r in reported)
    assert {r: b.runs[r].paper.get("fid") for r in ("tfd", "dmd2", "dmd2_nogan", "dmd", "cd_l2")} == \
        {"tfd": 1.58, "dmd2": 1.51, "dmd2_nogan": 2.61, "dmd": 2.62, "cd_l2": 6.20}
    d = b.runs["dmd2"]
    assert (d.train.lr, d.train.betas, d.train.weight_decay, d.train.warmup_steps, d.train.grad_clip,
            d.train.precision, d.train.ema_halflife_steps, d.train.steps) == \
        (2e-6, [0.9, 0.999], 0.01, 500, 10.0, "bf16", 0.0, 200000)
    assert d.params.gan and not b.runs["dmd2_nogan"].params.gan and d.params.batch_per_rank == 40
    c = b.runs["cd_l2"]
    assert (c.train.lr, c.train.steps, c.params.metric, c.params.target_ema, c.params.batch_per_rank) == \
        (8e-6, 600000, "l2", 0.95, 256) and "L2" in c.label
    el = b.runs["tfd_el"]
    assert el.addons.el_style is not None and "EL-style" in el.label and "not public" in el.label
    assert el.params == b.runs["tfd"].params and el.train == b.runs["tfd"].train


def test_a_reported_row_has_no_sampler(tmp_path):
    from eval.errors import UserError
    from tfd.runs import build_sampler
    b = _cfg({"paper_emd": REPORTED}).bench()
    with pytest.raises(UserError, match="'reported' row"):
        build_sampler(b, "paper_emd", tmp_path / "teacher.safetensors", None)
