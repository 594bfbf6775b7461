"""The cases of `../shared/cases/` (inputs that made the product fail), each with its right behaviour.

Inputs are copied under `tests/cases/` (the config ported to today's keys: `eval.feature_extractor`,
`params.groups_per_rank`). Every command runs through the CLI's own entry point (`tfd.cli.main`), so
what is asserted is what a user sees: exit status, the one-line `tfd <cmd>: error: ...` and the
files left behind. Case 4 (a resumed run repeats records) is
`tests/test_trainer_faults.py::test_resume_logs_each_step_once`; case 5's bit-exact resume from the
previous checkpoint is `test_damaged_checkpoint_set_aside_previous_resumed` there.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT

CASES = Path(__file__).parent / "cases"


def tfd(*argv: str) -> tuple[int, str]:
    """Run `tfd argv` in-process: (exit status, the error line or '')."""
    from tfd.cli import main
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            return 1, e.code
        return int(e.code or 0), ""
    return 0, ""


def one_line_error(cmd: str, out: tuple[int, str], *needles: str) -> str:
    """Assert `out` is a one-line `tfd <cmd>: error:` naming every needle; return the message."""
    status, msg = out
    assert status == 1 and msg.startswith(f"tfd {cmd}: error: ") and "\n" not in msg, out
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The shared setup of the score cases: the digits feature network and reference statistics,
    a tiny teacher and a 10-step TFD run of `cfg_tiny_tfd.yaml`."""
    d = tmp_path_factory.mktemp("cases")
    cfg = d / "cfg.yaml"
    shutil.copy(CASES / "cfg_tiny_tfd.yaml", cfg)
    os.chmod(cfg, 0o644)
    assert tfd("train-feature-net", "--out", d / "fn.safetensors")[0] == 0
    assert tfd("ref-stats", "--config", cfg, "--no-progress", "--feature-weights", d / "fn.safetensors",
               "--out", d / "ref.npz")[0] == 0
    assert tfd("train-teacher", "--config", cfg, "--no-progress", "--out", d / "teacher.safetensors")[0] == 0
    assert tfd("distill", "--config", cfg, "--no-progress", "--run", "tfd", "--teacher", d / "teacher.safetensors",
               "--out-dir", d / "run", "--steps", "10")[0] == 0
    return d


def score(setup, samples, out_dir, *extra):
    d = setup
    return tfd("score", "--config", d / "cfg.yaml", "--no-progress", "--ref-stats", d / "ref.npz",
               "--feature-weights", d / "fn.safetensors", "--samples", samples, "--out-dir", out_dir, *extra)


# ---------------------------------------------------------------------------------------------- 1


@pytest.mark.parametrize("metrics", [[], ["--metrics", "max_ssim"]])
def test_case1_nchw_samples_named_with_their_shape(setup, tmp_path, metrics):
    msg = one_line_error("score", score(setup, CASES / "nchw.npz", tmp_path / "m", "--num", "200", *metrics),
                         "nchw.npz", "arr_0", "(200, 1, 8, 8)", "NHWC", "NCHW")
    assert "pytorch_msssim" not in msg and not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())
    assert score(setup, CASES / "labels_flat.npz", tmp_path / "ok", "--num", "200", *metrics)[0] == 0  # same data


# ---------------------------------------------------------------------------------------------- 2


@pytest.mark.parametrize("ref,key", [("ref_inf_mu.npz", "mu"), ("ref_nan_sigma.npz", "sigma")])
def test_case2_non_finite_reference_statistics_refused_when_loaded(setup, tmp_path, ref, key):
    d = setup
    out = tfd("score", "--config", d / "cfg.yaml", "--no-progress", "--ref-stats", CASES / ref, "--feature-weights",
              d / "fn.safetensors", "--samples", CASES / "labels_flat.npz", "--num", "200", "--metrics", "fid_digits",
              "--out-dir", tmp_path / "m")
    one_line_error("score", out, ref, f"{key}: non-finite")
    assert not list((tmp_path / "m").glob("*.json"))


