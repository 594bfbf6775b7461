"""DMD (distribution matching + regression on teacher pairs), the EL-style add-on (MMD in random-network
features) and DP-DMD's diversity metric."""
import itertools
import math

import numpy as np
import pytest

# -- diversity (DP-DMD) ---------------------------------------------------------------------------


def _diversity_loop(features, labels, r=0):
    """Slow reference: per condition, 1 - mean over pairs i < j of cos(f_i, f_j); mean over conditions."""
    vals = []
    for c in sorted(set(labels.tolist())):
        rows = [f for f, lab in zip(features, labels) if lab == c]
        if r:
            rows = rows[:r]
        cos = []
        for a, b in itertools.combinations(rows, 2):
            dot = sum(float(x) * float(y) for x, y in zip(a, b))
            na = math.sqrt(sum(float(x) ** 2 for x in a))
            nb = math.sqrt(sum(float(y) ** 2 for y in b))
            cos.append(dot / (na * nb))
        vals.append(1.0 - sum(cos) / len(cos))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("r", [0, 5])
def test_diversity_matches_slow_loop(r):
    from eval.metrics import METRICS, diversity
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 30)            # image i has class i % 10, as the evaluation samples
    feats = rng.normal(size=(300, 16)) + 0.5 * rng.normal(size=(10, 16))[labels]
    value, details = diversity(feats, labels, r)
    assert value == pytest.approx(_diversity_loop(feats, labels, r), rel=1e-6)
    assert details["samples_per_condition"] == [r or 30] and len(details["per_condition"]) == 10
    spec = METRICS["diversity_digits"]
    assert spec.extractors == ("digits",) and spec.needs == ("features", "labels", "diversity_r")


def test_diversity_extremes_and_errors():
    from eval.errors import UserError
    from eval.metrics import check_metric_names, diversity
    same = np.tile(np.array([[1.0, 2.0, 3.0]]), (6, 1)) * np.arange(1, 7)[:, None]  # one direction
    assert diversity(same, np.zeros(6, dtype=np.int64))[0] == pytest.approx(0.0, abs=1e-12)
    ortho = np.eye(4)
    assert diversity(ortho, None)[0] == pytest.approx(1.0)  # unconditional: one group
    with pytest.raises(UserError, match="fewer than"):
        diversity(ortho, np.array([0, 0, 1, 1]), 3)
    assert check_metric_names(["fid_digits", "diversity_digits"], "digits") == []
    assert check_metric_names(["diversity_digits"], "inception")


# -- shared tiny fixtures ---------------------------------------------------------------------------

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def tiny_teacher():
    import torch

    from tfd.denoiser import EDMDenoiser
    from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
    torch.manual_seed(123)
    return EDMDenoiser(EDMPrecond(**digits_unet_kwargs(**TINY)))


def data(seed=0):
    import torch

    from tfd.data import ClassBalancedSampler, digits_arrays
    x, y = digits_arrays()
    return ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed))


def train_cfg(**kw):
    from tfd.trainer import TrainCfg
    return TrainCfg(**{**dict(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2), **kw})


def el_cfg(**kw):
    from tfd.addons import AddonsCfg, ELStyleCfg
    return AddonsCfg(el_style=ELStyleCfg(**{"weight": 1.0, "num_nets": 2, "width": 8, "groups_per_rank": 3,
                                            "n_per_group": 2, **kw}))


# -- EL-style add-on ------------------------------------------------------------------------------


def test_el_mmd_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    import torch

    from tfd.addons import ELStyle, ELStyleCfg
    el = ELStyle(ELStyleCfg(num_nets=2, width=8), in_channels=1)
    g = torch.Generator().manual_seed(0)
    same, diff = [], []
    for step in range(300):
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = torch.randn(16, 1, 8, 8, generator=g)
        same.append(el.loss(x, y, step)[0].item())
        diff.append(el.loss(x, 0.5 * y + 0.7, step)[0].item())  # another distribution
    same, diff = np.array(same), np.array(diff)
    se = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * se + 1e-9, (same.mean(), se)   # unbiased: E[MMD^2] = 0
    assert (same < 0).any()                                      # the unbiased estimator goes below zero
    assert diff.mean() > 10 * se and (diff > 0).mean() > 0.95


def test_el_kernel_and_estimator_by_hand():
    import torch

    from tfd.addons import bandwidths, mmd2_unbiased
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(4, 3, generator=g).double() + 1
    gam = bandwidths(x, y, 5, 2.0)
    z = torch.cat([x, y]).double()
    d2 = [((z[i] - z[j]) ** 2).sum().item() for i in range(9) for j in range(9) if i != j]
    assert gam[2].item() == pytest.approx(np.mean(d2)) and gam[3].item() == pytest.approx(2 * np.mean(d2))

    def k(a, b):
        return sum(math.exp(-((a - b) ** 2).sum().item() / gj) for gj in gam.tolist())
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert mmd2_unbiased(x, y, gam).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


