"""Baselines (DMD2, consistency distillation, pixel/random-feature drifting) on tiny CPU networks."""
import math

import pytest
import torch
import torch.nn.functional as F

from tfd.config import from_dict
from tfd.data import ClassBalancedSampler, digits_arrays
from tfd.denoiser import EDMDenoiser, load_denoiser
from tfd.methods import get_method
from tfd.methods.cd import CD, CDParams, consistency_fn
from tfd.methods.dmd2 import DMD2, DMD2Params, dm_generator_loss
from tfd.methods.drift import Drift, DriftParams
from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
from tfd.sampling import StackedRandom, karras_sigmas
from tfd.trainer import TrainCfg, Trainer

from tests.helpers import assert_same_training_state

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])  # bottleneck 16ch 4x4


def tiny_teacher(**kw):
    torch.manual_seed(123)
    return EDMDenoiser(EDMPrecond(**digits_unet_kwargs(**{**TINY, **kw})))


def data(seed=0):
    x, y = digits_arrays()
    return ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed))


def dmd2(seed=0, **kw):
    return DMD2(tiny_teacher(), data(seed), DMD2Params(**{"batch_per_rank": 6, **kw}))


def cd(seed=0, **kw):
    return CD(tiny_teacher(), data(seed), CDParams(**{"batch_per_rank": 6, **kw}))


def drift(space, seed=0, **kw):
    p = DriftParams(space=space, groups_per_rank=3, n_gen=2, n_pos=2, n_anchor=2, pool=2, randnet_width=8, **kw)
    return Drift(tiny_teacher(), data(seed), p)


def cfg(**kw):
    base = dict(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2)
    return TrainCfg(**{**base, **kw})


def perturb(net, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# -- DMD2 -------------------------------------------------------------------------------------

def test_dm_gradient_moves_toward_real_and_away_from_fake():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    real, fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    loss, g = dm_generator_loss(x, real, fake)
    loss.backward()
    w = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, (fake - real) / w / x.numel(), atol=1e-9, rtol=1e-5)
    step = -x.grad  # gradient descent direction
    for i in range(4):  # per sample: closer to the real prediction, farther from the fake one
        assert (step[i] * (real[i] - x[i])).sum() > (step[i] * (fake[i] - x[i])).sum()
        assert (step[i] * (real[i] - fake[i])).sum() > 0
    # degenerate normaliser -> finite (nan_to_num)
    _, g0 = dm_generator_loss(real.clone(), real, real)
    assert torch.isfinite(g0).all()


def test_dm_loss_uses_teacher_as_real_and_fake_score_as_fake():
    m = dmd2(gan=False)
    perturb(m.fake.net)
    labels = torch.tensor([0, 3, 5, 7])
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    i, noise = torch.tensor([20, 300, 700, 980]), torch.randn(4, 1, 8, 8)
    loss, _ = m.dm_loss(x, labels, i, noise)
    loss.backward()
    s = karras_sigmas(1000, 0.002, 80.0).flip(0).float()[i].reshape(-1, 1, 1, 1)
    x_t = x.detach() + s * noise
    with torch.no_grad():
        r = m.teacher.denoise(x_t, s, labels)
        f = m.fake.net(x_t, s, F.one_hot(labels, 10).float())
    w = (x.detach() - r).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, (f - r) / w / x.numel(), atol=1e-8, rtol=1e-4)
    assert (f - r).abs().max() > 1e-3


def test_batch_carries_all_randomness():
    m = dmd2(gan=True, batch_per_rank=200)
    b = m.make_batch()
    assert b["dm_i"].min() >= 20 and b["dm_i"].max() <= 980
    assert b["fake_i"].min() >= 0 and b["fake_i"].max() <= 999 and b["fake_i"].min() < 20
    assert all(v.shape[0] == 200 for v in b.values())
    torch.manual_seed(0)
    out1 = m.train_step(b, step=0)
    torch.manual_seed(1)
    out2 = m.train_step(b, step=0)
    assert all(torch.equal(out1.losses[k], out2.losses[k]) for k in out1.losses)
    c = cd(batch_per_rank=50).make_batch()
    assert c["n"].min() >= 0 and c["n"].max() <= 38


def test_fake_score_loss_is_edm_denoising_loss():
    m = dmd2(gan=False)
    labels = torch.tensor([1, 2, 3])
    x = torch.randn(3, 1, 8, 8)
    i, noise = torch.tensor([0, 500, 999]), torch.randn(3, 1, 8, 8)
    loss = m.fake_score_loss(x, labels, i, noise)
    grid = karras_sigmas(1000, 0.002, 80.0).flip(0).float()
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    s = grid[i].reshape(-1, 1, 1, 1)
    pred = m.fake.net(x + s * noise, s, F.one_hot(labels, 10).float())
    by_hand = ((1 / s ** 2 + 1 / 0.5 ** 2) * (pred - x) ** 2).mean()
    assert torch.allclose(loss, by_hand, rtol=1e-5)
    loss.backward()
    assert m.fake.net.net.model.out_conv.weight.grad is not None
    assert all(p.grad is None for p in m.generator.parameters())


