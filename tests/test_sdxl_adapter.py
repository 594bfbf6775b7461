"""The diffusers SDXL adapter (`tfd.diffusers_denoiser`) on a tiny random SDXL-topology pipeline
(`tfd.t2i_tiny`), checked against formulas computed independently from diffusers' own pieces:
the scheduler's `alphas_cumprod`, the pipeline's `encode_prompt`, and direct UNet calls.

Reference: DMD2 `sd_guidance.py` x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); diffusers DDPM
`v_prediction`: x0 = sqrt(abar) x_t - sqrt(1 - abar) v. Run with `pytest -s` to see the measured
hook shapes and the max abs difference of the adapter check.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from eval.conditions import PromptTable
from eval.errors import UserError
from tfd.denoiser import load_denoiser
from tfd.diffusers_denoiser import (
    FORMAT,
    DiffusersDenoiser,
    load_diffusers_denoiser,
    load_pipeline_components,
    torch_dtype,
)
from tfd.t2i_tiny import build_random_pipeline_folder, clip_tokenizer

TABLE = PromptTable(ids=(3, 5, 7), texts=("a photo of a cat", "a dog on a beach", "a red car"))
PX = 32  # pixel size of the tiny pipeline: 8x8 latents, VAE factor 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline_folder(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


@pytest.fixture(scope="module")
def den(folder):
    return load_diffusers_denoiser(folder, prompts=TABLE)


@pytest.fixture(scope="module")
def ref(folder):
    """Independent pieces: diffusers' pipeline (for encode_prompt, the UNet) and abar from a
    DDPMScheduler built from the folder's scheduler config."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    abar = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler").alphas_cumprod.double()
    return pipe, abar