# ---------------------------------------------------------------------------------------------- 3


def test_case3_reference_without_features_for_precision_recall(setup, tmp_path, run_snakemake):
    cfg = yaml.safe_load((CASES / "cfg_tiny_tfd.yaml").read_text())
    cfg["benchmarks"]["digits"]["eval"]["ref_stats"] = str(CASES / "ref_mu_sigma_only.npz")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    msg = one_line_error("check-config", tfd("check-config", "--config", tmp_path / "config.yaml"),
                         "eval.ref_stats", "eval.metrics", "ref_mu_sigma_only.npz", "precision_digits")
    # Snakemake's parse-time check runs the same code and says the same
    r = run_snakemake(tmp_path, "-n", "--configfile", tmp_path / "config.yaml")
    assert r.returncode != 0 and "eval.ref_stats and benchmarks.digits.eval.metrics" in r.stdout + r.stderr
    assert msg.split("error: ", 1)[1].split(";")[0] in r.stdout + r.stderr
    # score refuses before computing anything, and writes nothing (not even FID)
    out = tfd("score", "--config", tmp_path / "config.yaml", "--no-progress", "--ref-stats",
              CASES / "ref_mu_sigma_only.npz", "--feature-weights", setup / "fn.safetensors", "--samples",
              CASES / "labels_flat.npz", "--num", "200", "--out-dir", tmp_path / "m")
    one_line_error("score", out, "ref_mu_sigma_only.npz", "features")
    assert not list((tmp_path / "m").glob("*.json"))


# ---------------------------------------------------------------------------------------------- 5


def test_case5_truncated_checkpoint_set_aside_and_run_completes(setup, tmp_path, capfd):
    d = setup
    run = tmp_path / "run"
    shutil.copytree(d / "run", run)
    ckpt = run / "ckpt" / "training-state.pt"
    os.truncate(ckpt, 200_000)
    out = tfd("distill", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
              d / "teacher.safetensors", "--out-dir", run, "--steps", "20")
    assert out == (0, "")
    err = capfd.readouterr().err
    assert "training-state.pt" in err and ".corrupt" in err
    assert (run / "ckpt" / "training-state.pt.corrupt").is_file()
    assert json.loads((run / "train.json").read_text())["iters"] == 20


# ---------------------------------------------------------------------------------------------- 6


def test_case6_truncated_or_foreign_weights(setup, tmp_path):
    d = setup
    gen = d / "run" / "generator.safetensors"
    half = tmp_path / "half.safetensors"
    half.write_bytes(gen.read_bytes()[:100_000])
    sample = ("sample", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
              d / "teacher.safetensors", "--out", tmp_path / "s.npz")
    one_line_error("sample", tfd(*sample, "--generator", half), "half.safetensors")
    # a generator of another architecture: 3 channels on the 1-channel benchmark
    from tfd.networks.convert import save_edm_safetensors
    from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
    rgb = tmp_path / "rgb.safetensors"
    save_edm_safetensors(EDMPrecond(**digits_unet_kwargs(model_channels=16, img_channels=3)), rgb)
    one_line_error("sample", tfd(*sample, "--generator", rgb), "rgb.safetensors", "expected", "1x8x8", "3x8x8")
    assert not (tmp_path / "s.npz").exists()
    for name, data in (("page.pkl", b"<html><body>Not Found</body></html>"), ("empty.pkl", b"")):
        (tmp_path / name).write_bytes(data)
        one_line_error("convert-edm", tfd("convert-edm", tmp_path / name, tmp_path / "o.safetensors"), name)
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------------------------- 7


def test_case7_missing_paths_and_yaml_errors(tmp_path, run_snakemake):
    msg = one_line_error("check-config", tfd("check-config", "--config", ROOT / "config.yaml", "--bench", "imagenet64"),
                         "benchmarks.imagenet64.teacher.checkpoint", "benchmarks.imagenet64.data.path")
    assert "config OK" not in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: digits\nbenchmarks:\n  digits:\n    eval:\n   num_samples: 3\n")
    one_line_error("check-config", tfd("check-config", "--config", bad), "bad.yaml, line 5", "YAML syntax error")
    shutil.copy(bad, tmp_path / "config.yaml")  # the workflow's own config.yaml: Snakemake names the line too
    r = run_snakemake(tmp_path, "-n")
    assert r.returncode != 0 and "config.yaml, line 5, column 4: YAML syntax error" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- 8


