"""Table 2's pipeline sampler (`tfd.pipeline_sampler`) on a tiny random SDXL pipeline: per-image
determinism through `eval.sample.generate` (batch sizes, shards), the pipeline's own scheduling
checked against the EDM adapter (1-step Euler and 1-step LCM at t=399, DMD2's setting), UNet
replacement files, scheduler by class name, and the config errors. `pytest -s` prints the
measured pipeline time per image per step.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from eval.conditions import PromptTable
from eval.errors import UserError
from eval.sample import StackedRandom, generate, merge_npz, save_npz
from tfd.diffusers_denoiser import load_diffusers_denoiser
from tfd.pipeline_sampler import PUBLISHED, PipelineCfg, pipeline_sampler
from tfd.t2i_tiny import build_random_pipeline_folder

TABLE = PromptTable(ids=(10, 11, 12), texts=("a photo of a cat", "a bowl of fruit", "two dogs playing"))
NUM, SEED = 7, 100


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline_folder(tmp_path_factory.mktemp("sdxl") / "pipe", seed=1)


@pytest.fixture(scope="module")
def teacher_images(folder):
    """7 images, 2 Euler steps, guidance 6 (4 NFE), one batch: the reference for the other tests."""
    sampler = pipeline_sampler(folder, PipelineCfg(steps=2, guidance=6.0), TABLE)
    t0 = time.perf_counter()
    out = generate(sampler, NUM, TABLE, base_seed=SEED, batch_size=NUM, progress=False)
    per = (time.perf_counter() - t0) / (NUM * 2)
    print(f"\ntiny pipeline (32x32 px, 8x8 latents, CFG): {per * 1e3:.1f} ms per image per step")
    return sampler, out


@pytest.fixture(scope="module")
def den(folder):
    return load_diffusers_denoiser(folder, prompts=TABLE)


def _teacher_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)


def test_cfg_fields_and_nfe():
    assert PipelineCfg().nfe == 100 and PipelineCfg(guidance=1.0).nfe == 50
    assert PipelineCfg(**PUBLISHED["dmd2-sdxl-1step"]).nfe == 1
    assert PipelineCfg(**PUBLISHED["sdxl-lightning-4step"]).nfe == 4
    with pytest.raises(ValueError, match="sampler.dtype"):
        PipelineCfg(dtype="fp16")
    with pytest.raises(ValueError, match="sampler.steps"):
        PipelineCfg(steps=0)


def test_batch_size_and_shards_are_byte_identical(folder, teacher_images, tmp_path):
    sampler, ref = teacher_images
    assert ref["arr_0"].shape == (NUM, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    assert ref["arr_0"].std() > 5  # not a constant image
    assert ref["arr_1"].tolist() == [10, 11, 12, 10, 11, 12, 10]
    one = generate(sampler, NUM, TABLE, base_seed=SEED, batch_size=1, progress=False)
    assert np.array_equal(one["arr_0"], ref["arr_0"])
    parts = []
    for k in range(3):
        part = generate(sampler, NUM, TABLE, base_seed=SEED, batch_size=2, shard=(k, 3), progress=False)
        parts.append(tmp_path / f"s{k}.npz")
        save_npz(parts[-1], part)
    merged = merge_npz(parts, tmp_path / "all.npz")
    for key in ("arr_0", "arr_1", "seeds"):
        assert np.array_equal(merged[key], ref[key])
    assert str(merged["conditions_sha256"]) == TABLE.sha256


def test_guidance_changes_images(folder, teacher_images):
    _, ref = teacher_images
    g1 = generate(pipeline_sampler(folder, PipelineCfg(steps=2, guidance=1.0), TABLE), NUM, TABLE,
                  base_seed=SEED, batch_size=NUM, progress=False)
    assert not np.array_equal(g1["arr_0"], ref["arr_0"])


@pytest.mark.parametrize("guidance", [0.0, 6.0])
def test_one_euler_step_is_the_adapter(folder, den, teacher_images, guidance):
    """Euler, trailing spacing, 1 step: the pipeline scales z by init_noise_sigma = sigma_max and
    returns D(sigma_max z; sigma_max) (Euler to sigma 0), so its images equal the adapter's."""
    cfg = PipelineCfg(steps=1, guidance=guidance, scheduler="EulerDiscreteScheduler",
                      scheduler_kwargs={"timestep_spacing": "trailing"})
    sampler = pipeline_sampler(folder, cfg, TABLE)
    assert sampler.pipeline.scheduler.init_noise_sigma == pytest.approx(den.sigma_max, rel=1e-6)
    cond, rnd_seeds = torch.tensor([10, 12]), [5, 6]
    imgs = sampler(cond, StackedRandom(rnd_seeds))
    z = StackedRandom(rnd_seeds).randn((4, 8, 8))
    with torch.no_grad():
        ref = den.decode(den(z * den.sigma_max, den.sigma_max, cond, guidance=guidance if guidance > 1 else None))
    torch.testing.assert_close(imgs, ref, atol=1e-5, rtol=1e-5)
    # SDXL's default "leading" spacing, 2 steps: timesteps (501, 1), so the pipeline starts at
    # sqrt(sigma_501^2 + 1), not at sigma_max (init_noise_sigma follows set_timesteps)
    leading = teacher_images[0].pipeline.scheduler
    assert leading.config.timestep_spacing == "leading" and leading.timesteps.tolist() == [501, 1]
    abar = float(leading.alphas_cumprod[501])
    assert float(leading.init_noise_sigma) == pytest.approx(math.sqrt((1 - abar) / abar + 1), rel=1e-5)


