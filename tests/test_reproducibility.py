"""What reproduces (README, "What reproduces"; issue 17 item 4): on one machine with the same thread
count, two runs of the tiny config (`tests/cases/cfg_tiny_tfd.yaml`) give byte-identical teacher
weights, generator weights and samples; and every record that says what made a number (the
teacher's and the run's training records, metric records, the table manifest) carries the compute
environment that decides those bits (`eval.io.compute_environment`: CPU capability, thread counts,
determinism flags, GPUs).

The runs are in-process (`tfd.cli.main`), with the one torch thread `conftest.py` sets."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from eval.io import compute_environment, provenance

from tests.helpers import ROOT

CASES = Path(__file__).parent / "cases"
COMPUTE_KEYS = {"torch_build", "cpu_capability", "cpu_model", "threads", "interop_threads", "env",
                "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark", "gpus", "cuda", "cudnn"}


def tfd(*argv) -> None:
    """`tfd ARGV` in-process; fails the test on any error."""
    from tfd.cli import main
    main([str(a) for a in argv])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_compute(c: dict) -> None:
    """`c` is this process's compute environment, as `compute_environment` records it."""
    assert set(c) == COMPUTE_KEYS, sorted(c)
    assert c["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert c["threads"] == torch.get_num_threads() == 1 and c["interop_threads"] == torch.get_num_interop_threads()
    assert c["env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")
    assert c["env"]["MKL_NUM_THREADS"] == os.environ.get("MKL_NUM_THREADS")
    assert c["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert c["cudnn_deterministic"] == torch.backends.cudnn.deterministic
    assert c["cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert c["torch_build"] == torch.__version__ and c["cpu_model"]
    if torch.cuda.is_available():
        assert c["gpus"] and c["cuda"] == torch.version.cuda and c["cudnn"] == torch.backends.cudnn.version()
    else:
        assert c["gpus"] is None and c["cuda"] is None and c["cudnn"] is None


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The tiny config run twice, each in its own results folder: teacher (20 steps), TFD run
    (20 iterations), its 20 samples and their max_ssim. Returns (config path, [results dir a, b])."""
    from eval.score import score_samples

    d = tmp_path_factory.mktemp("repro")
    cfg = d / "cfg.yaml"
    shutil.copy(CASES / "cfg_tiny_tfd.yaml", cfg)
    out = []
    for name in ("a", "b"):
        r = d / name / "digits"
        teacher, run = r / "teacher" / "teacher.safetensors", r / "tfd" / "tfd"
        tfd("train-teacher", "--config", cfg, "--no-progress", "--out", teacher)
        tfd("distill", "--config", cfg, "--no-progress", "--run", "tfd", "--teacher", teacher, "--out-dir", run,
            "--steps", "20")
        tfd("sample", "--config", cfg, "--no-progress", "--run", "tfd", "--teacher", teacher,
            "--generator", run / "generator.safetensors", "--out", run / "samples.npz")
        score_samples(run / "samples.npz", run / "metrics", ["max_ssim"], extractor=None, ref_stats_path=None)
        out.append(d / name)
    return cfg, out


def test_same_machine_same_threads_is_byte_identical(two_runs):
    _, (a, b) = two_runs
    for f in ("teacher/teacher.safetensors", "tfd/tfd/generator.safetensors", "tfd/tfd/samples.npz"):
        assert sha256(a / "digits" / f) == sha256(b / "digits" / f), f
    ma, mb = (json.loads((r / "digits/tfd/tfd/metrics/max_ssim.json").read_text()) for r in (a, b))
    assert ma["value"] == mb["value"]
    ta, tb = (json.loads((r / "digits/tfd/tfd/train.json").read_text()) for r in (a, b))
    assert ta["versions"]["compute"] == tb["versions"]["compute"]  # what decided the bits: the same


def test_records_carry_the_compute_environment(two_runs):
    _, (a, _) = two_runs
    check_compute(compute_environment())
    check_compute(provenance()["versions"]["compute"])
    check_compute(json.loads((a / "digits/teacher/teacher.json").read_text())["versions"]["compute"])
    check_compute(json.loads((a / "digits/tfd/tfd/train.json").read_text())["versions"]["compute"])
    metric = json.loads((a / "digits/tfd/tfd/metrics/max_ssim.json").read_text())
    check_compute(metric["provenance"]["versions"]["compute"])


def test_compute_environment_follows_the_thread_count():
    """Threads are read each time (a process may change them); the fixed part is cached."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert compute_environment()["threads"] == 2
    finally:
        torch.set_num_threads(n)
    assert compute_environment()["threads"] == n


def test_manifest_records_the_compute_environment_per_job(two_runs, tmp_path):
    from tfd.config import load_config
    from tfd.tables import write_manifest

    cfg_path, (a, _) = two_runs
    cfg = load_config(cfg_path)
    teacher = a / "digits/teacher/teacher.safetensors"
    m = write_manifest(cfg, a, ["tfd", "onestep_init"], tmp_path / "t.manifest.json", table="t.csv",
                       config_file=cfg_path, extra_files={"teacher": teacher})
    assert json.loads((tmp_path / "t.manifest.json").read_text())["runs"]["tfd"]["made_by"]["train"]["compute"]
    made = m["runs"]["tfd"]["made_by"]
    for job in ("train", "metrics"):
        check_compute(made[job]["compute"])
        assert "compute" not in made[job]["versions"] and made[job]["versions"]["torch"]
    assert made["sample"] is None  # tfd sample writes no provenance into the npz
    check_compute(m["inputs"]["teacher"]["made_by"]["compute"])
    assert m["inputs"]["teacher"]["sha256"] == sha256(teacher)
    assert m["runs"]["onestep_init"]["made_by"] == {"sample": None}  # nothing sampled or scored there
    check_compute(m["written_by"]["versions"]["compute"])


@pytest.mark.parametrize("preset,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_when_idle_unless_the_user_chose(preset, want):
    """`import tfd` before torch sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep rather than
    spin against other processes) unless the variable is already set; the DAG sets it too."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = "import tfd, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
    assert 'os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")' in (ROOT / "Snakefile").read_text()
