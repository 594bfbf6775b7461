"""Deterministic sharded sampling and the EDM Heun sampler."""
import hashlib

import numpy as np
import pytest
import torch

from eval.conditions import ClassConditions, PromptTable
from eval.sample import generate, merge_npz, parse_shard, quantise_edm, save_npz, to_nhwc_numpy
from tfd.denoiser import EDMDenoiser
from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
from tfd.sampling import HeunCfg, StackedRandom, edm_sampler, heun_sampler, karras_sigmas, one_step_sampler


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    net = EDMPrecond(**digits_unet_kwargs(model_channels=16))
    for p in net.parameters():  # non-zero output layers so samples depend on the network
        p.data.add_(0.05 * torch.randn_like(p))
    return EDMDenoiser(net)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_shards_and_batch_size_give_identical_bytes(teacher, tmp_path):
    sampler = heun_sampler(teacher, HeunCfg(steps=3, S_churn=10, S_min=0.05, S_max=50, S_noise=1.003))
    n = 23
    whole = generate(sampler, n, ClassConditions(10), base_seed=5, batch_size=8, progress=False)
    save_npz(tmp_path / "one.npz", whole)
    parts = []
    for k in range(3):
        part = generate(sampler, n, ClassConditions(10), base_seed=5, batch_size=5, shard=(k, 3), progress=False)
        save_npz(tmp_path / f"p{k}.npz", part)
        parts.append(tmp_path / f"p{k}.npz")
    merge_npz(parts[::-1], tmp_path / "merged.npz")
    other = generate(sampler, n, ClassConditions(10), base_seed=5, batch_size=23, progress=False)
    save_npz(tmp_path / "bs23.npz", other)
    assert _sha(tmp_path / "one.npz") == _sha(tmp_path / "merged.npz") == _sha(tmp_path / "bs23.npz")
    d = np.load(tmp_path / "one.npz")
    assert d["arr_0"].shape == (n, 8, 8, 1) and d["arr_0"].dtype == np.uint8
    assert list(d["arr_1"]) == [i % 10 for i in range(n)]
    assert list(d["seeds"]) == list(range(5, 5 + n))


def test_merge_refuses_gaps(teacher, tmp_path):
    sampler = one_step_sampler(teacher)
    for k in (0, 2):
        save_npz(tmp_path / f"p{k}.npz", generate(sampler, 9, ClassConditions(10), shard=(k, 3), progress=False))
    with pytest.raises(ValueError, match="contiguous"):
        merge_npz([tmp_path / "p0.npz", tmp_path / "p2.npz"], tmp_path / "m.npz")


def test_parse_shard():
    assert parse_shard("2/10") == (2, 10) and parse_shard(None) == (0, 1)
    for bad in ("10/10", "a/b", "3"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_quantise_edm_convention():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5)
    u = to_nhwc_numpy(quantise_edm(x))
    assert u.shape == (1, 1, 5, 1)
    assert list(u.flatten()) == [0, 64, 128, 255, 255]  # floor(x*127.5+128) clipped


def test_karras_sigmas_and_nfe():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])
    assert HeunCfg(steps=18).nfe == 35 and HeunCfg(steps=256).nfe == 511


def test_heun_matches_loop_reference():
    """On a Gaussian target (analytic denoiser) the sampler equals a plain-float reference loop."""
    mu, sd0 = 0.3, 0.5
    denoise = lambda x, s, c: (mu * 1.0 + (x - mu) * sd0 ** 2 / (sd0 ** 2 + s ** 2))  # noqa: E731
    cfg = HeunCfg(steps=6, S_churn=0)
    rnd = StackedRandom([0, 1, 2])
    out = edm_sampler(denoise, None, rnd, (1, 1, 1), cfg)
    ts = karras_sigmas(6, 0.002, 80.0).tolist() + [0.0]
    x0 = [torch.randn([1, 1, 1], generator=torch.Generator().manual_seed(i)).item() * ts[0] for i in range(3)]
    for j, x in enumerate(x0):
        for i in range(6):
            d = (x - denoise(x, ts[i], None)) / ts[i]
            xn = x + (ts[i + 1] - ts[i]) * d
            if i < 5:
                d2 = (xn - denoise(xn, ts[i + 1], None)) / ts[i + 1]
                xn = x + (ts[i + 1] - ts[i]) * (d + d2) / 2
            x = xn
        assert out[j].item() == pytest.approx(x, rel=1e-5, abs=1e-6)


def test_prompt_conditions_in_sample_files(teacher, tmp_path):
    """Sample i gets prompt row i % len and seed base + i; files carry the table's hash, and
    shards of different tables refuse to merge."""
    table = PromptTable(ids=(7, 3, 9), texts=("a cat", "a dog", "a 1"))
    seen = []

    def sampler(cond, rnd):  # records the condition ids it was given
        seen.extend(cond.tolist())
        return torch.zeros([len(cond), 1, 2, 2])
    arrays = generate(sampler, 7, table, base_seed=10, batch_size=3, progress=False)
    assert seen == [7, 3, 9, 7, 3, 9, 7] == list(arrays["arr_1"])
    assert list(arrays["seeds"]) == list(range(10, 17))
    assert str(arrays["conditions_sha256"]) == table.sha256
    save_npz(tmp_path / "a.npz", generate(sampler, 7, table, shard=(0, 2), progress=False))
    save_npz(tmp_path / "b.npz", generate(sampler, 7, table, shard=(1, 2), progress=False))
    merged = merge_npz([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "m.npz")
    assert str(merged["conditions_sha256"]) == table.sha256
    other = PromptTable(ids=(7, 3, 9), texts=("a cat", "a dog", "a 2"))
    assert other.sha256 != table.sha256
    save_npz(tmp_path / "b.npz", generate(sampler, 7, other, shard=(1, 2), progress=False))
    with pytest.raises(ValueError, match="different condition lists"):
        merge_npz([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "m.npz")


def test_heun_range_comes_from_the_denoiser():
    """sigma_min / sigma_max of the Heun sampler default to the denoiser's range."""
    calls = []

    class Fake:
        sigma_min, sigma_max, sample_shape = 0.03, 14.6, (1, 1, 1)

        def denoise(self, x, sigma, cond, guidance=None):
            calls.append(sigma)
            return torch.zeros_like(x)

        def decode(self, x):
            return x
    heun_sampler(Fake(), HeunCfg(steps=4))(torch.zeros(1, dtype=torch.long), StackedRandom([0]))
    assert calls[0] == pytest.approx(14.6) and min(calls) == pytest.approx(0.03)
