"""DMD (distribution matching + regression on teacher pairs), the EL-style add-on (MMD in random-network
features) and DP-DMD's diversity metric."""
import itertools
import math
import re

import numpy as np
import pytest

from tests.helpers import assert_same_training_state

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


# -- DMD: teacher pairs ------------------------------------------------------------------------------


def heun_by_hand(teacher, z, cond, steps):
    """EDM's deterministic Heun sampler written out again (Karras et al. 2022, Alg. 1, rho 7), float64."""
    import torch
    smin, smax, rho = teacher.sigma_min, teacher.sigma_max, 7.0
    t = [(smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(steps)]
    t.append(0.0)
    x = z.double() * t[0]
    with torch.no_grad():
        for i in range(steps):
            d = (x - teacher.denoise(x.float(), t[i], cond).double()) / t[i]
            x_next = x + (t[i + 1] - t[i]) * d
            if t[i + 1] > 0:
                d2 = (x_next - teacher.denoise(x_next.float(), t[i + 1], cond).double()) / t[i + 1]
                x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
            x = x_next
    return x.float()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A tiny teacher's pairs (7 pairs, 3 Heun steps) in two shards, merged."""
    from tfd.pairs import make_pairs_shard, merge_pairs
    d = tmp_path_factory.mktemp("pairs")
    teacher = tiny_teacher()
    settings = {"num": 7, "steps": 3, "seed": 5}
    parts = [d / f"shard{k}of2.safetensors" for k in range(2)]
    for k, p in enumerate(parts):
        make_pairs_shard(teacher, settings, 10, (k, 2), p, teacher_sha256="ab" * 32, batch_size=2, progress=False)
    merge_pairs(parts[::-1], d / "pairs.safetensors")  # any order
    return d / "pairs.safetensors", settings, parts


def test_pairs_target_is_the_teacher_ode_output_of_the_stored_noise(pairs_file):
    import torch

    from tfd.pairs import load_pairs, pair_seed, pairs_key
    path, settings, _ = pairs_file
    t, meta = load_pairs(path, key=pairs_key(settings), teacher_sha256="ab" * 32, sample_shape=(1, 8, 8),
                         num_conditions=10)
    assert meta["shards"] == 2 and t["index"].tolist() == list(range(7)) and t["cond"].tolist() == list(range(7))
    teacher = tiny_teacher()
    for i in range(7):  # the noise is the pair's own seed's draw; the target is the ODE from sigma_max z
        z = torch.randn([1, 8, 8], generator=torch.Generator().manual_seed(pair_seed(5, i)))
        assert int(t["seed"][i]) == pair_seed(5, i) and torch.equal(t["noise"][i], z)
    ref = heun_by_hand(teacher, t["noise"], t["cond"], steps=3)
    assert torch.allclose(t["target"], ref, rtol=1e-5, atol=1e-5)
    assert (t["target"] - 80 * t["noise"]).abs().max() > 1  # really solved, not the input
    # the evaluation seeds (base_seed + i) are not the pairs' noise
    assert not torch.equal(t["noise"][0], torch.randn([1, 8, 8], generator=torch.Generator().manual_seed(0)))


def test_pairs_reader_rejects_damaged_and_foreign_files(pairs_file, tmp_path):
    import torch

    from eval.errors import BadFile
    from eval.io import atomic_save_safetensors
    from tfd.pairs import load_pairs, merge_pairs
    path, settings, parts = pairs_file
    raw = path.read_bytes()
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw[:-9] + bytes([raw[-9] ^ 0xFF]) + raw[-8:])
    foreign = tmp_path / "foreign.safetensors"
    atomic_save_safetensors({"w": torch.zeros(3)}, foreign, {"format": "something.else"})
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    lacking = tmp_path / "lacking.safetensors"
    t, meta = load_pairs(path)
    atomic_save_safetensors({k: v for k, v in t.items() if k != "target"}, lacking, meta)
    nan = tmp_path / "nan.safetensors"
    atomic_save_safetensors({**t, "target": t["target"] * float("nan")}, nan, meta)
    for bad, why in ((cut, "readable|truncated"), (flipped, "checksum"), (foreign, "not a teacher pairs file"),
                     (text, "readable"), (lacking, "lacks tensors"), (nan, "non-finite"),
                     (tmp_path / "gone.safetensors", "not found")):
        with pytest.raises(BadFile, match=why) as e:
            load_pairs(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(BadFile, match="other settings") as e:
        load_pairs(path, key="0" * 12)
    assert str(path) in str(e.value)
    with pytest.raises(BadFile, match="another teacher"):
        load_pairs(path, teacher_sha256="cd" * 32)
    with pytest.raises(BadFile, match="sample shape"):
        load_pairs(path, sample_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="do not cover"):
        merge_pairs(parts[:1], tmp_path / "m.safetensors")


# -- DMD: the method -----------------------------------------------------------------------------------


def dmd(pairs_path, seed=0, **kw):
    from tfd.methods.dmd import DMD, DMDParams
    from tfd.pairs import load_pairs
    p = DMDParams(**{"batch_per_rank": 4, "regression_batch_per_rank": 3, "pairs_num": 7, "pairs_steps": 3,
                     "pairs_seed": 5, **kw})
    return DMD(tiny_teacher(), data(seed), p, pairs=load_pairs(pairs_path)[0])


def test_dmd_is_dm_plus_weighted_regression_every_step(pairs_file, tmp_path):
    import torch

    from tfd.methods.dmd import DMDParams
    from tfd.trainer import Trainer
    path = pairs_file[0]
    m = dmd(path, regression_weight=0.5)
    assert m.fake.head is None and DMDParams.gan is False and DMDParams.dfake_gen_update_ratio == 1
    torch.manual_seed(0)
    b = m.make_batch()
    assert b["pair_z"].shape == (3, 1, 8, 8) and "gan_g_i" not in b
    out = m.train_step(b, step=1)
    assert list(out.losses) == ["generator", "fake_score"]   # generator on every step, first
    with torch.no_grad():
        x = m.generator.denoise(b["pair_z"] * 80.0, 80.0, b["pair_cond"])
        reg = (x - b["pair_target"]).square().flatten(1).mean(1).mean()
        dm, _ = m.dm_loss(m.generate(b["z"], b["cond"]), b["cond"], b["dm_i"], b["dm_noise"])
    assert out.metrics["loss_reg"] == pytest.approx(reg.item(), rel=1e-5)
    assert out.losses["generator"].item() == pytest.approx(dm.item() + 0.5 * reg.item(), rel=1e-5)
    t = Trainer(m, train_cfg(steps=3, checkpoint_every=100), tmp_path, progress=False)
    for _ in range(3):
        t.train_one_step()
    assert t.updates == {"generator": 3, "fake_score": 3}
    h = dmd(path, regression="huber")
    assert h.huber_c == pytest.approx(0.00054 * 8)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dmd_lpips_only_from_a_local_file(pairs_file, tmp_path):
    import torch

    from eval.errors import BadFile, UserError
    from tfd.config import from_dict
    from tfd.methods.dmd import DMDParams
    with pytest.raises(UserError, match="lpips_weights.*cannot be downloaded"):
        from_dict(DMDParams, {"regression": "lpips"})
    with pytest.raises(BadFile, match="LPIPS weights not found") as e:
        dmd(pairs_file[0], regression="lpips", lpips_weights=str(tmp_path / "lpips.pt"))
    assert "not available offline" in str(e.value)

    class FakeLPIPS(torch.nn.Module):  # a stand-in with LPIPS's call signature
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.jit.save(torch.jit.script(FakeLPIPS()), tmp_path / "lpips.pt")
    m = dmd(pairs_file[0], regression="lpips", lpips_weights=str(tmp_path / "lpips.pt"))
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert torch.allclose(m.regression_distance(a, b), torch.ones(2))


def test_dmd_resume_is_exact(pairs_file, tmp_path, crash_and_resume):

    from tfd.addons import build_addons
    from tfd.denoiser import load_denoiser

    def make():
        m = dmd(pairs_file[0])
        m.addons = build_addons(el_cfg(resample=True), m.teacher.sample_shape)  # with the add-on too
        return m
    ref, resumed = crash_and_resume(make, train_cfg(ema_halflife_steps=2.0), tmp_path)
    assert resumed.step == 6
    assert_same_training_state(ref, resumed)
    assert load_denoiser(tmp_path / "b" / "generator.safetensors").num_conditions == 10


def test_tiny_dag_dry_run_lists_the_teacher_pairs_jobs(tmp_path, run_snakemake):
    import shutil

    from tests.helpers import ROOT, TINY_CONFIG
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    r = run_snakemake(tmp_path, "-n", "results/digits/dmd/dmd/generator.safetensors", "--configfile",
                      str(TINY_CONFIG))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"teacher_pairs\s+2\b", out) and re.search(r"merge_teacher_pairs\s+1\b", out), out[-3000:]
    assert re.search(r"results/digits/pairs/[0-9a-f]{12}/pairs\.safetensors", out)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("target", ["methods", "extended"])
