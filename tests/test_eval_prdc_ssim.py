"""Improved precision/recall (k=3) and max pairwise SSIM against references (brute force loops,
torch-fidelity's prc code, skimage's structural_similarity)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings

import numpy as np
import pytest
import torch

from eval.prdc import knn_radii, prdc, precision_recall
from eval.ssim import max_pairwise_ssim, ssim_pairs, ssim_settings


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------
# precision / recall


def _brute_force(real, fake, k=3):
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])  # [0] is the point itself

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(q - real[j]) <= rr[j] for j in range(len(real))) for q in fake])
    rec = np.mean([any(np.linalg.norm(q - fake[j]) <= rf[j] for j in range(len(fake))) for q in real])
    return prec, rec


def test_pr_self_and_disjoint():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    assert precision_recall(a, a) == (1.0, 1.0)
    far = rng.normal(size=(300, 16)) + 100.0
    p, r = precision_recall(a, far)
    assert p == 0.0 and r == 0.0
    d = prdc(a, a)
    assert d["coverage"] == 1.0 and d["density"] >= 1.0


def test_pr_matches_brute_force_and_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full, calculate_precision_recall_part

    rng = np.random.default_rng(1)
    real = rng.normal(size=(150, 8))
    fake = rng.normal(0.5, 1.3, size=(120, 8))
    ours = precision_recall(real, fake, k=3, batch_size=37)  # odd batch size: exercises the batching
    bf = _brute_force(real, fake, 3)
    assert ours == pytest.approx(bf, abs=0)
    # torch-fidelity: features_1 = generated, features_2 = real
    tf_full = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3, 10000)
    tf_part = calculate_precision_recall_part(torch.from_numpy(fake), torch.from_numpy(real), 3, 50)
    # torch-fidelity averages in float32: equal counts, within 1e-7
    assert ours == pytest.approx(tf_full, abs=1e-6) and ours == pytest.approx(tf_part, abs=1e-6)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0
    print(f"\nprecision/recall ours={ours} brute force={bf} torch-fidelity={tf_full}")


def test_knn_radii_excludes_self():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1, 1, 2, 3, 4])
    np.testing.assert_allclose(knn_radii(x, k=3), [6, 5, 3, 5, 9])


def test_pr_float32_and_larger_n():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(3000, 64)).astype(np.float32)
    fake = (rng.normal(size=(3000, 64)) * 1.2).astype(np.float32)
    d64 = prdc(real, fake)
    d32 = prdc(real, fake, dtype=torch.float32)
    assert abs(d64["precision"] - d32["precision"]) < 2e-3 and abs(d64["recall"] - d32["recall"]) < 2e-3


# ----------------------------------------------------------------------------------------------
# SSIM


def _sk(a, b, settings):
    from skimage.metrics import structural_similarity

    return structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True,
                                 sigma=settings["win_sigma"], win_size=settings["win_size"],
                                 use_sample_covariance=False, data_range=255, channel_axis=-1)


def _t(u8_nhwc):
    return torch.from_numpy(u8_nhwc).permute(0, 3, 1, 2).to(torch.float64)


def _pairs(size, channels, rng):
    """Random and natural-ish (smoothed, structured) image pairs."""
    a = rng.integers(0, 256, (3, size, size, channels), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    nat = (127 + 120 * np.sin(6 * xx + 3 * yy) * np.cos(4 * yy))[None, ..., None].repeat(channels, -1)
    c = np.clip(nat, 0, 255).astype(np.uint8)
    d = np.clip(nat + rng.normal(0, 20, nat.shape), 0, 255).astype(np.uint8)
    return np.concatenate([a, c]), np.concatenate([b, d])


@pytest.mark.parametrize("size,channels", [(32, 1), (64, 3), (8, 1)])
def test_ssim_matches_skimage(size, channels):
    rng = np.random.default_rng(size)
    a, b = _pairs(size, channels, rng)
    if size == 8:  # the real 8x8 digits too
        from tfd.data import digits_arrays

        d = ((digits_arrays("test")[0][:6] * 127.5 + 128).clip(0, 255).astype(np.uint8)).transpose(0, 2, 3, 1)
        a, b = np.concatenate([a, d[:3]]), np.concatenate([b, d[3:]])
    st = ssim_settings(size, size)
    ours = ssim_pairs(_t(a), _t(b), st).numpy()
    ref = np.array([_sk(x, y, st) for x, y in zip(a, b)])
    err = np.abs(ours - ref).max()
    assert err < 1e-9, err
    print(f"\nSSIM {size}x{size}x{channels} window {st['win_size']}/{st['win_sigma']:.4f}: "
          f"max |ours - skimage| = {err:.1e}")


def test_ssim_window_rule_and_pytorch_msssim_small_image_behaviour():
    from pytorch_msssim import ssim

    st = ssim_settings(8, 8)
    assert st["win_size"] == 7 and st["win_sigma"] == pytest.approx(1.5 * 7 / 11) and st["clamped"]
    # a 7-tap window with the scaled sigma is what skimage builds from sigma alone (radius int(3.5*s+0.5))
    assert 2 * int(3.5 * st["win_sigma"] + 0.5) + 1 == 7
    big = ssim_settings(64, 64)
    assert big["win_size"] == 11 and big["win_sigma"] == 1.5 and not big["clamped"]
    assert ssim_settings(9, 12)["win_size"] == 9 and ssim_settings(6, 6)["win_size"] == 5
    # what pytorch_msssim does with the default 11-px window on 8x8: skips the filter (warning only)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 255
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ssim(x, x.flip(0), data_range=255, size_average=False, win_size=11)
    assert any("Skipping Gaussian Smoothing" in str(m.message) for m in w)


def test_max_pairwise_ssim():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], 4)
    imgs[5] = imgs[6]  # a duplicate pair in class 1
    mean, per = max_pairwise_ssim(imgs, labels)
    assert set(per) == {0, 1, 2} and per[1] == pytest.approx(1.0, abs=1e-12)
    assert per[0] < 0.5 and per[2] < 0.5 and mean == pytest.approx(np.mean(list(per.values())))
    # brute force over pairs with skimage
    st = ssim_settings(8, 8)
    for c in (0, 2):
        idx = np.flatnonzero(labels == c)
        bf = max(_sk(imgs[i], imgs[j], st) for k, i in enumerate(idx) for j in idx[k + 1:])
        assert per[c] == pytest.approx(bf, abs=1e-5)
    # pair batching does not change the result; labels=None is one class
    assert max_pairwise_ssim(imgs, labels, pair_batch=2)[1] == per
    assert max_pairwise_ssim(imgs)[0] == pytest.approx(1.0, abs=1e-12)