def test_case8_broken_result_files(setup, tmp_path):
    d = setup
    assert tfd("sample", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
               d / "teacher.safetensors", "--generator", d / "run" / "generator.safetensors",
               "--out", tmp_path / "s.npz")[0] == 0
    cut = tmp_path / "cut.npz"
    cut.write_bytes((tmp_path / "s.npz").read_bytes()[:1500])
    one_line_error("score", score(d, cut, tmp_path / "m"), "cut.npz", "not a readable npz")
    # a table from a truncated, a missing and a complete metric file
    res = tmp_path / "results"
    assert score(d, tmp_path / "s.npz", res / "digits" / "tfd" / "tfd" / "metrics")[0] == 0
    table = ("table", "--config", d / "cfg.yaml", "--no-progress", "--results-dir", res, "--out", tmp_path / "t.csv")
    one_line_error("table", tfd(*table), "onestep_init", "metric file not found")  # the row not scored yet
    init = res / "digits" / "onestep" / "onestep_init" / "metrics"
    shutil.copytree(res / "digits" / "tfd" / "tfd" / "metrics", init)
    f = init / "fid_digits.json"
    f.write_text(f.read_text()[:40])
    one_line_error("table", tfd(*table), "fid_digits.json", "not a readable metric JSON")
    rec = json.loads((res / "digits" / "tfd" / "tfd" / "metrics" / "fid_digits.json").read_text())
    rec["value"] = rec["value"] + 1  # an edited number: the record's own checksum sees it
    f.write_text(json.dumps(rec))
    one_line_error("table", tfd(*table), "fid_digits.json", "checksum mismatch")
    assert not (tmp_path / "t.csv").exists()


# ---------------------------------------------------------------------------------------------- 9


def _distill(d, out_dir, *extra, cfg=None):
    return tfd("distill", "--config", cfg or d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
               d / "teacher.safetensors", "--out-dir", out_dir, *extra)


def test_case9_nan_loss_is_one_line_keeping_the_checkpoint(setup, tmp_path):
    cfg = yaml.safe_load((CASES / "cfg_tiny_tfd.yaml").read_text())
    cfg["benchmarks"]["digits"]["runs"]["tfd"]["train"]["lr"] = 1.0e10
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    msg = one_line_error("distill", _distill(setup, tmp_path / "run", cfg=tmp_path / "c.yaml"), "non-finite loss")
    assert "lower the learning rate" in msg


def test_case9_second_distill_on_the_same_folder_refused(setup, tmp_path):
    from filelock import FileLock
    run = tmp_path / "run"
    run.mkdir()
    holder = {"host": "nodeA", "pid": 4242, "started": "2026-11-29T20:00:00"}
    (run / "train.lock.holder").write_text(json.dumps(holder))
    with FileLock(str(run / "train.lock")):  # another job holds the folder
        msg = one_line_error("distill", _distill(setup, run), str(run))
    assert "4242" in msg or "nodeA" in msg
    assert not (run / "generator.safetensors").exists()


def test_case9_unwritable_output_folder_refused_before_work(setup, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    one_line_error("distill", _distill(setup, blocker / "run"), "file/run", "not writable")
    d = setup
    out = tfd("score", "--config", d / "cfg.yaml", "--no-progress", "--ref-stats", d / "ref.npz", "--feature-weights",
              d / "fn.safetensors", "--samples", CASES / "labels_flat.npz", "--num", "200", "--out-dir", blocker / "m")
    one_line_error("score", out, "file/m", "not writable")


def test_case9_disk_full_while_checkpointing(setup, tmp_path):
    """`ulimit -f` while the checkpoint is written: one line, no temporary file, exit 1."""
    d = setup
    limit = 2_000_000  # bytes: the generator fits, the checkpoint (weights + Adam + EMA) does not

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "tfd.cli", "distill", "--config", str(d / "cfg.yaml"), "--no-progress",
                        "--run", "tfd", "--teacher", str(d / "teacher.safetensors"), "--out-dir", str(tmp_path / "run"),
                        "--steps", "10"], capture_output=True, text=True, preexec_fn=preexec,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and lines[-1].startswith("tfd distill: error: File too large"), r.stderr[-2000:]
    assert "training-state" in lines[-1] and "Traceback" not in r.stderr
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------- 10


