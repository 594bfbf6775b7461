"""The text-to-image side of the config and tables: Table 2's benchmark beside Table 1's, the checks
that list every missing site path at once, NFE of guided rows, and published rows without weights."""
import json

import pandas as pd
import pytest

from tfd.config import ConfigError, check, input_paths, load_config
from tfd.runs import run_nfe
from tfd.tables import write_table

from tests.helpers import ROOT

COCO_KEYS = ["teacher.checkpoint", "data.captions_json", "data.images_dir", "eval.feature_extractor_weights_path",
             "eval.clip_checkpoint", "positives.prompts_file"]


def test_default_config_has_both_tables():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.active == ["digits", "digits_text", "shapes"]  # Table 1, Table 2, the known-modes table
    t = cfg.bench("digits_text")
    assert t.task == "text" and t.table2 and all(r in t.runs for r in t.table2)
    assert t.eval.num_samples % t.prompts.num_prompts == 0  # each prompt the same number of times (max_ssim)


def test_coco2014_lists_every_missing_path_in_one_message():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "config.yaml", {"text_benchmark": "coco2014"})
    msg = str(e.value)
    for key in COCO_KEYS:
        assert msg.count(f"benchmarks.coco2014.{key}:") == 1, (key, msg)
    assert "problems" in msg.splitlines()[0]


def test_given_but_missing_files_are_named(tmp_path):
    site = {k: str(tmp_path / "nowhere" / k) for k in COCO_KEYS}
    over = {"text_benchmark": "coco2014", "benchmarks": {"coco2014": {
        "teacher": {"checkpoint": site["teacher.checkpoint"]},
        "data": {"captions_json": site["data.captions_json"], "images_dir": site["data.images_dir"]},
        "eval": {"feature_extractor_weights_path": site["eval.feature_extractor_weights_path"],
                 "clip_checkpoint": site["eval.clip_checkpoint"]},
        "positives": {"prompts_file": site["positives.prompts_file"]},
        "runs": {"dmd2_sdxl": {"sampler": {"unet": str(tmp_path / "dmd2.bin")}}}}}}
    cfg = load_config(ROOT / "config.yaml", over)  # paths set: the typed check passes ...
    assert input_paths(cfg)["benchmarks.coco2014.runs.dmd2_sdxl.sampler.unet"] == str(tmp_path / "dmd2.bin")
    with pytest.raises(ConfigError) as e:  # ... and the file check names each missing one
        check(cfg, files=True)
    for key in COCO_KEYS + ["runs.dmd2_sdxl.sampler.unet"]:
        assert f"benchmarks.coco2014.{key}: no such file or folder" in str(e.value), key


