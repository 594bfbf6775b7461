"""The benchmark with known modes (`shapes`, eval/modes.py): the reading rule, the mode metrics against
slow loop references, the feature network, the config and the DAG's shapes jobs."""
import shutil

import numpy as np
import pytest
import yaml

from eval import modes as M
from eval.errors import UserError
from eval.metrics import METRICS, MODE_METRICS
from eval.score import compute_metrics

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def real():
    return M.shapes_dataset()


def test_rule_reads_every_real_image_exactly(real):
    u8, y, s = real
    assert u8.shape == (4 * M.DATA_PER_CLASS, 8, 8, 3) and u8.dtype == np.uint8
    assert len(np.unique(u8.reshape(len(u8), -1), axis=0)) == len(u8)  # jittered: no two alike
    m = M.read_modes(u8)
    assert (m[:, 0] == y).all() and (M.submode_id(m[:, 1], m[:, 2]) == s).all()
    for c in range(M.NUM_CLASSES):  # every mode is rendered, and read back
        for sub in range(M.SUBMODES):
            img = M.render(c, sub // 4, sub % 4)
            assert M.read_modes(img[None])[0].tolist() == [c, sub // 4, sub % 4]


def test_jitter_extremes_read_exactly():
    """The worst cases of `jitter` (every channel at an end of its range) keep their mode."""
    for c in range(M.NUM_CLASSES):
        for sub in range(M.SUBMODES):
            img = M.render(c, sub // 4, sub % 4)
            for lo, hi in ((0, 255), (M.JITTER_LOW, M.JITTER_HIGH), (0, M.JITTER_HIGH), (M.JITTER_LOW, 255)):
                j = np.where(img == 255, hi, lo).astype(np.uint8)
                assert M.read_modes(j[None])[0].tolist() == [c, sub // 4, sub % 4]


def test_true_frequencies_and_data_quotas(real):
    h12 = sum(1 / k for k in range(1, 13))
    assert np.allclose(M.TRUE_FREQ.sum(1), 1) and M.TRUE_FREQ.min() == pytest.approx(1 / 12 / h12)
    assert (M.RARE.sum(1) == 4).all() and M.TRUE_FREQ[M.RARE].max() <= M.RARE_MAX_FREQ < M.TRUE_FREQ[~M.RARE].min()
    _, y, s = real
    for c in range(M.NUM_CLASSES):  # the real data holds every sub-mode in its true proportion (+- 1 image)
        counts = np.bincount(s[y == c], minlength=M.SUBMODES)
        assert np.abs(counts - M.TRUE_FREQ[c] * M.DATA_PER_CLASS).max() < 1
    assert len({tuple(np.argsort(f)) for f in M.TRUE_FREQ}) == M.NUM_CLASSES  # each class has other rare modes


def test_noise_blank_mixed_and_wrong_class_are_off_mode():
    rng = np.random.default_rng(0)
    blank = np.zeros((1, 8, 8, 3), np.uint8)
    noise = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
    two = (M.render(0, 0, 0) | M.render(1, 0, 3))[None]                 # two shapes
    mixed = M.render(0, 0, 1).copy()
    mixed[:, :, 1] = np.where(mixed[:, :, 0] > 0, 255, 0)                # every pixel yellow: no palette colour
    half = M.render(3, 0, 2).copy()
    half[5:6] = np.where(half[5:6] > 0, np.array([0, 255, 0], np.uint8), 0)   # a red ring with a green top row
    dim = (M.render(2, 2, 0) // 2)[None]                                  # below the foreground threshold
    shifted = np.roll(M.render(1, 1, 0), 1, axis=1)[None]                 # off the position grid
    faint = M.render(0, 1, 0).copy()
    faint[7, 7] = 200                                                     # one stray foreground pixel
    for imgs in (blank, noise, two, mixed[None], half[None], dim, shifted, faint[None]):
        assert (M.read_modes(imgs) == -1).all()
    img = M.render(0, 1, 2)[None]                                         # a square, conditioned on `plus`
    hist = M.class_histogram(M.read_modes(img), np.array([1]))
    assert hist[1, -1] == 1 and hist.sum() == 1
    assert METRICS["off_mode"].fn(M.read_modes(img), np.array([1]))[0] == 1.0
    assert METRICS["off_mode"].fn(M.read_modes(img), np.array([0]))[0] == 0.0


def test_rule_errors():
    with pytest.raises(TypeError):
        M.read_modes(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="8, 8, 3"):
        M.read_modes(np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match="labels"):
        METRICS["mode_tv"].fn(np.zeros((2, 3), np.int64), None)
    with pytest.raises(UserError, match="outside"):
        M.class_histogram(np.zeros((1, 3), np.int64), np.array([4]))


# ---------------------------------------------------------------- slow, independent references

def _slow_read(img):
    """The rule, pixel by pixel."""
    fg = [[max(int(v) for v in img[r][c]) >= 128 for c in range(8)] for r in range(8)]
    found = None
    for t in range(4):
        for p, (r0, c0) in enumerate(M.POSITIONS):
            want = [[False] * 8 for _ in range(8)]
            for i in range(3):
                for j in range(3):
                    want[r0 + i][c0 + j] = bool(M.TEMPLATES[t][i][j])
            if want == fg:
                found = (t, p)
    if found is None:
        return None
    pix = [img[r][c] for r in range(8) for c in range(8) if fg[r][c]]
    mean = [sum(float(q[k]) for q in pix) / len(pix) for k in range(3)]

    def dist(a, b):
        return sum((float(a[k]) - float(b[k])) ** 2 for k in range(3)) ** 0.5
    colour = min(range(3), key=lambda k: dist(mean, M.PALETTE[k]))
    if dist(mean, M.PALETTE[colour]) > M.COLOUR_TOL:
        return None
    if any(min(range(3), key=lambda k: dist(q, M.PALETTE[k])) != colour for q in pix):
        return None
    return found[0], colour, found[1]


def _slow_metrics(images, labels):
    counts = {}
    off, n_class = 0, [0] * 4
    for img, y in zip(images, labels):
        n_class[y] += 1
        m = _slow_read(img)
        if m is None or m[0] != y:
            off += 1
            counts[(y, "off")] = counts.get((y, "off"), 0) + 1
        else:
            key = (y, m[1] * 4 + m[2])
            counts[key] = counts.get(key, 0) + 1
    covered = sum(1 for c in range(4) for s in range(12) if counts.get((c, s), 0) > 0) / 48
    tvs = []
    for c in range(4):
        if n_class[c] == 0:
            tvs.append(1.0)
            continue
        tv = sum(abs(counts.get((c, s), 0) / n_class[c] - M.TRUE_FREQ[c][s]) for s in range(12))
        tvs.append(0.5 * (tv + counts.get((c, "off"), 0) / n_class[c]))
    rare = [(c, s) for c in range(4) for s in range(12) if M.TRUE_FREQ[c][s] <= M.RARE_MAX_FREQ]
    rare_hit = sum(1 for k in rare if counts.get(k, 0) > 0) / len(rare)
    return {"modes_covered": covered, "mode_tv": sum(tvs) / 4, "rare_recall": rare_hit, "off_mode": off / len(labels)}


def _mixture(seed, n=300):
    """Real mode images, wrong-class labels, noise and blurred images, with random labels."""
    rng = np.random.default_rng(seed)
    u8, y, _ = M.shapes_dataset(n_per_class=60, seed=seed)
    idx = rng.choice(len(u8), n)
    images, labels = u8[idx].copy(), y[idx].copy()
    k = n // 5
    labels[:k] = rng.integers(0, 4, k)                                    # some wrong-class labels
    images[k:2 * k] = rng.integers(0, 256, (k, 8, 8, 3), dtype=np.uint8)  # noise
    images[2 * k:3 * k] = np.clip(images[2 * k:3 * k].astype(int) + rng.integers(-120, 120, (k, 8, 8, 3)),
                                  0, 255).astype(np.uint8)               # noisy modes, some still readable
    return images, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_mode_metrics_equal_slow_loops(seed):
    images, labels = _mixture(seed)
    want = _slow_metrics(images, labels)
    got = compute_metrics(images, labels, list(MODE_METRICS))
    for name in MODE_METRICS:
        assert got[name][0] == pytest.approx(want[name], abs=1e-12), name
        assert "definition" in got[name][1]
    slow_modes = [_slow_read(img) for img in images]
    fast = M.read_modes(images)
    assert [tuple(r) if r[0] >= 0 else None for r in fast.tolist()] == slow_modes
    # a class without samples counts TV 1
    keep = labels != 3
    assert compute_metrics(images[keep], labels[keep], ["mode_tv"])["mode_tv"][0] == pytest.approx(
        _slow_metrics(images[keep], labels[keep])["mode_tv"])


def test_collapse_is_visible_and_the_true_distribution_is_not():
    # collapse: every class always makes its most frequent sub-mode
    top = M.TRUE_FREQ.argmax(1)
    labels = np.repeat(np.arange(4), 400)
    collapsed = np.stack([M.render(c, top[c] // 4, top[c] % 4) for c in labels])
    r = {k: v[0] for k, v in compute_metrics(collapsed, labels, list(MODE_METRICS)).items()}
    assert r["modes_covered"] == pytest.approx(4 / 48) and r["rare_recall"] == 0 and r["off_mode"] == 0
    assert r["mode_tv"] == pytest.approx(1 - M.TRUE_FREQ.max())
    # an i.i.d. draw of 400 per class from the true frequencies: everything covered, TV within sampling error
    rng = np.random.default_rng(0)
    subs = np.concatenate([rng.choice(12, 400, p=M.TRUE_FREQ[c]) for c in range(4)])
    draw = np.stack([M.render(c, s // 4, s % 4) for c, s in zip(labels, subs)])
    r = {k: v[0] for k, v in compute_metrics(draw, labels, list(MODE_METRICS)).items()}
    assert r["modes_covered"] == 1 and r["rare_recall"] == 1 and r["off_mode"] == 0 and r["mode_tv"] < 0.1
    # the real data (exact quotas): TV ~ 0
    u8, y, _ = M.shapes_dataset()
    assert compute_metrics(u8, y, ["mode_tv"])["mode_tv"][0] < 0.005


def test_shapes_feature_network_and_extractor(tmp_path, real):
    from eval.digits_net import train_digits_net
    from eval.features import build_extractor

    info = train_digits_net(tmp_path / "shapes_net.safetensors", epochs=1, data="shapes")
    assert info["test_acc"] > 0.5
    ext = build_extractor("shapes", tmp_path / "shapes_net.safetensors")
    f = ext.features(real[0][:10])
    assert f.shape == (10, 64) and f.dtype == np.float64
    assert ext.provenance["extractor"] == "shapes"
    with pytest.raises(UserError, match="8x8 RGB"):
        ext.features(np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match="data"):
        train_digits_net(tmp_path / "x.safetensors", epochs=1, data="faces")


def test_config_has_the_shapes_benchmark_and_checks_it():
    from tfd.config import ConfigError, load_config

    cfg = load_config(ROOT / "config.yaml")
    assert cfg.modes_benchmark == "shapes" and "shapes" in cfg.active
    b = cfg.bench("shapes")
    assert b.data.kind == "shapes" and b.eval.feature_extractor == "shapes"
    assert set(MODE_METRICS) <= set(b.eval.metrics)
    assert b.row_runs("tfd") == ["tfd@s0", "tfd@s1", "tfd@s2"] and len(b.row_runs("tfd_noanchor")) == 3
    assert b.runs["tfd"].params.lambda_anchor == 1.0 and b.runs["tfd_noanchor@s1"].params.lambda_anchor == 0.0
    with pytest.raises(ConfigError, match="resolution"):
        load_config(ROOT / "config.yaml", {"benchmarks": {"shapes": {"resolution": 16}}})
    with pytest.raises(ConfigError, match="data.kind"):  # mode metrics on digits images
        load_config(ROOT / "config.yaml", {"benchmarks": {"digits": {"eval": {"metrics": ["fid_digits", "mode_tv"]}}}})
    with pytest.raises(ConfigError, match="modes_benchmark"):
        load_config(ROOT / "config.yaml", {"modes_benchmark": "digits"})
    assert load_config(ROOT / "config.yaml", {"modes_benchmark": None}).active == ["digits", "digits_text"]


def test_dag_dry_run_lists_the_shapes_jobs(tmp_path, run_snakemake):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    r = run_snakemake(tmp_path, "-n", "--quiet", "rules", "all")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for rule in ("train_teacher_modes", "score_modes", "table_modes", "figure_modes"):
        assert rule in out, rule
    # without the key, nothing of it
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["modes_benchmark"] = None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_snakemake(tmp_path, "-n", "--quiet", "rules", "all")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "table_modes" not in r.stdout + r.stderr and "score_modes" not in r.stdout + r.stderr


def test_modes_figure(tmp_path):
    from tfd.figures import main, mode_mass_by_rank

    u8, y, _ = M.shapes_dataset(n_per_class=100)
    np.savez(tmp_path / "real.npz", arr_0=u8, arr_1=y, seeds=np.arange(len(y)))
    top = M.TRUE_FREQ.argmax(1)
    col = np.stack([M.render(c, top[c] // 4, top[c] % 4) for c in y])
    col[:10] = 0                                                            # 10 blank: off-mode
    np.savez(tmp_path / "collapsed.npz", arr_0=col, arr_1=y, seeds=np.arange(len(y)))
    by_rank, off = mode_mass_by_rank(u8, y)
    assert np.allclose(by_rank, np.sort(M.TRUE_FREQ[0])[::-1], atol=0.006) and off == 0
    by_rank, off = mode_mass_by_rank(col, y)
    assert by_rank[1:].sum() == 0 and off == pytest.approx(10 / 400) and by_rank[0] == pytest.approx(1 - off)
    main(["modes", "--samples", f"real={tmp_path / 'real.npz'}", f"collapsed={tmp_path / 'collapsed.npz'}",
          "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").stat().st_size > 0