def test_methods_table_is_its_own_target_outside_all(tmp_path, run_snakemake, tiny_config, target):
    """`snakemake methods` (and `extended`) builds results/table_methods.csv from every other method's
    run beside its parents (table_methods); `all` (the default DAG's budget) trains none of the rows
    that Table 1 does not have."""
    import shutil

    from tests.helpers import ROOT, TINY_CONFIG
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    d = tiny_config["benchmarks"]["digits"]
    only_methods = set(d["table_methods"]) - set(d["table1"])
    assert {"tfd_el", "dmd2_4step", "dpdmd", "dmd", "dmd2_nogan", "dmd2_nogan_el", "cd_huber", "drift_pixel"} \
        == only_methods
    r = run_snakemake(tmp_path, "-n", target, "--configfile", str(TINY_CONFIG))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"table_methods\s+1\b", out) and "results/table_methods.csv" in out
    for run in ("tfd_el", "dmd2_4step", "dpdmd", "dmd", "dmd2_nogan_el", "cd_huber", "drift_pixel", "dmd2@s0", "tfd"):
        assert f"/{run}/generator.safetensors" in out, run
    r = run_snakemake(tmp_path, "-n", "all", "--configfile", str(TINY_CONFIG))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "table_methods" not in out
    for run in only_methods:
        assert f"/{run}/" not in out and f"/{run}@" not in out, run


