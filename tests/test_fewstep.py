"""Few-step students (tfd/fewstep.py): DMD2's N-step generator with backward simulation, and DP-DMD."""
import math

import pytest
import torch
import yaml

from tfd.config import Config, ConfigError, check, from_dict
from tfd.data import ClassBalancedSampler, digits_arrays
from tfd.denoiser import EDMDenoiser, load_denoiser
from tfd.fewstep import dmd2_sigmas, dpdmd_sigmas, few_step_sampler
from tfd.methods import Method
from tfd.methods.dmd2 import DMD2, DMD2Params
from tfd.methods.dpdmd import DPDMD, DPDMDParams
from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
from tfd.sampling import StackedRandom, one_step_sampler
from tfd.trainer import TrainCfg

from tests.helpers import assert_same_training_state

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def tiny_teacher():
    torch.manual_seed(123)
    return EDMDenoiser(EDMPrecond(**digits_unet_kwargs(**TINY)))


def perturb(net, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def data(seed=0):
    x, y = digits_arrays()
    return ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed))


def dmd2(**kw):
    return DMD2(tiny_teacher(), data(), DMD2Params(**{"batch_per_rank": 4, **kw}))


def dpdmd(**kw):
    return DPDMD(tiny_teacher(), data(), DPDMDParams(**{"batch_per_rank": 4, "teacher_steps": 8, **kw}))


def grads(loss, net):
    return [g for g in torch.autograd.grad(loss, [p for p in net.parameters()], allow_unused=True)]


# -- schedules ------------------------------------------------------------------------------------

def test_default_schedules():
    # DMD2 4-step: t = 999/749/499/249 (DMD2's denoising_step_list) on SD's schedule, first -> sigma_max
    assert dmd2_sigmas(4, 80.0) == pytest.approx([80.0, 4.0817, 1.6129, 0.6932], abs=1e-4)
    assert dmd2_sigmas(1, 80.0) == [80.0]
    # DP-DMD: SD3 FlowMatchEuler 4 steps, shift 3: t = 1, 0.857, 0.601, 0.003 -> sigma = t / (1 - t)
    flow = [0.857, 0.601, 0.003]
    assert dpdmd_sigmas(4, 80.0)[1:] == pytest.approx([t / (1 - t) for t in flow], rel=5e-3)


# -- the sampler ----------------------------------------------------------------------------------

def test_one_step_few_step_sampler_is_the_one_step_generator_bitwise():
    gen = tiny_teacher()
    perturb(gen.net)
    labels = torch.tensor([0, 3, 7])
    seeds = [5, 6, 7]
    ref = one_step_sampler(gen, 80.0)(labels, StackedRandom(seeds))
    assert torch.equal(few_step_sampler(gen, [80.0])(labels, StackedRandom(seeds)), ref)
    # a dmd2 run with num_steps 1 (the default): its sampler is the base class's one-step sampler
    base = Method.sampler_for(gen, DMD2Params())(labels, StackedRandom(seeds))
    assert torch.equal(DMD2.sampler_for(gen, DMD2Params())(labels, StackedRandom(seeds)), base)
    assert torch.equal(base, ref)
    assert DMD2.nfe(DMD2Params()) == 1 and DMD2.nfe(DMD2Params(num_steps=4)) == 4


def test_few_step_sampler_renoises_x0_and_uses_each_images_own_seed():
    gen = tiny_teacher()
    perturb(gen.net)
    labels, seeds = torch.tensor([1, 2]), [11, 12]
    sig = dmd2_sigmas(4, 80.0)
    out = DMD2.sampler_for(gen, DMD2Params(num_steps=4))(labels, StackedRandom(seeds))
    rnd = StackedRandom(seeds)  # by hand: x = s0 z; x0 = G(x; s_i); x = x0 + s_{i+1} * fresh noise
    x = rnd.randn((1, 8, 8)) * sig[0]
    with torch.no_grad():
        for i, s in enumerate(sig):
            x0 = gen.denoise(x, s, labels)
            if i + 1 < len(sig):
                x = x0 + sig[i + 1] * rnd.randn((1, 8, 8))
    assert torch.allclose(out, gen.decode(x0), atol=1e-6)
    alone = DMD2.sampler_for(gen, DMD2Params(num_steps=4))(labels[1:], StackedRandom(seeds[1:]))
    assert torch.allclose(out[1:], alone, atol=1e-6)   # image i depends only on its own seed
    # the euler rule: deterministic, x = x0 + s_next (x - x0) / s
    e = few_step_sampler(gen, sig, rule="euler")(labels, StackedRandom(seeds))
    x = StackedRandom(seeds).randn((1, 8, 8)) * sig[0]
    with torch.no_grad():
        for i, s in enumerate(sig):
            x0 = gen.denoise(x, s, labels)
            if i + 1 < len(sig):
                x = x0 + sig[i + 1] * (x - x0) / s
    assert torch.allclose(e, gen.decode(x0), atol=1e-6)


