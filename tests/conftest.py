import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch/BLAS thread per process: the networks in the tests are tiny, and two threads per process
# on a busy 2-core machine oversubscribe it badly (seen: 16 s -> 530 s). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import helpers  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def root():
    """The repository root (this checkout)."""
    return helpers.ROOT


@pytest.fixture
def tiny_config() -> dict:
    """The tiny DAG's config: config.yaml with .test/config.yaml merged over it, as
    `snakemake --configfile .test/config.yaml` merges them. A fresh dict for each test to edit."""
    return helpers.tiny_config()


@pytest.fixture(scope="session")
def run_snakemake():
    """`run_snakemake(workdir, *args)`: this checkout's Snakefile on 2 cores in `workdir`
    (which holds the config.yaml to use) -> subprocess.CompletedProcess."""
    return helpers.run_snakemake


@pytest.fixture(scope="session")
def crash_and_resume():
    """`crash_and_resume(make_method, train_cfg, tmp_path) -> (ref, resumed)`: an uninterrupted run and
    one killed after its step-3 checkpoint, then resumed (tests/helpers.py)."""
    return helpers.crash_and_resume