@pytest.mark.parametrize("resample", [False, True])
def test_el_gradient_reaches_only_the_generator(resample, tmp_path):
    import torch

    from tfd.addons import build_addons
    from tfd.methods.dmd2 import DMD2, DMD2Params
    from tfd.trainer import Trainer
    m = DMD2(tiny_teacher(), data(), DMD2Params(batch_per_rank=4, gan=False))
    m.addons = build_addons(el_cfg(resample=resample), m.teacher.sample_shape)
    t = Trainer(m, train_cfg(steps=2), tmp_path, progress=False)
    nets = m.addons.el_style.nets(0)
    assert all(not p.requires_grad for n in nets for p in n.parameters())
    torch.manual_seed(0)
    extra = m.addons.make_batch(m)
    loss, metrics = m.addons.generator_loss(m, extra, step=0)
    assert loss.item() != 0 and "el_style_mmd2" in metrics
    loss.backward()
    assert all(p.grad is None for n in nets for p in n.parameters())
    assert all(p.grad is None for p in m.fake.parameters()) and all(p.grad is None for p in m.teacher.parameters())
    assert sum(p.grad.abs().sum() for p in m.generator.parameters() if p.grad is not None) > 0
    assert all(torch.isfinite(p.grad).all() for p in m.generator.parameters() if p.grad is not None)
    # the random nets are in no optimiser and no checkpoint
    ids = {id(p) for n in nets for p in n.parameters()}
    assert not ids & {id(p) for o in t.opts.values() for g in o.param_groups for p in g["params"]}
    m.generator.zero_grad(set_to_none=True)
    metrics = t.train_one_step()
    assert "el_style_mmd2" in metrics
    t.save_checkpoint()
    state = torch.load(tmp_path / "ckpt/training-state.pt", weights_only=False)
    assert set(state["nets"]) == {"generator", "fake_score"} and state["addons"]["el_style"]["resample"] is resample
    n_weights = sum(p.numel() for n in nets for p in n.parameters())
    assert not any(v.numel() == n_weights for v in state["nets"]["generator"].values())
    # fixed nets: the same every step; resampled: a function of the step
    a, b = m.addons.el_style.nets(0)[0], m.addons.el_style.nets(1)[0]
    assert torch.equal(a.convs[0].weight, b.convs[0].weight) is (not resample)
    assert torch.equal(m.addons.el_style.nets(5)[1].convs[0].weight, m.addons.el_style.nets(5)[1].convs[0].weight)


def test_el_generic_over_methods():
    """The add-on is one hook on the generator loss: it runs with TFD, DMD2, CD (its consistency map)."""
    import torch

    from tfd.addons import build_addons
    from tfd.methods.cd import CD, CDParams, consistency_fn
    from tfd.methods.tfd import TFD, TFDParams
    tfd = TFD(tiny_teacher(), data(), TFDParams(layers=["bottleneck"], groups_per_rank=2, n_gen=2, n_pos=2,
                                                n_anchor=0, pool=2))
    cd = CD(tiny_teacher(), data(), CDParams(batch_per_rank=4))
    for m in (tfd, cd):
        m.addons = build_addons(el_cfg(), m.teacher.sample_shape)
        torch.manual_seed(0)
        loss, _ = m.addons.generator_loss(m, m.addons.make_batch(m), 0)
        assert torch.isfinite(loss) and loss.requires_grad
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(cd.generate(z, c), consistency_fn(cd.online, z * 80.0, 80.0, c))


def test_check_config_rejects_a_bad_addon_key(tmp_path):
    import yaml

    from tfd.cli import main
    from tfd.config import ConfigError, load_config

    from tests.helpers import ROOT
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["benchmarks"]["digits"]["runs"]["dmd2"]["addons"] = {"el_styel": {"weight": 1.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"runs\.dmd2\.addons: unknown key 'el_styel' \(valid keys: el_style\)"):
        load_config(tmp_path / "c.yaml")
    cfg["benchmarks"]["digits"]["runs"]["dmd2"]["addons"] = {"el_style": {"bandwith": 1.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"addons\.el_style: unknown key 'bandwith'"):
        main(["check-config", "--config", str(tmp_path / "c.yaml")])
    cfg["benchmarks"]["digits"]["runs"]["teacher_ode"]["addons"] = {"el_style": {}}
    cfg["benchmarks"]["digits"]["runs"]["dmd2"]["addons"] = {"el_style": {"num_nets": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"teacher_ode\.addons: a 'heun' row takes no addons"):
        load_config(tmp_path / "c.yaml")
