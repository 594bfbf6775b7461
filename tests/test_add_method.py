"""docs/adding-a-method.md, followed literally: in a copy of the repository, copy the template to
tfd/methods/<name>.py, add its registry line and a runs block, run the DAG, find the new row.

The `tfd` console script is an editable install of THIS checkout (setuptools' finder, appended to
sys.meta_path), so the copy's code is imported only because the copy comes first on PYTHONPATH
(path entries win over that finder) and no process runs in this checkout (`python -m`/`-c` put the
working directory before PYTHONPATH). Checked below before the DAG runs.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT

NAME = "regress"  # the template's registered name
REGISTRY_LINE = f"from tfd.methods import {NAME} as _{NAME}  # noqa: E402,F401\n"


def copy_repo(dst: Path) -> Path:
    """This checkout's files (working-tree contents: tracked, and new ones git does not ignore) under `dst`."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # tracked but deleted in the working tree: skip
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def copy_env(repo: Path) -> dict:
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(repo) + (os.pathsep + pp if pp else ""),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def add_method(repo: Path, cfg: dict, registry_line: bool = True) -> None:
    # (1) copy the template; (2) one registry line; (3) one runs block (+ the row in table1).
    shutil.copy2(ROOT / "docs/method_template.py", repo / f"tfd/methods/{NAME}.py")
    if registry_line:
        with open(repo / "tfd/methods/__init__.py", "a") as f:
            f.write(REGISTRY_LINE)
    d = cfg["benchmarks"]["digits"]
    d["runs"][NAME] = {"method": NAME, "label": "Regression onto the teacher (template)",
                       "train": {"steps": 3, "lr": 1e-4, "warmup_steps": 1, "checkpoint_every": 2,
                                 "log_every": 1, "eval_every": 2},
                       "params": {"batch_per_rank": 6, "teacher_steps": 2}}
    d["table1"] = ["onestep_init", NAME]
    (repo / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_add_method_end_to_end(tmp_path, tiny_config):
    repo = copy_repo(tmp_path / "repo")
    add_method(repo, tiny_config)
    env = copy_env(repo)
    ours = ROOT / "results/digits" / NAME / NAME  # where a run of the new method in this checkout would write
    ours_before = ours.exists()

    # The copy's tfd is the one imported: by python through PYTHONPATH (checked from a neutral
    # working directory: run inside the copy, `python -c` finds it even without PYTHONPATH) and by
    # the `tfd` script the rules call (without PYTHONPATH it imports this checkout, which lacks NAME).
    r = subprocess.run([sys.executable, "-c", "import tfd; print(tfd.__file__)"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()) == repo / "tfd/__init__.py", r.stdout
    r = subprocess.run(["tfd", "check-config"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and NAME in r.stdout, r.stdout + r.stderr

    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(repo),
                        "--cores", "2", "results/table1.csv"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    row = pd.read_csv(repo / "results/table1.csv").set_index("run")
    assert list(row.index) == ["onestep_init", NAME]
    assert math.isfinite(row.loc[NAME, "fid_digits"]) and row.loc[NAME, "fid_digits"] >= 0
    assert row.loc[NAME, "iters"] == 3 and row.loc[NAME, "generator_updates"] == 3
    assert row.loc[NAME, "nfe"] == 1
    run_dir = repo / "results/digits" / NAME / NAME
    conv = (run_dir / "convergence.jsonl").read_text().splitlines()
    assert len(conv) == 3  # steps 0, 2 and 3
    assert (run_dir / "stats.jsonl").read_text().count('"loss"') == 3
    assert ours.exists() == ours_before, f"the test wrote {ours}"


def test_add_method_needs_registry_line(tmp_path, tiny_config):
    """Without step (2) the config names an unknown method and fails before any work."""
    repo = copy_repo(tmp_path / "repo")
    add_method(repo, tiny_config, registry_line=False)
    r = subprocess.run(["tfd", "check-config"], cwd=repo, env=copy_env(repo), capture_output=True, text=True)
    assert r.returncode != 0 and f"unknown method {NAME!r}" in r.stderr, r.stdout + r.stderr