def test_build_method_attaches_addons_and_pairs(pairs_file, tiny_config, tmp_path):
    import yaml

    from eval.errors import BadFile
    from tfd.config import ConfigError, check, load_config
    from tfd.runs import build_method
    d = tiny_config["benchmarks"]["digits"]
    d["runs"]["dmd"]["params"].update(pairs_num=7, pairs_steps=3, pairs_seed=5, pairs_shards=1)
    d["runs"]["dmd_lpips"] = {"method": "dmd", "train": d["runs"]["dmd"]["train"],
                              "params": {"regression": "lpips", "lpips_weights": str(tmp_path / "lpips.pt")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    cfg = load_config(tmp_path / "c.yaml")
    b = cfg.bench("digits")
    el = build_method(b, "dmd2_nogan_el", tiny_teacher())
    assert el.addons is not None and el.addons.el_style.cfg.num_nets == 2
    assert build_method(b, "dmd2_nogan", tiny_teacher()).addons is None
    m = build_method(b, "dmd", tiny_teacher(), pairs=pairs_file[0])
    assert len(m.pairs["index"]) == 7 and m.addons is None
    with pytest.raises(ConfigError, match="needs its teacher pairs"):
        build_method(b, "dmd", tiny_teacher())
    d["runs"]["dmd"]["params"]["pairs_steps"] = 4  # other settings than the file's
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    with pytest.raises(BadFile, match="other settings"):
        build_method(load_config(tmp_path / "c.yaml").bench("digits"), "dmd", tiny_teacher(), pairs=pairs_file[0])
    with pytest.raises(ConfigError, match=r"runs\.dmd_lpips\.params\.lpips_weights: no such file"):
        check(cfg, files=True)


def test_el_options_per_condition_and_embedding():
    import torch

    from tfd.addons import ELStyle, ELStyleCfg, RandomConvNet, bandwidths, mmd2_unbiased
    net = RandomConvNet(1, 8, 2, seed=3, embedding="all")
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 8 * 4 * 4 + 8 * 2 * 2)
    el = ELStyle(ELStyleCfg(num_nets=1, width=8, per_condition=True, n_per_group=3, activation="silu"), 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    f = el.nets(0)[0]
    fx, fy = f(x), f(y)
    want = [mmd2_unbiased(fx[i:i + 3], fy[i:i + 3], bandwidths(fx[i:i + 3], fy[i:i + 3], 5, 2.0)) for i in (0, 3)]
    assert el.loss(x, y, 0)[0].item() == pytest.approx(float(sum(want) / 2), rel=1e-6)
