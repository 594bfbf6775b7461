"""Teacher positive generation (`tfd.positives`) and TFD / DMD2 on a text-to-image teacher, on a
tiny random SDXL pipeline and a tiny COCO-format paired set: the three branches (>= N+ real
matches, some, none), per-prompt seeds (1 shard == 3 shards, byte for byte), the provenance of
each positive, the sampler's draws, merge errors, the SDXL generator input at a conditioning
timestep, DMD2's discrete noise grid and epsilon fake loss, the GAN head at SDXL's map size, and
exact resume of TFD and DMD2 on text."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from eval.conditions import PromptTable
from tfd.config import PositivesCfg
from tfd.positives import (
    REAL,
    TEACHER,
    PositivesSampler,
    branch_counts,
    encode_paired_latents,
    load_positives,
    match_prompts,
    merge_positives,
    normalise_caption,
    positives_key,
    positives_shard,
    teacher_seed,
    train_prompts,
)
from tfd.t2i_tiny import build_random_pipeline_folder

from tests.helpers import assert_same_training_state

# prompt 1 has 5 real matches (>= N+ = 4), prompt 2 two, prompt 3 none
CAPTIONS = {1: ["a red square", "A  red square."], 2: ["a red square"], 3: ["a red square"], 4: ["a red square"],
            5: ["a red square", "a blue circle"], 6: ["a blue circle"], 7: ["something else"]}
TABLE = PromptTable(ids=(11, 22, 33), texts=("A red square", "a blue circle", "a green triangle"))
CFG = PositivesCfg(n_pos=4, steps=2, guidance=6.0, seed=3, num_prompts=3)


def _write_paired(root, size=32):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    images, anns, aid = [], [], 1
    rng = np.random.default_rng(0)
    for image_id, caps in CAPTIONS.items():
        name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for c in caps:
            anns.append({"id": aid, "image_id": image_id, "caption": c})
            aid += 1
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "captions.json", root / "images"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("positives")
    folder = build_random_pipeline_folder(tmp / "pipe", seed=1)
    captions, images = _write_paired(tmp / "paired")
    latents = tmp / "latents.safetensors"
    encode_paired_latents(folder, captions, images, latents, resolution=32, progress=False)
    one = tmp / "one.safetensors"
    positives_shard(folder, TABLE, CFG, (0, 1), tmp / "s0of1.safetensors", paired_latents=latents, progress=False)
    merge_positives([tmp / "s0of1.safetensors"], one)
    return {"tmp": tmp, "folder": folder, "captions": captions, "latents": latents, "one": one}


def test_matching_is_case_space_and_period_insensitive():
    assert normalise_caption("  A  red Square. ") == "a red square"
    caps = [[normalise_caption(c) for c in v] for v in CAPTIONS.values()]
    m = match_prompts(TABLE, caps)
    assert [len(x) for x in m] == [5, 2, 0]


def test_three_branches_and_provenance(setup):
    t, meta = load_positives(setup["one"])
    src, ridx, seeds = t["source"].numpy(), t["real_index"].numpy(), t["teacher_seed"].numpy()
    assert t["latents"].shape == (3, 4, 4, 8, 8)
    assert t["prompt_ids"].tolist() == [11, 22, 33]
    assert (src[0] == REAL).all()                                    # >= N+ matches: real only
    assert (src[1] == [REAL, REAL, TEACHER, TEACHER]).all()          # 2 matches + 2 teacher samples
    assert (src[2] == TEACHER).all()                                 # none: all teacher
    assert meta["counts"] == branch_counts(src, 4)
    assert meta["counts"]["all_real"] == 1 and meta["counts"]["some_real"] == 1 and meta["counts"]["no_real"] == 1
    assert ((ridx >= 0) == (src == REAL)).all() and ((seeds >= 0) == (src == TEACHER)).all()
    assert seeds[2].tolist() == [teacher_seed(3, 33, k) for k in range(4)]
    assert seeds[1, 2:].tolist() == [teacher_seed(3, 22, k) for k in (2, 3)]
    # a real positive is exactly that image's encoded latent
    from tfd.positives import load_paired_latents
    lat, lmeta = load_paired_latents(setup["latents"])
    assert torch.equal(t["latents"][1, 0], lat[ridx[1, 0]])
    assert "a blue circle" in lmeta["captions"][ridx[1, 0]]
    assert meta["key"] == positives_key(CFG)


def test_same_positives_for_one_and_three_shards(setup):
    tmp = setup["tmp"]
    parts = [tmp / f"s{k}of3.safetensors" for k in range(3)]
    for k, p in enumerate(parts):
        positives_shard(setup["folder"], TABLE, dataclasses.replace(CFG, shards=3), (k, 3), p,
                        paired_latents=setup["latents"], progress=False)
    three = tmp / "three.safetensors"
    merge_positives(parts[::-1], three)  # any order
    a, _ = load_positives(setup["one"])
    b, _ = load_positives(three)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="do not cover"):
        merge_positives(parts[:2], tmp / "bad.safetensors")
    assert not (tmp / "bad.safetensors").exists()


def test_teacher_positive_is_the_pipeline_sample(setup):
    """A teacher positive = diffusers' pipeline (latent output) from noise seeded by teacher_seed."""
    from tfd.pipeline_sampler import PipelineCfg, build_pipeline
    t, _ = load_positives(setup["one"])
    pipe = build_pipeline(setup["folder"], PipelineCfg(steps=2, guidance=6.0))
    z = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(teacher_seed(3, 33, 1)))[None]
    x = pipe(prompt=["a green triangle"], latents=z, guidance_scale=6.0, num_inference_steps=2,
             height=32, width=32, output_type="latent").images
    torch.testing.assert_close(t["latents"][2, 1], x[0].float(), rtol=0, atol=0)