# -- DMD2 backward simulation -----------------------------------------------------------------

def test_one_step_dmd2_training_is_unchanged():
    """num_steps 1: no extra random draws and the generator output is `generate(z, cond)` bitwise."""
    m = dmd2(gan=False)
    torch.manual_seed(0)
    b = m.make_batch()
    after = torch.randn(3)
    assert not any(k.startswith("sim_") for k in b)
    torch.manual_seed(0)  # the one-step batch's draws, by hand: z, then (index, noise) for dm and fake
    z = torch.randn(4, 1, 8, 8)
    dm_i, dm_noise = torch.randint(20, 981, (4,)), torch.randn(4, 1, 8, 8)
    fake_i, fake_noise = torch.randint(0, 1000, (4,)), torch.randn(4, 1, 8, 8)
    for k, v in dict(z=z, dm_i=dm_i, dm_noise=dm_noise, fake_i=fake_i, fake_noise=fake_noise).items():
        assert torch.equal(b[k], v), k
    assert torch.equal(torch.randn(3), after)   # nothing else drawn: one-step runs keep their streams
    with torch.no_grad():
        assert torch.equal(m.generate_batch(b), m.generate(b["z"], b["cond"]))


def test_backward_simulation_step_is_uniform_per_batch():
    m = dmd2(gan=False, num_steps=4, batch_per_rank=5)
    torch.manual_seed(0)
    ks = []
    for _ in range(60):
        b = m.make_batch()
        assert (b["sim_k"] == b["sim_k"][0]).all()          # one step per batch, as DMD2
        assert not torch.equal(b["sim_z"], b["z"])          # the rollout's own (uncorrelated) noise
        ks.append(int(b["sim_k"][0]))
    assert set(ks) == {0, 1, 2, 3}


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_backward_simulation_inputs_are_the_generators_own_detached_states(k):
    m = dmd2(gan=False, num_steps=4)
    perturb(m.generator)
    torch.manual_seed(1)
    b = m.make_batch()
    b["sim_k"] = torch.full_like(b["sim_k"], k)
    sig, c, G = m.sigmas, b["cond"], m.generator
    x_in, s = m.student_input(b)
    assert not x_in.requires_grad
    with torch.no_grad():  # by hand: run the student itself for k steps from its own noise
        x = b["sim_z"] * sig[0]
        for j in range(k):
            x0 = G.denoise(x, sig[j], c)
            x = x0 + sig[j + 1] * b["sim_noise"][:, j]
        want = b["z"] * sig[0] if k == 0 else x0 + sig[k] * b["z"]
    assert torch.allclose(x_in, want, atol=1e-5, rtol=1e-5)
    if k == 0:
        assert torch.equal(x_in, b["z"] * sig[0])
    assert torch.allclose(torch.as_tensor(s).flatten(), torch.full([4], sig[k], dtype=torch.float32))
    # the gradient reaches the generator only through its last call, as if its input were a constant
    out = m.generate_batch(b)
    g = grads(out.square().mean(), G)
    g_ref = grads(G.denoise(want.clone(), torch.full([4, 1, 1, 1], sig[k]), c).square().mean(), G)
    for a, r in zip(g, g_ref):
        assert (a is None) == (r is None)
        if a is not None:
            assert torch.allclose(a, r, atol=1e-6, rtol=1e-4)


def test_four_step_dmd2_trains(tmp_path):
    from tfd.trainer import Trainer
    m = dmd2(gan=True, num_steps=4, dfake_gen_update_ratio=2)
    t = Trainer(m, TrainCfg(steps=3, lr=1e-3, warmup_steps=1, checkpoint_every=100, log_every=1), tmp_path,
                progress=False)
    for _ in range(3):
        metrics = t.train_one_step()
        assert math.isfinite(metrics["loss"]) and "sim_step" in metrics


# -- DP-DMD ---------------------------------------------------------------------------------------