def test_generator_updates_every_fifth_step(tmp_path):
    m = dmd2(gan=True)
    t = Trainer(m, cfg(steps=11, checkpoint_every=100), tmp_path, progress=False)
    gen_changed, fake_changed = [], []
    for step in range(11):
        g0 = [p.detach().clone() for p in m.generator.parameters()]
        f0 = [p.detach().clone() for p in m.fake.parameters()]
        t.train_one_step()
        gen_changed.append(any(not torch.equal(a, b) for a, b in zip(g0, m.generator.parameters())))
        fake_changed.append(any(not torch.equal(a, b) for a, b in zip(f0, m.fake.parameters())))
    assert gen_changed == [s % 5 == 0 for s in range(11)]
    assert all(fake_changed)


def test_gan_head_reads_fake_score_bottleneck():
    m = dmd2(gan=True)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    i, noise = torch.tensor([0, 10, 400, 999]), torch.randn(4, 1, 8, 8)

    def logits():
        with torch.no_grad():
            return m.gan_logits(x, labels, i, noise)

    ref = logits()
    assert ref.shape == (4,)
    perturb(m.teacher.net)
    assert torch.equal(logits(), ref)                        # teacher: no effect
    perturb(m.fake.net.net.model.dec)
    assert torch.equal(logits(), ref)                        # fake decoder (after the bottleneck): no effect
    perturb(m.fake.net.net.model.enc)
    assert not torch.allclose(logits(), ref)                 # fake encoder: changes the logits
    # parameter bookkeeping: the head is trained with the fake score, the teacher's names under `net.`
    keys = m.networks()["fake_score"].state_dict().keys()
    assert any(k.startswith("head.") for k in keys)
    assert set(m.fake.net.state_dict()) == set(m.teacher.state_dict())


def test_gan_generator_loss_reaches_generator_only(tmp_path):
    """The trainer back-propagates the generator loss (GAN term through the trainable fake score) into the
    generator only, and its gradient equals the one with the fake score frozen (an independent reference:
    a copy whose fake-score parameters never require grad), bitwise."""
    import copy
    m = dmd2(gan=True)
    frozen = copy.deepcopy(m)
    frozen.fake.requires_grad_(False)
    torch.manual_seed(0)
    batch = m.make_batch()
    out = m.train_step(batch, step=0)
    assert list(out.losses) == ["generator", "fake_score"]   # generator stepped first
    t = Trainer(m, cfg(grad_clip=0.0), tmp_path, progress=False)
    t._step_network("generator", out.losses["generator"], {})
    assert all(p.grad is None for p in m.fake.parameters())
    assert all(p.requires_grad for p in m.fake.parameters())
    frozen.generator_losses(batch, frozen.generate(batch["z"], batch["cond"]))[0].backward()
    for (k, p), q in zip(m.generator.named_parameters(), frozen.generator.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), k
    assert sum(p.grad.abs().sum() for p in m.generator.parameters() if p.grad is not None) > 0
    out2 = m.train_step(m.make_batch(), step=1)
    assert list(out2.losses) == ["fake_score"]


def test_gan_head_on_2x2_bottleneck():
    teacher = tiny_teacher(channel_mult=[1, 2, 2], model_channels=16)  # 8 -> 4 -> 2: 32 ch 2x2
    m = DMD2(teacher, data(), DMD2Params(batch_per_rank=4))
    h = m.fake.head.net
    assert h[0].kernel_size == (4, 4) and h[3].kernel_size == (1, 1) and h[1].num_groups == 8
    torch.manual_seed(0)
    out = m.train_step(m.make_batch(), 0)
    assert all(torch.isfinite(v) for v in out.losses.values())


# -- consistency distillation ----------------------------------------------------------------

def test_consistency_function_is_identity_at_sigma_min():
    m = cd()
    perturb(m.online)
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 4, 9])
    assert torch.equal(consistency_fn(m.online, x, 0.002, labels), x)
    # at sigma_max the initial student is the teacher's one-step generator up to O(smin/smax)
    t = tiny_teacher()
    z = torch.randn(3, 1, 8, 8) * 80
    with torch.no_grad():
        a = consistency_fn(t, z, 80.0, labels)
        b = t.net(z, torch.full([3], 80.0), F.one_hot(labels, 10).float())
    assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item())