def test_sampler_draws():
    lat = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1, 1)
    s = PositivesSampler(lat, torch.tensor([11, 22, 33]), torch.Generator().manual_seed(0))
    x, c = s.sample(2, 8)
    assert x.shape == (2, 8, 1, 1, 1) and len(set(c.tolist())) == 2
    for g in range(2):
        row = [11, 22, 33].index(int(c[g]))
        vals = x[g].flatten().tolist()
        assert sorted(vals[:4]) == [row * 4 + k for k in range(4)]   # the 4 positives, permuted
        assert vals[4:] == vals[:4]                                  # k > N+: the permutation repeats
    x, c = s.sample(2, 1, conditions=torch.tensor([33, 11]))
    assert c.tolist() == [33, 11] and x[0, 0].item() >= 8
    assert set(s.random_conditions(50).tolist()) <= {11, 22, 33}
    with pytest.raises(KeyError, match="99"):
        s.sample(1, 1, conditions=torch.tensor([99]))


def test_train_prompts_distinct_and_seeded(setup):
    t = train_prompts(setup["captions"], 100, seed=0)
    assert len(t) == 3 and len({normalise_caption(x) for x in t.texts}) == 3
    assert train_prompts(setup["captions"], 2, seed=5).ids == train_prompts(setup["captions"], 2, seed=5).ids


# -- methods on a text teacher ------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_teacher(setup):
    from tfd.diffusers_denoiser import load_diffusers_denoiser
    return load_diffusers_denoiser(setup["folder"], prompts=TABLE)


def test_generator_timestep_input_is_dmd2s(text_teacher):
    """At t = 399 the UNet sees the raw noise z (DMD2's SDXL one-step generator input)."""
    from tfd.methods import generator_input
    from tfd.methods.tfd import TFDParams
    from tfd.sampling import one_step_sampler
    sigma, scale = generator_input(TFDParams(generator_timestep=399), text_teacher)
    assert math.isclose(sigma, 1.16058, rel_tol=1e-4) and math.isclose(scale, math.sqrt(sigma ** 2 + 1))
    seen = {}
    h = text_teacher.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0].clone(), t=args[1].clone()), with_kwargs=True)
    try:
        rnd = type("R", (), {"randn": lambda self, shape: torch.ones(2, *shape)})()
        one_step_sampler(text_teacher, sigma, scale)(torch.tensor([11, 22]), rnd)
    finally:
        h.remove()
    torch.testing.assert_close(seen["x"], torch.ones_like(seen["x"]))
    torch.testing.assert_close(seen["t"], torch.full_like(seen["t"], 399.0), atol=1e-3, rtol=0)
    assert generator_input(TFDParams(), text_teacher) == (text_teacher.sigma_max, text_teacher.sigma_max)