def karras(n, smin, smax, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def slow_teacher_state(teacher, z, cond, n, K, solver):
    """An independent K-step rollout of the teacher's ODE dx/ds = (x - D(x; s)) / s on its n-level
    Karras schedule from 80 z, one sample at a time, float64."""
    t = karras(n, 0.002, 80.0)
    out = []
    for i in range(z.shape[0]):
        x = z[i:i + 1].double() * 80.0
        for j in range(K):
            d = (x - teacher.denoise(x.float(), t[j], cond[i:i + 1]).double()) / t[j]
            xe = x + (t[j + 1] - t[j]) * d
            if solver == "heun" and t[j + 1] > 0:
                d2 = (xe - teacher.denoise(xe.float(), t[j + 1], cond[i:i + 1]).double()) / t[j + 1]
                xe = x + (t[j + 1] - t[j]) * (d + d2) / 2
            x = xe
        out.append(x)
    return torch.cat(out), t[K]


@pytest.mark.parametrize("target,solver", [("flow", "euler"), ("flow", "heun"), ("x0", "euler")])
def test_dpdmd_first_step_target_matches_slow_rollout(target, solver):
    m = dpdmd(target=target, teacher_solver=solver, teacher_steps=8)
    perturb(m.teacher.net, 0.02)
    # default K: the teacher level nearest (log) the student's first-step end sigma 6.0 -> t_3 = 7.42 of 8
    t = karras(8, 0.002, 80.0)
    K = min(range(1, 8), key=lambda i: abs(math.log(t[i]) - math.log(dpdmd_sigmas(4, 80.0)[1])))
    assert m.anchor == K
    torch.manual_seed(3)
    z, cond = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    z_k, s_k = slow_teacher_state(m.teacher, z, cond, 8, K, solver)
    with torch.no_grad():
        if target == "flow":   # the straight line from (80, 80 z) to (s_K, z_K), at sigma 0
            want = (80.0 * z_k - s_k * 80.0 * z.double()) / (80.0 - s_k)
            # meaning: one Euler step of the student from 80 with D~ lands on the teacher's state z_K
            landed = want + s_k * (80.0 * z.double() - want) / 80.0
            assert torch.allclose(landed, z_k, atol=1e-8)
        else:                  # App. C: the teacher's x0 prediction at the anchor state
            want = m.teacher.denoise(z_k.float(), s_k, cond).double()
    got = m.first_step_target(z, cond)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 1e-3


def test_dpdmd_no_gradient_through_the_detached_first_state():
    m = dpdmd()
    perturb(m.generator)
    perturb(m.fake.net, seed=8)
    torch.manual_seed(2)
    b = m.make_batch()
    r = m.student_losses(b)
    # d loss_DMD / d(first-step output): none (the state after step 1 is detached)
    (g_first,) = torch.autograd.grad(r["loss_dm"], [r["first"]], retain_graph=True, allow_unused=True)
    assert g_first is None or not g_first.abs().any()
    # ... while l_div does reach it, and DMD still reaches the shared weights through steps 2..N
    (g_div,) = torch.autograd.grad(r["loss_div"], [r["first"]], retain_graph=True)
    assert g_div.abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads(r["loss_dm"], m.generator))
    # without the detach the DMD loss would reach the first-step output
    final, outs = m.student_rollout(b, detach_first=False)
    loss, _ = m.dm_loss(final, b["cond"], b["dm_i"], b["dm_noise"])
    (g,) = torch.autograd.grad(loss, [outs[0]])
    assert g.abs().sum() > 0


def test_dpdmd_turns_and_losses():
    m = dpdmd(fake_updates_per_student=2)
    torch.manual_seed(0)
    kinds = [list(m.train_step(m.make_batch(), s).losses) for s in range(6)]
    assert kinds == [["fake_score"], ["fake_score"], ["generator"]] * 2   # student when (step+1) % 3 == 0
    out = m.train_step(m.make_batch(), 2)
    out.losses["generator"].backward()
    assert all(p.grad is None for p in m.fake.parameters())
    r = m.student_losses(m.make_batch())
    want = r["loss_dm"] + 0.05 * r["loss_div"]
    assert math.isclose(out.metrics["loss"], out.metrics["loss_dm"] + 0.05 * out.metrics["loss_div"], rel_tol=1e-6)
    assert torch.isfinite(want)
    assert DPDMD.nfe(m.params) == 4


def test_dpdmd_exported_sampler_is_the_euler_rollout(tmp_path):
    m = dpdmd()
    perturb(m.generator)
    m.generator.save(tmp_path / "g.safetensors")
    gen = load_denoiser(tmp_path / "g.safetensors", what="generator")
    labels, seeds = torch.tensor([2, 5]), [0, 1]
    out = DPDMD.sampler_for(gen, m.params)(labels, StackedRandom(seeds))
    b = {"z": StackedRandom(seeds).randn((1, 8, 8)), "cond": labels}
    with torch.no_grad():
        final, _ = m.student_rollout(b)
    assert torch.allclose(out, gen.decode(final), atol=1e-5)


# -- resume ---------------------------------------------------------------------------------------