@pytest.mark.parametrize("over, expected", [
    ({"text_benchmark": "digits"}, "text_benchmark: 'digits' is not a text benchmark"),
    ({"text_benchmark": "nope"}, "text_benchmark: 'nope' is not defined"),
    ({"benchmarks": {"digits_text": {"data": {"kind": "coco"}}}}, "'train_t2i' trains the embedded teacher"),
    ({"benchmarks": {"digits": {"runs": {"p": {"method": "pipeline"}}}}}, "'pipeline' rows need a text benchmark"),
    ({"benchmarks": {"digits": {"table2": ["tfd"]}}}, "only a text benchmark"),
    ({"benchmarks": {"digits_text": {"data": {"kind": "digits"}}}}, "is not a text benchmark's data"),
    ({"benchmarks": {"digits_text": {"runs": {"teacher_g6": {"sampler": {"stepz": 3}}}}}}, "unknown key 'stepz'"),
])
def test_text_config_errors(over, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(ROOT / "config.yaml", over)


def test_cli_bench_selects_one_benchmark(capsys):
    from tfd.cli import main
    main(["check-config", "--config", str(ROOT / "config.yaml"), "--bench", "digits_text"])
    out = capsys.readouterr().out
    assert "benchmark 'digits_text' (text)" in out and "'digits'" not in out
    with pytest.raises(SystemExit) as e:  # a text-only command on the class benchmark: one line
        main(["prompts", "--config", str(ROOT / "config.yaml"), "--bench", "digits", "--out", "p.jsonl"])
    assert "applies to a text-to-image benchmark" in str(e.value)
    with pytest.raises(SystemExit) as e:  # without --bench a text-only command takes the text benchmark
        main(["prompts", "--config", str(ROOT / "config.yaml"), "--out", "p.jsonl"])
    assert "benchmarks.digits_text.data.captions_json" in str(e.value)


def test_nfe_counts_guided_forward_passes():
    cfg = load_config(ROOT / "config.yaml", {"text_benchmark": "coco2014", "benchmarks": {"coco2014": {
        "teacher": {"checkpoint": "x"}, "data": {"captions_json": "x", "images_dir": "x"},
        "eval": {"feature_extractor_weights_path": "x", "clip_checkpoint": "x"}, "positives": {"prompts_file": "x"}}}})
    c = cfg.bench("coco2014")
    assert run_nfe(c, "sdxl_cfg6") == 100  # the paper's "100 FP"
    assert run_nfe(c, "dmd2_sdxl") == 1 and run_nfe(c, "lcm_sdxl") == 1 and run_nfe(c, "sdxl_turbo") == 1
    t = cfg.bench("digits_text")
    assert run_nfe(t, "teacher_g1") == 20 and run_nfe(t, "teacher_g8") == 40 and run_nfe(t, "onestep_init") == 1


def test_table2_keeps_paper_numbers_apart_and_marks_unscored_rows(tmp_path):
    over = {"text_benchmark": None, "benchmark": "coco2014", "benchmarks": {"coco2014": {
        "teacher": {"checkpoint": "x"}, "data": {"captions_json": "x", "images_dir": "x"},
        "eval": {"feature_extractor_weights_path": "x", "clip_checkpoint": "x"}, "positives": {"prompts_file": "x"},
        "runs": {"dmd2_sdxl": {"sampler": {"unet": "dmd2.bin"}}}}}}
    cfg = load_config(ROOT / "config.yaml", over)
    b = cfg.bench()
    n = b.eval.num_samples
    fids = {"sdxl_cfg6": 21.5, "dmd2_sdxl": 20.25}
    for run in [r for r in b.table2 if not b.runs[r].missing_weights]:  # every scored row has its metric files
        fid = fids.get(run, 30.0)
        d = tmp_path / "coco2014" / b.runs[run].method / run / "metrics"
        d.mkdir(parents=True)
        for m, v in (("fid_clean", fid), ("clip_score", 0.3)):
            (d / f"{m}.json").write_text(json.dumps({"metric": m, "value": v, "n": n}))
    df = write_table(cfg, tmp_path, tmp_path / "table2.csv", table="table2").set_index("run")
    assert list(df.index) == b.table2
    assert df.loc["sdxl_cfg6", "fid_clean"] == 21.5 and df.loc["sdxl_cfg6", "paper_fid"] == 19.36
    assert df.loc["dmd2_sdxl", "fid_clean"] == 20.25 and pd.isna(df.loc["dmd2_sdxl", "status"])
    for run in ("lcm_sdxl", "sdxl_turbo", "sdxl_lightning"):  # no weights given: the paper's numbers only
        assert pd.isna(df.loc[run, "fid_clean"]) and df.loc[run, "status"].startswith("not scored")
        assert df.loc[run, "paper_fid"] > 0
    assert df.loc["sdxl_cfg6", "nfe"] == 100
    md = (tmp_path / "table2.md").read_text()
    assert "`paper_*` columns are the TFD paper's reported numbers" in md and "the paper's FP" in md
    with pytest.raises(ValueError, match="has no table2 rows"):
        write_table(load_config(ROOT / "config.yaml"), tmp_path, tmp_path / "t.csv", table="table2")


def test_a_diffusers_teacher_must_be_a_whole_pipeline_folder(tmp_path):
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)  # a folder, but not a pipeline
    for f in ("captions.json", "inception.pt", "clip.bin", "prompts.txt"):
        (tmp_path / f).write_text("x")
    (tmp_path / "val2014").mkdir()
    cfg = load_config(ROOT / "config.yaml", {"text_benchmark": "coco2014", "benchmarks": {"coco2014": {
        "teacher": {"checkpoint": str(tmp_path / "sdxl")},
        "data": {"captions_json": str(tmp_path / "captions.json"), "images_dir": str(tmp_path / "val2014")},
        "eval": {"feature_extractor_weights_path": str(tmp_path / "inception.pt"),
                 "clip_checkpoint": str(tmp_path / "clip.bin")},
        "positives": {"prompts_file": str(tmp_path / "prompts.txt")}}}})
    with pytest.raises(ConfigError, match=r"is not a StableDiffusionXLPipeline folder \(no vae/, text_encoder/"):
        check(cfg, files=True)


def test_clip_errors_say_where_the_weights_come_from(tmp_path):
    from eval.clip_score import ClipScorer
    with pytest.raises(FileNotFoundError, match="made by `tfd train-clip`"):
        ClipScorer({"clip_model": "TinyCLIP-digits"})
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is not an open_clip built-in architecture: set `clip_model_config`"):
        ClipScorer({"clip_model": "TinyCLIP-digits", "clip_checkpoint": str(tmp_path / "w.safetensors")})
    with pytest.raises(FileNotFoundError, match="laion2b_s12b_b42k"):  # the paper's model: where to get it
        ClipScorer({})


def test_positives_settings_are_checked_and_overridable():
    """The positives block: a run's override makes its own settings (and cache key); bad values,
    a half-given paired set, and positives on a class benchmark are errors naming the key."""
    from tfd.positives import positives_key
    def run_positives(**kw):
        return {"benchmarks": {"digits_text": {"runs": {"tfd": {"positives": kw}}}}}
    cfg = load_config(ROOT / "config.yaml", run_positives(n_pos=8))
    t = cfg.bench("digits_text")
    assert t.positives_for("tfd").n_pos == 8 and t.positives_for("dmd2").n_pos == t.positives.n_pos
    assert positives_key(t.positives_for("tfd")) != positives_key(t.positives_for("dmd2"))
    assert positives_key(t.positives) == positives_key(type(t.positives)(**{**t.positives.__dict__, "shards": 7}))
    with pytest.raises(ConfigError, match="paired_fraction must be in"):
        load_config(ROOT / "config.yaml", {"benchmarks": {"digits_text": {"positives": {"paired_fraction": 2.0}}}})
    with pytest.raises(ConfigError, match="paired_captions_json and paired_images_dir go together"):
        load_config(ROOT / "config.yaml", {"benchmarks": {"digits_text": {"positives": {"paired_captions_json": "x"}}}})
    with pytest.raises(ConfigError, match=r"digits\.runs\.tfd\.positives: only a text benchmark"):
        load_config(ROOT / "config.yaml", {"benchmarks": {"digits": {"runs": {"tfd": {"positives": {"n_pos": 2}}}}}})
    with pytest.raises(ConfigError, match="n_pos"):
        load_config(ROOT / "config.yaml", run_positives(n_pos=0))