def test_lcm_one_step_at_399_is_dmd2_generator(folder, den):
    """DMD2's 1-step setting (LCMScheduler, timesteps [399], guidance 0) on raw z: x0 = (z -
    sqrt(1-abar) eps)/sqrt(abar), i.e. the adapter's D(z / c_in; sigma_399) (up to LCM's c_skip
    ~1.6e-8 boundary term)."""
    sampler = pipeline_sampler(folder, PipelineCfg(**PUBLISHED["dmd2-sdxl-1step"]), TABLE)
    assert type(sampler.pipeline.scheduler).__name__ == "LCMScheduler"
    cond, seeds = torch.tensor([11]), [9]
    imgs = sampler(cond, StackedRandom(seeds))
    assert sampler.pipeline.scheduler.timesteps.tolist() == [399]
    abar = float(sampler.pipeline.scheduler.alphas_cumprod[399])
    sigma = math.sqrt((1 - abar) / abar)
    z = StackedRandom(seeds).randn((4, 8, 8))
    with torch.no_grad():
        ref = den.decode(den(z * math.sqrt(sigma ** 2 + 1), sigma, cond))
    torch.testing.assert_close(imgs, ref, atol=1e-4, rtol=1e-4)


def test_scheduler_kwargs_and_errors(folder):
    cfg = PipelineCfg(steps=2, guidance=0.0, scheduler_kwargs={"timestep_spacing": "trailing"})
    sampler = pipeline_sampler(folder, cfg, TABLE)
    imgs = sampler(torch.tensor([10]), StackedRandom([1]))
    assert imgs.shape == (1, 3, 32, 32) and imgs.dtype == torch.float32 and imgs.abs().max() <= 1
    sched = sampler.pipeline.scheduler
    assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.timestep_spacing == "trailing"
    assert sched.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="sampler.scheduler"):
        pipeline_sampler(folder, PipelineCfg(scheduler="NoSuchScheduler"), TABLE)
    with pytest.raises(FileNotFoundError, match="sampler.pipeline"):
        pipeline_sampler(folder, PipelineCfg(pipeline=str(folder.parent / "missing")), TABLE)
    with pytest.raises(FileNotFoundError, match="sampler.unet"):
        pipeline_sampler(folder, PipelineCfg(unet=str(folder.parent / "missing.safetensors")), TABLE)
    with pytest.raises(UserError, match="prompt id 3 "):
        sampler(torch.tensor([3]), StackedRandom([1]))


def test_unet_replacements(folder, den, teacher_images, tmp_path):
    """The same perturbed UNet as a plain .safetensors, a .bin, a UNet folder and a tfd file gives
    the same images, different from the teacher's; a whole pipeline folder (`pipeline=`) works."""
    from safetensors.torch import save_file

    _, ref = teacher_images
    unet = _teacher_unet(folder)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.3)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, str(tmp_path / "u.safetensors"))
    torch.save(sd, tmp_path / "u.bin")
    unet.save_pretrained(str(tmp_path / "ufolder"))
    gen = den.copy()
    gen.unet.load_state_dict(sd)
    gen.save(tmp_path / "tfd.safetensors")
    runs = {}
    for name in ("u.safetensors", "u.bin", "ufolder", "tfd.safetensors"):
        cfg = PipelineCfg(steps=2, guidance=6.0, unet=str(tmp_path / name))
        runs[name] = generate(pipeline_sampler(folder, cfg, TABLE), 2, TABLE, base_seed=SEED, progress=False)["arr_0"]
    assert not np.array_equal(runs["u.safetensors"], ref["arr_0"][:2])
    for name in ("u.bin", "ufolder", "tfd.safetensors"):
        assert np.array_equal(runs[name], runs["u.safetensors"]), name
    whole = pipeline_sampler(folder, PipelineCfg(steps=2, guidance=6.0, pipeline=str(folder)), TABLE,
                             resolution=32)
    out = generate(whole, 2, TABLE, base_seed=SEED, progress=False)["arr_0"]
    assert np.array_equal(out, ref["arr_0"][:2])
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="sampler.unet .*do not fit"):
        pipeline_sampler(folder, PipelineCfg(unet=str(tmp_path / "bad.safetensors")), TABLE)


def test_bf16_pipeline(folder, teacher_images):
    """dtype bf16: UNet, text encoders and VAE in bf16; images still float32 in [-1, 1]."""
    sampler = pipeline_sampler(folder, PipelineCfg(steps=2, guidance=6.0, dtype="bf16"), TABLE)
    assert sampler.pipeline.unet.dtype == torch.bfloat16 and sampler.pipeline.vae.dtype == torch.bfloat16
    imgs = sampler(torch.tensor([10, 11]), StackedRandom([SEED, SEED + 1]))
    assert imgs.dtype == torch.float32 and imgs.abs().max() <= 1
    ref = torch.as_tensor(teacher_images[1]["arr_0"][:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (imgs - ref).abs().max() < 0.2