MAKERS = {
    "dmd2_4step": lambda: dmd2(gan=True, num_steps=4, dfake_gen_update_ratio=2),
    "dpdmd_flow": lambda: dpdmd(fake_updates_per_student=1),
    "dpdmd_x0_renoise": lambda: dpdmd(fake_updates_per_student=1, target="x0", step_rule="renoise"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_exact(name, tmp_path, crash_and_resume):
    cfg = TrainCfg(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2, ema_halflife_steps=2.0)
    ref, resumed = crash_and_resume(MAKERS[name], cfg, tmp_path)
    assert resumed.step == 6
    assert_same_training_state(ref, resumed, atol=0.0)  # bitwise


# -- config ---------------------------------------------------------------------------------------

def test_config_runs(root):
    from tfd.runs import run_nfe
    cfg = check(from_dict(Config, yaml.safe_load((root / "config.yaml").read_text()), "config"))
    for bench in ("digits", "imagenet64"):
        b = cfg.benchmarks[bench]
        assert b.runs["dmd2_4step"].label == "DMD2 (4 steps)" and b.runs["dmd2_4step"].params.num_steps == 4
        assert isinstance(b.runs["dpdmd"].params, DPDMDParams)
        assert run_nfe(b, "dmd2_4step") == 4 and run_nfe(b, "dpdmd") == 4
    d = cfg.bench("digits")
    assert "dmd2_4step" not in d.table1 and "dpdmd" not in d.table1  # the methods table's rows (budget)
    assert "dmd2_4step" in d.table_methods and "dpdmd" in d.table_methods
    assert run_nfe(d, "dmd2") == 1


def test_check_config_cli_accepts_the_new_runs(root, capsys):
    from tfd.cli import main
    main(["check-config", "--config", str(root / "config.yaml")])
    out = capsys.readouterr().out
    assert "dmd2_4step" in out and "dpdmd" in out


@pytest.mark.parametrize("run,params,key", [
    ("dmd2_4step", {"num_steps": 0}, "num_steps"),
    ("dmd2_4step", {"student_sigmas": [80.0, 1.0]}, "student_sigmas"),
    ("dmd2_4step", {"student_sigmas": [80.0, 1.0, 2.0, 0.5]}, "student_sigmas"),
    ("dmd2_4step", {"student_sigmas": [80.0, 4.0, 1.6, 0.7], "generator_sigma": 80.0}, "generator_sigma"),
    ("dpdmd", {"target": "v"}, "target"),
    ("dpdmd", {"num_steps": 1}, "num_steps"),
    ("dpdmd", {"anchor_step": 31}, "anchor_step"),
    ("dpdmd", {"lambda_div": -1.0}, "lambda_div"),
    ("dpdmd", {"teacher_solver": "rk4"}, "teacher_solver"),
    ("dpdmd", {"lamda_div": 0.1}, "lamda_div"),
])
def test_check_config_rejects_bad_params(root, tmp_path, capsys, run, params, key):
    from tfd.cli import main
    d = yaml.safe_load((root / "config.yaml").read_text())
    d["benchmarks"]["digits"]["runs"][run]["params"].update(params)
    with pytest.raises(ConfigError, match=key):
        from_dict(Config, d, "config")
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SystemExit) as e:
        main(["check-config", "--config", str(p)])
    assert key in str(e.value) and f"runs.{run}.params" in str(e.value)


def test_new_options_leave_existing_run_specs_and_checkpoints_alone(tmp_path):
    """num_steps / student_sigmas at their one-step values are not in a run's spec (params_spec), so
    the DAG does not rerun, and the trainer still resumes, runs made before they existed."""
    import dataclasses

    from tfd.config import params_spec
    from tfd.trainer import Trainer
    old = {k: v for k, v in dataclasses.asdict(DMD2Params()).items() if k not in ("num_steps", "student_sigmas")}
    assert params_spec(DMD2Params()) == old
    assert params_spec(DMD2Params(num_steps=4))["num_steps"] == 4
    cfg = TrainCfg(steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=1, log_every=1)
    Trainer(dmd2(gan=False), cfg, tmp_path, progress=False).fit()
    path = tmp_path / "ckpt" / "training-state.pt"
    state = torch.load(path, weights_only=False)
    before = {k: v for k, v in dataclasses.asdict(DMD2Params(batch_per_rank=4, gan=False)).items()
              if k not in ("num_steps", "student_sigmas")}
    assert state["method_params"] == before     # what a checkpoint written before the options holds
    longer = Trainer(dmd2(gan=False), TrainCfg(**{**dataclasses.asdict(cfg), "steps": 3}), tmp_path, progress=False)
    assert longer.try_resume() and longer.step == 2
    other = Trainer(dmd2(gan=False, num_steps=2), cfg, tmp_path / "x", progress=False)
    assert other._stale_reason(state) == "other method parameters"