def test_heun_step_and_discretisation():
    m = cd()
    s = m.sigmas
    assert len(s) == 40 and s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    t, t2 = torch.tensor(5.0), torch.tensor(4.0)
    with torch.no_grad():
        d = (x - m.teacher.denoise(x, t, labels)) / t
        xe = x + (t2 - t) * d
        d2 = (xe - m.teacher.denoise(xe, t2, labels)) / t2
    assert torch.allclose(m.heun_step(x, t, t2, labels), x + (t2 - t) * (d + d2) / 2, atol=1e-6)


def test_target_is_ema_of_online(tmp_path):
    m = cd(metric="huber")
    t = Trainer(m, cfg(steps=3, checkpoint_every=100), tmp_path, progress=False)
    t.train_one_step()
    t.train_one_step()
    old = [p.detach().clone() for p in m.target.parameters()]
    online = [p.detach().clone() for p in m.online.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(old, online))
    t.train_one_step()  # starts with theta- <- 0.95 theta- + 0.05 theta
    for a, b, c in zip(m.target.parameters(), old, online):
        assert torch.allclose(a, 0.95 * b + 0.05 * c, atol=1e-7, rtol=1e-6)
    assert "target" not in [k for k, v in t.opts.items() if v.state]   # never stepped


def test_cd_huber_c_default_and_exported_sampler(tmp_path):
    m = cd(metric="huber")
    assert m.huber_c == pytest.approx(0.00054 * math.sqrt(64))
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert torch.allclose(m.distance(a, b), torch.full([2], math.sqrt(64 + m.huber_c ** 2) - m.huber_c))
    perturb(m.online)
    path = tmp_path / "g.safetensors"
    m.online.save(path)
    gen = load_denoiser(path, what="generator")
    sampler = CD.sampler_for(gen, m.params)
    labels = torch.tensor([3, 8])
    out = sampler(labels, StackedRandom([0, 1]))
    z = StackedRandom([0, 1]).randn((1, 8, 8))
    with torch.no_grad():
        ref = consistency_fn(m.online, 80 * z, 80.0, labels)
    assert torch.allclose(out, ref, atol=1e-5)


# -- drifting without teacher features --------------------------------------------------------

@pytest.mark.parametrize("space", ["pixel", "randnet"])
def test_drift_step_finite(space, tmp_path):
    m = drift(space)
    t = Trainer(m, cfg(steps=2, checkpoint_every=100), tmp_path, progress=False)
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    metrics = t.train_one_step()
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))
    assert m.params.layers == (["pixel"] if space == "pixel" else ["rand:0", "rand:1", "rand:2"])
    if space == "randnet":  # fixed: same seed, same network; not trained
        other = drift(space)
        for a, b in zip(m.randnet.parameters(), other.randnet.parameters()):
            assert torch.equal(a, b)
        assert "randnet" not in str(list(m.networks()))


def test_registry_and_config_params():
    assert get_method("dmd2").Params is DMD2Params and get_method("cd").Params is CDParams
    assert from_dict(DMD2Params, {"gan": False}).gan is False
    assert from_dict(CDParams, {"metric": "huber"}).metric == "huber"
    assert from_dict(DriftParams, {"space": "randnet", "pool": 2}).space == "randnet"
    with pytest.raises(ValueError):
        Drift(tiny_teacher(), data(), DriftParams(space="pixel", layers=["bottleneck"]))


# -- resume -----------------------------------------------------------------------------------

MAKERS = {
    "dmd2": lambda: dmd2(gan=True),
    "dmd2_nogan": lambda: dmd2(gan=False, dfake_gen_update_ratio=2),
    "cd_huber": lambda: cd(metric="huber"),
    "drift_randnet": lambda: drift("randnet", lambda_anchor=1.0),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_exact(name, tmp_path, crash_and_resume):
    ref, resumed = crash_and_resume(MAKERS[name], cfg(ema_halflife_steps=2.0), tmp_path)
    assert resumed.step == 6
    assert_same_training_state(ref, resumed)
    assert load_denoiser(tmp_path / "b" / "generator.safetensors").num_conditions == 10


@pytest.mark.parametrize("name", ["dmd2", "cd_huber"])
def test_batch_splits_across_ranks(name):
    """Every loss is a batch mean, so the mean of the losses on two halves of a batch equals the
    loss on the whole batch (what DDP's gradient averaging needs)."""
    m = dmd2(gan=True, batch_per_rank=6) if name == "dmd2" else cd(metric="huber", batch_per_rank=6)
    if name == "dmd2":
        perturb(m.fake.net)
    b = m.make_batch()
    halves = [{k: v[lo:lo + 3] for k, v in b.items()} for lo in (0, 3)]
    for step in (0, 1):
        full = m.train_step(b, step).losses
        parts = [m.train_step(h, step).losses for h in halves]
        for k in full:
            assert torch.allclose(full[k], (parts[0][k] + parts[1][k]) / 2, rtol=1e-5, atol=1e-8), (k, step)