def test_discrete_grid_and_epsilon_loss(text_teacher, setup):
    from tfd.methods.dmd2 import DMD2, DMD2Params
    data = PositivesSampler.from_file(setup["one"], torch.Generator().manual_seed(0))
    p = DMD2Params(batch_per_rank=2, generator_timestep=399, real_guidance=8.0, sigma_grid="discrete",
                   fake_loss="epsilon", gan_layer="mid_block")
    m = DMD2(text_teacher, data, p)
    assert torch.allclose(m.karras, text_teacher.discrete_sigmas())
    assert math.isclose(float(m.karras[399]), 1.16058, rel_tol=1e-4)
    b = m.make_batch()
    x = m.generate(b["z"], b["cond"]).detach()
    # epsilon loss = mean((eps_fake - n)^2) with eps_fake = (x_t - D_fake) / s
    s = m._sigma(b["fake_i"])
    eps = (x + s * b["fake_noise"] - m.fake.net.denoise(x + s * b["fake_noise"], s, b["cond"])) / s
    torch.testing.assert_close(m.fake_score_loss(x, b["cond"], b["fake_i"], b["fake_noise"]),
                               ((eps - b["fake_noise"]) ** 2).mean(), rtol=1e-4, atol=1e-6)
    out = m.train_step(b, 0)
    assert set(out.losses) == {"generator", "fake_score"}


def test_gan_head_matches_dmd2_sdxl_at_32():
    """32x32 mid-block map (128x128 latents): three halving convs and a k4 s4 conv, as DMD2's SDXL head."""
    from tfd.methods.dmd2 import GANHead
    h = GANHead(64, 32)
    convs = [m for m in h.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(4, 2), (4, 2), (4, 2), (4, 4), (1, 1)]
    assert h(torch.randn(2, 64, 32, 32)).shape == (2,)
    for r in (1, 2, 8):  # DMD2's ImageNet head and the small maps keep their old structure
        assert h.__class__(8, r)(torch.randn(1, 8, r, r)).shape == (1,)
    assert [type(m).__name__ for m in GANHead(8, 2).net][:3] == ["Conv2d", "GroupNorm", "SiLU"]


@pytest.mark.parametrize("method", ["tfd", "dmd2"])
def test_exact_resume_on_text(method, text_teacher, setup, crash_and_resume, tmp_path):
    from tfd.config import TrainCfg
    from tfd.methods.dmd2 import DMD2, DMD2Params
    from tfd.methods.tfd import TFD, TFDParams

    def make():
        data = PositivesSampler.from_file(setup["one"], torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        if method == "tfd":
            return TFD(text_teacher, data, TFDParams(layers=["down_blocks.2", "mid_block", "up_blocks.0"],
                                                    radii=[0.02, 0.05, 0.2], groups_per_rank=2, n_gen=2))
        return DMD2(text_teacher, data, DMD2Params(batch_per_rank=2, generator_timestep=399, real_guidance=8.0,
                                                   sigma_grid="discrete", fake_loss="epsilon",
                                                   gan_layer="mid_block", dfake_gen_update_ratio=2))
    cfg = TrainCfg(steps=6, lr=1e-4, warmup_steps=2, checkpoint_every=3, log_every=1)
    ref, resumed = crash_and_resume(make, cfg, tmp_path)
    assert resumed.step == 6
    assert_same_training_state(ref, resumed)


def test_dmd2_gan_with_gradient_checkpointing_is_exact(text_teacher, setup, tmp_path):
    """DMD2 with its GAN head and gradient checkpointing (coco2014's `dmd2` setting) trains, and checkpointing
    does not change the math: 2 generator + fake-score steps give the weights of the same run without it.
    (It raised CheckpointError when the fake score's `requires_grad` was flipped around the generator's GAN
    forward: the recomputation in backward saw the parameters trainable again.)"""
    from tfd.config import TrainCfg
    from tfd.methods.dmd2 import DMD2, DMD2Params
    from tfd.trainer import Trainer

    def run(checkpointing: bool) -> Trainer:
        data = PositivesSampler.from_file(setup["one"], torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        m = DMD2(text_teacher, data, DMD2Params(batch_per_rank=2, generator_timestep=399, real_guidance=8.0,
                                                sigma_grid="discrete", fake_loss="epsilon", gan_layer="mid_block",
                                                dfake_gen_update_ratio=1))
        cfg = TrainCfg(steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=100, log_every=1,
                       gradient_checkpointing=checkpointing)
        t = Trainer(m, cfg, tmp_path / str(checkpointing), progress=False)
        t.fit()
        return t

    ref, ckpt = run(False), run(True)
    gen, fake = ckpt.nets["generator"].unet, ckpt.nets["fake_score"].net.unet
    assert gen.is_gradient_checkpointing and fake.is_gradient_checkpointing
    assert not ref.nets["generator"].unet.is_gradient_checkpointing
    assert ref.updates == ckpt.updates == {"generator": 2, "fake_score": 2}
    pairs = zip(ref.nets["generator"].unet.parameters(), text_teacher.unet.parameters())
    assert any(not torch.equal(a, b) for a, b in pairs)   # it trained
    assert_same_training_state(ref, ckpt, atol=1e-6)