def test_case10_few_samples_warned_in_log_and_metric_file(setup, tmp_path, capfd):
    with np.load(CASES / "labels_flat.npz") as z:
        np.savez(tmp_path / "s20.npz", **{k: z[k][:20] for k in z.files})
    assert score(setup, tmp_path / "s20.npz", tmp_path / "m", "--num", "20", "--metrics", "fid_digits")[0] == 0
    err = capfd.readouterr().err  # the log: one line, no Python source line
    assert "tfd score: warning: 20 samples < 64 feature dimensions" in err and "score_samples(" not in err
    rec = json.loads((tmp_path / "m" / "fid_digits.json").read_text())
    assert "20 samples < 64 feature dimensions" in rec["warning"]


# ---------------------------------------------------------------------------------------------- 11


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_case11_every_output_gets_the_umask_mode(setup, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert _distill(setup, tmp_path / "run", "--steps", "2")[0] == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.stat().st_size]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {"generator.safetensors", "train.json", "stats.jsonl", "training-state.pt"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------------------------------------- the convention


def test_bugs_keep_their_traceback_and_debug_shows_all(monkeypatch, tmp_path):
    """A user error is one line; a bug (any other exception) propagates with its traceback; `--debug`
    lets user errors propagate too."""
    from tfd import cli as tfd_cli
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: [\n")
    assert tfd("check-config", "--config", bad)[0] == 1
    from eval.errors import UserError
    with pytest.raises(UserError, match="bad.yaml, line"):
        tfd("--debug", "check-config", "--config", bad)

    def bug(args):
        raise KeyError("an internal inconsistency")

    parser = tfd_cli.build_parser
    monkeypatch.setattr(tfd_cli, "build_parser", lambda: _with_fn(parser(), "check-config", bug))
    with pytest.raises(KeyError, match="internal inconsistency"):
        tfd("check-config", "--config", ROOT / "config.yaml")


def _with_fn(parser, cmd, fn):
    """`parser` with subcommand `cmd` bound to `fn`."""
    sub = next(a for a in parser._actions if a.dest == "cmd")
    sub.choices[cmd].set_defaults(fn=fn)
    return parser


# ---------------------------------------------------------------------------------------------- a new user's findings


def test_a_checkpoint_of_another_teacher_is_not_resumed(setup, tmp_path, capfd):
    """Retraining the teacher (a config edit) reruns distill: its checkpoint was made with the old
    teacher, so it is set aside (`.stale`) and the run starts again, not resumed into the old generator."""
    import torch

    from tfd.networks.convert import load_edm_safetensors, save_edm_safetensors
    d = setup
    run = tmp_path / "run"
    shutil.copytree(d / "run", run)
    old_gen = (run / "generator.safetensors").read_bytes()
    net = load_edm_safetensors(d / "teacher.safetensors")
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_edm_safetensors(net, tmp_path / "teacher2.safetensors")
    assert _distill(d, run, "--steps", "10", cfg=d / "cfg.yaml")[0] == 0  # same teacher: resumed, nothing to do
    assert (run / "generator.safetensors").read_bytes() == old_gen
    out = tfd("distill", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
              tmp_path / "teacher2.safetensors", "--out-dir", run, "--steps", "10")
    assert out == (0, "")
    assert "other input files (teacher)" in capfd.readouterr().err
    assert list((run / "ckpt").glob("*.stale")) and (run / "generator.safetensors").read_bytes() != old_gen


def test_table_refuses_metric_files_of_another_run_or_reference(setup, tmp_path):
    from eval.io import seal_record
    d = setup
    res = tmp_path / "results"
    runs = {"tfd": res / "digits" / "tfd" / "tfd", "onestep_init": res / "digits" / "onestep" / "onestep_init"}
    for name, rd in runs.items():
        gen = ["--generator", d / "run" / "generator.safetensors"] if name == "tfd" else []
        assert tfd("sample", "--config", d / "cfg.yaml", "--no-progress", "--run", name, "--teacher",
                   d / "teacher.safetensors", *gen, "--out", rd / "samples.npz")[0] == 0
        assert score(d, rd / "samples.npz", rd / "metrics")[0] == 0
    table = ("table", "--config", d / "cfg.yaml", "--no-progress", "--results-dir", res, "--out", tmp_path / "t.csv")
    assert tfd(*table)[0] == 0
    saved = {f.name: f.read_text() for f in (runs["tfd"] / "metrics").iterdir()}
    for f in (runs["onestep_init"] / "metrics").iterdir():  # another run's metric files copied over
        shutil.copy(f, runs["tfd"] / "metrics" / f.name)
    one_line_error("table", tfd(*table), "computed on other samples than its run's", "tfd/tfd/samples.npz")
    for name, text in saved.items():
        (runs["tfd"] / "metrics" / name).write_text(text)
    f = runs["tfd"] / "metrics" / "fid_digits.json"  # as if scored against another reference
    rec = json.loads(f.read_text())
    rec["provenance"]["ref_stats_sha256"] = "0" * 64
    f.write_text(json.dumps(seal_record(rec)))
    one_line_error("table", tfd(*table), "scored against other reference statistics", "fid_digits.json")


def test_samples_of_two_runs_or_off_protocol_labels_refused(setup, tmp_path):
    d = setup
    common = ("--config", d / "cfg.yaml", "--no-progress", "--teacher", d / "teacher.safetensors")
    assert tfd("sample", *common, "--run", "tfd", "--generator", d / "run" / "generator.safetensors",
               "--shard", "0/2", "--out", tmp_path / "a0.npz")[0] == 0
    assert tfd("sample", *common, "--run", "onestep_init", "--shard", "1/2", "--out", tmp_path / "b1.npz")[0] == 0
    one_line_error("merge-samples", tfd("merge-samples", "--config", d / "cfg.yaml", "--out", tmp_path / "m.npz",
                                        tmp_path / "a0.npz", tmp_path / "b1.npz"), "different runs or weights")
    assert not (tmp_path / "m.npz").exists()
    assert tfd("sample", *common, "--run", "onestep_init", "--out", tmp_path / "s.npz")[0] == 0
    with np.load(tmp_path / "s.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["arr_1"] = (arrays["arr_1"] + 1) % 10  # labels shifted: not the protocol's i % C
    np.savez(tmp_path / "shifted.npz", **arrays)
    one_line_error("score", score(d, tmp_path / "shifted.npz", tmp_path / "m"), "shifted.npz", "arr_1",
                   "not the protocol's")


def test_bad_output_and_config_paths_are_named_before_work(setup, tmp_path):
    (tmp_path / "folder").mkdir()
    one_line_error("train-teacher", tfd("train-teacher", "--config", setup / "cfg.yaml", "--no-progress", "--out",
                                        tmp_path / "folder"), "--out names a folder")
    one_line_error("check-config", tfd("check-config", "--config", tmp_path / "folder"), "is a folder")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    one_line_error("check-config", tfd("check-config", "--config", tmp_path / "empty.yaml"), "empty.yaml",
                   "the file is empty")


def test_ctrl_c_is_one_line_with_status_130(monkeypatch, capsys):
    from tfd import cli as tfd_cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = tfd_cli.build_parser
    monkeypatch.setattr(tfd_cli, "build_parser", lambda: _with_fn(parser(), "check-config", interrupted))
    assert tfd("check-config", "--config", ROOT / "config.yaml") == (130, "")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tfd check-config: interrupted")