def _ref_eps(pipe, x_t, t, prompts, zero=False):
    """unet(x_t, t) with the pipeline's own prompt encoding (zeros for `zero`), float32."""
    pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    if zero:
        pe, pooled = torch.zeros_like(pe), torch.zeros_like(pooled)
    ids = torch.tensor([[PX, PX, 0, 0, PX, PX]], dtype=torch.float32).expand(len(prompts), 6)
    t = torch.as_tensor(t, dtype=torch.float32).expand(len(prompts))
    with torch.no_grad():
        return pipe.unet(x_t, t, encoder_hidden_states=pe,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def _sigma(abar, t):
    return math.sqrt((1 - float(abar[t])) / float(abar[t]))


def test_sigma_range_and_shapes(den):
    assert den.sigma_min == pytest.approx(0.029168, abs=1e-4)
    assert den.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert den.sigma_data == 1.0 and den.has_uncond
    assert den.sample_shape == (4, 8, 8)
    t = den.sigma_to_t(torch.tensor([1.0, 2.0, 100.0, 1e-4]))
    torch.testing.assert_close(t, torch.tensor([353.89, 562.29, 999.0, 0.0]), atol=0.01, rtol=0)


def test_matches_dmd2_x0_formula(den, ref):
    """D(x; sigma_t, c) == (x_t - sqrt(1-abar) eps(x_t, t)) / sqrt(abar) with x_t = sqrt(abar) x,
    at t = 0, 399, 999, and at a sigma 30% of the way (in log sigma) from t=399 to t=400."""
    pipe, abar = ref
    cond = torch.tensor([3, 5])
    prompts = TABLE.captions(cond)
    diffs = {}
    for t in (0, 399, 999):
        sigma = _sigma(abar, t)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t)) * math.sqrt(sigma ** 2 + 1)
        x_t = x * math.sqrt(float(abar[t]))
        x0 = (x_t - math.sqrt(1 - float(abar[t])) * _ref_eps(pipe, x_t, t, prompts)) / math.sqrt(float(abar[t]))
        with torch.no_grad():
            d = den(x, sigma, cond)
        diffs[t] = ((d - x0).abs().max().item(), x0.abs().max().item())
        torch.testing.assert_close(d, x0, atol=1e-5, rtol=1e-5)
    lo, hi = math.log(_sigma(abar, 399)), math.log(_sigma(abar, 400))
    sigma = math.exp(0.7 * lo + 0.3 * hi)
    assert den.sigma_to_t(torch.tensor([sigma])).item() == pytest.approx(399.3, abs=1e-4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    c_in = 1 / math.sqrt(sigma ** 2 + 1)
    x0 = x - sigma * _ref_eps(pipe, x * c_in, 399.3, prompts)
    with torch.no_grad():
        d = den(x, sigma, cond)
    diffs[399.3] = ((d - x0).abs().max().item(), x0.abs().max().item())
    torch.testing.assert_close(d, x0, atol=1e-5, rtol=1e-5)
    print("\nadapter vs DMD2 x0 formula, t: (max abs diff, max |x0|): "
          + ", ".join(f"{t}: ({a:.1e}, {m:.1f})" for t, (a, m) in diffs.items()))
    # one sigma per sample == separate calls
    sig = torch.tensor([_sigma(abar, 999), _sigma(abar, 0)])
    with torch.no_grad():
        both = den(x, sig, cond)
        torch.testing.assert_close(both[:1], den(x[:1], sig[0], cond[:1]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(both[1:], den(x[1:], sig[1], cond[1:]), atol=1e-4, rtol=1e-5)


def test_guidance(den, ref):
    """guidance 1 == unguided; guidance w == u + w (c - u) with SDXL's zero uncond embeddings."""
    pipe, abar = ref
    cond = torch.tensor([7, 3])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    sigma = _sigma(abar, 500)
    with torch.no_grad():
        plain = den(x, sigma, cond)
        assert torch.equal(den(x, sigma, cond, guidance=1.0), plain)
        guided = den(x, sigma, cond, guidance=6.0)
    x_t = x / math.sqrt(sigma ** 2 + 1)
    d_c = x - sigma * _ref_eps(pipe, x_t, 500, TABLE.captions(cond))
    d_u = x - sigma * _ref_eps(pipe, x_t, 500, TABLE.captions(cond), zero=True)
    torch.testing.assert_close(guided, d_u + 6.0 * (d_c - d_u), atol=1e-4, rtol=1e-5)
    assert (guided - plain).abs().max() > 1e-3


def test_hook_shapes_and_layers(den):
    x = torch.randn(2, 4, 8, 8)
    layers = ["down_blocks.2", "mid_block", "up_blocks.0"]
    with torch.no_grad():
        t0 = time.perf_counter()
        den(x, 1.0, torch.tensor([3, 5]))
        ms = (time.perf_counter() - t0) * 1e3
        feats = den.features(x, 1.0, torch.tensor([3, 5]), layers)
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    print(f"\nhook shapes (B=2, 8x8 latents): {shapes}; D() forward {ms:.1f} ms "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    assert shapes == {"down_blocks.2": (2, 128, 2, 2), "mid_block": (2, 128, 2, 2), "up_blocks.0": (2, 128, 4, 4)}
    assert den.resolve_layer("unet.mid_block")[0] == "mid_block"
    assert den.resolve_layer("down_blocks.1.attentions.0")[1] is den.unet.down_blocks[1].attentions[0]
    with pytest.raises(ValueError, match="top-level modules: .*mid_block"):
        den.resolve_layer("enc:6")
    assert "mid_block = UNetMidBlock2DCrossAttn" in den.layer_names()


def test_conditioning_errors_and_cache(folder, den):
    parts = load_pipeline_components(folder)
    bare = DiffusersDenoiser(**parts)
    with pytest.raises(ValueError, match="no prompts are bound"):
        bare.encode_cond(torch.tensor([3]))
    with pytest.raises(ValueError, match="text-conditional"):
        den.encode_cond(None)
    with pytest.raises(UserError, match="prompt id 4 "):
        den.encode_cond(torch.tensor([3, 4]))
    c = den.encode_cond(torch.tensor([5, 5, 7]))
    assert c.prompt_embeds.shape == (3, 77, 96) and c.text_embeds.shape == (3, 64)
    assert c.time_ids.tolist()[0] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert "a dog on a beach" in den._frozen.cache
    u = den.uncond(2, "cpu")
    assert u.prompt_embeds.shape == (2, 77, 96) and not u.prompt_embeds.any() and not u.text_embeds.any()


def test_copy_shares_frozen_parts(den):
    gen = den.copy()
    assert gen._frozen is den._frozen and gen.vae is den.vae
    assert gen.training and not den.training
    names = [n for n, _ in gen.named_parameters()]
    assert names and all(n.startswith("unet.") for n in names)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in gen.parameters())
    assert not any(p.requires_grad for p in den.parameters())
    assert not any(p.requires_grad for p in gen._frozen.text_encoder.parameters())
    with torch.no_grad():
        gen.unet.conv_out.bias.add_(1.0)
    assert not torch.equal(gen.unet.conv_out.bias, den.unet.conv_out.bias)


def test_save_load_roundtrip(den, tmp_path):
    gen = den.copy()
    with torch.no_grad():
        gen.unet.conv_out.bias.add_(0.5)
    path = tmp_path / "gen.safetensors"
    gen.save(path)
    loaded = load_denoiser(path, what="generator")
    assert isinstance(loaded, DiffusersDenoiser) and not loaded.training
    loaded.bind_prompts(TABLE)
    gen.frozen()  # CPU kernels may differ (~1e-6) for parameters that require grad: compare like with like
    x, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(loaded(x, 2.0, cond), gen(x, 2.0, cond))
        assert not torch.equal(loaded(x, 2.0, cond), den(x, 2.0, cond))
    from eval.io import read_safetensors_metadata
    meta = read_safetensors_metadata(path)
    assert meta["format"] == FORMAT and (path.parent / meta["pipeline"]).resolve() == Path(den.pipeline_folder)


def test_saved_generator_bytes_do_not_depend_on_the_checkout_path(den, tmp_path):
    """The file names its base pipeline relative to itself: the same run in two checkouts writes the
    same bytes, and a results tree moved as a whole still loads (What reproduces, in the README)."""
    import shutil
    gen = den.copy()
    files = []
    for where in ("a", "b/deeper"):
        root = tmp_path / where
        shutil.copytree(den.pipeline_folder, root / "results/teacher/pipeline")
        moved = load_diffusers_denoiser(root / "results/teacher/pipeline")
        gen.pipeline_folder = moved.pipeline_folder
        files.append(root / "results/run/generator.safetensors")
        files[-1].parent.mkdir(parents=True)
        gen.save(files[-1])
    assert files[0].read_bytes() == files[1].read_bytes()
    shutil.move(tmp_path / "a", tmp_path / "moved")
    loaded = load_denoiser(tmp_path / "moved/results/run/generator.safetensors", what="generator")
    assert Path(loaded.pipeline_folder) == (tmp_path / "moved/results/teacher/pipeline").resolve()
    shutil.rmtree(tmp_path / "moved/results/teacher")
    with pytest.raises(FileNotFoundError, match="base pipeline folder .*teacher/pipeline .*is missing"):
        load_denoiser(tmp_path / "moved/results/run/generator.safetensors", what="generator")


def test_v_prediction(folder, ref):
    """A v-prediction scheduler config: D == sqrt(abar) x_t - sqrt(1-abar) v (diffusers DDPM)."""
    from diffusers import EulerDiscreteScheduler

    pipe, abar = ref
    parts = load_pipeline_components(folder)
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    den_v = DiffusersDenoiser(**parts, prompts=TABLE)
    cond = torch.tensor([5, 7])
    for t in (0, 399, 999):
        sigma = _sigma(abar, t)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t)) * math.sqrt(sigma ** 2 + 1)
        a = float(abar[t])
        x_t = x * math.sqrt(a)
        x0 = math.sqrt(a) * x_t - math.sqrt(1 - a) * _ref_eps(pipe, x_t, t, TABLE.captions(cond))
        with torch.no_grad():
            torch.testing.assert_close(den_v(x, sigma, cond), x0, atol=1e-5, rtol=1e-5)


def test_vae_roundtrip_and_precision(folder, den):
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        img = den.decode(x)
        assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32 and img.abs().max() <= 1
        ref = den.vae.decode(x / 0.13025).sample.clamp(-1, 1)
        torch.testing.assert_close(img, ref)
        z = den.encode(img)
        assert z.shape == (2, 4, 8, 8)
        torch.testing.assert_close(z, den.vae.encode(img).latent_dist.mean * 0.13025)
    with pytest.raises(ValueError, match="vae_dtype.*fp16"):
        load_pipeline_components(folder, vae_dtype=torch.float16)
    with pytest.raises(ValueError, match="sampler.dtype"):
        torch_dtype("fp16", "sampler.dtype")
    bf = load_diffusers_denoiser(folder, prompts=TABLE, dtype=torch.bfloat16, vae_dtype=torch.bfloat16)
    assert bf.unet.dtype == torch.bfloat16
    with torch.no_grad():
        out, full = bf(x, 1.0, torch.tensor([3, 5])), den(x, 1.0, torch.tensor([3, 5]))
        assert out.dtype == torch.float32 and (out - full).abs().max() < 0.1
        assert bf.decode(x).dtype == torch.float32
    assert bf.copy().unet.dtype == torch.float32


def _linked_copy(folder, dst, skip):
    """A pipeline folder whose subfolders link to `folder`'s, except `skip` (and the checksum manifest:
    a folder assembled by hand has none)."""
    from eval.io import MANIFEST

    dst.mkdir()
    for p in folder.iterdir():
        if p.name not in (skip, MANIFEST):
            (dst / p.name).symlink_to(p)
    return dst


def test_folder_errors(folder, tmp_path):
    missing = _linked_copy(folder, tmp_path / "novae", "vae")
    with pytest.raises(FileNotFoundError, match="no vae/ subfolder"):
        load_diffusers_denoiser(missing)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers_denoiser(tmp_path / "nowhere")
    broken = _linked_copy(folder, tmp_path / "badtok", "tokenizer_2")
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(broken / "tokenizer_2")
    with pytest.raises(ValueError, match="tokenizer_2: vocabulary has 2 tokens"):
        load_pipeline_components(broken)


def test_tiny_tokenizer():
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    tok2 = clip_tokenizer(pad_token="!")
    assert tok2.pad_token_id == 0 and clip_tokenizer().pad_token_id == 49407 and tok2.vocab_size == 49408
