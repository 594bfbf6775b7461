"""Helpers shared by several test modules (conftest.py turns them into fixtures). Not a test module:
test modules import from here or take the fixtures, never from one another."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / ".test/config.yaml"  # the tiny DAG: an overlay on config.yaml


def tiny_config() -> dict:
    """config.yaml with .test/config.yaml merged over it, key by key, exactly as
    `snakemake --configfile .test/config.yaml` merges them (snakemake.utils.update_config). A fresh dict."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load(TINY_CONFIG.read_text()))
    return cfg


def run_snakemake(workdir, *args, timeout=1200) -> subprocess.CompletedProcess:
    """This checkout's Snakefile in `workdir` (its config.yaml, results/, ...) on 2 cores."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir)]
    return subprocess.run([*cmd, "--cores", "2", *args], capture_output=True, text=True, env=env, timeout=timeout)


def make_method(seed=0):
    """A tiny TFD method on digits (8-channel teacher, 3 condition groups of 2+2 samples)."""
    import torch

    from tfd.data import ClassBalancedSampler, digits_arrays
    from tfd.denoiser import EDMDenoiser
    from tfd.methods.tfd import TFD, TFDParams
    from tfd.networks.edm import EDMPrecond, digits_unet_kwargs

    params = TFDParams(layers=["enc:1", "bottleneck", "dec:5"], pool=2, groups_per_rank=3, n_gen=2, n_pos=2, n_anchor=2)
    torch.manual_seed(123)
    net = EDMPrecond(**digits_unet_kwargs(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    x, y = digits_arrays()
    data = ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed))
    return TFD(EDMDenoiser(net), data, params)


def crash_and_resume(make, cfg, tmp_path):
    """An uninterrupted run, and a run killed after its checkpoint at step 3 then resumed.
    Returns both trainers (`ref`, `resumed`); the resumed run lives in `tmp_path / "b"`."""
    from tfd.trainer import Trainer

    ref = Trainer(make(), cfg, tmp_path / "a", progress=False)
    ref.fit()
    crashed = Trainer(make(), cfg, tmp_path / "b", progress=False)
    orig = crashed.train_one_step

    def boom():
        if crashed.step == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt("killed")
        return orig()

    crashed.train_one_step = boom
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = Trainer(make(), cfg, tmp_path / "b", progress=False)
    resumed.fit()
    return ref, resumed


def assert_same_training_state(ref, resumed, atol: float = 1e-6) -> None:
    """The resumed trainer equals the uninterrupted one (`crash_and_resume`'s pair): same step, every
    trainable network's and the EMA's tensors within `atol` (0: bitwise), named on a mismatch."""
    import torch

    assert resumed.step == ref.step, (resumed.step, ref.step)
    nets = [(f"nets.{n}", net, resumed.nets[n]) for n, net in ref.nets.items()]
    for name, a, b in nets + ([("ema", ref.ema, resumed.ema)] if ref.ema is not None else []):
        other = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.allclose(v, other[k], atol=atol, rtol=0), f"{name}.{k}"
