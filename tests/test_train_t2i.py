"""Training the embedded text-to-image teacher (`tfd.train_t2i`): a few steps of the VAE and of the
tiny SDXL-topology UNet write loadable, byte-reproducible folders; the conditioning is the
pipeline's own; caption dropout gives SDXL's zero negative."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch

from tfd.train_t2i import (
    TEACHER_UNET,
    caption_table,
    drop_captions,
    encode_latents,
    images_to_float,
    info_path,
    sdxl_alphas_cumprod,
    teacher_unet_config,
    train_t2i_teacher,
    train_vae,
)

WORDS = ("zero", "one", "two")
UNET_SMALL = {"block_out_channels": (16, 16, 16)}


def standin(n: int = 12):
    """n sklearn digits (classes 0-2), nearest-neighbour upsampled 8 -> 32, grey -> RGB uint8
    [n,32,32,3], and two captions each naming the class word."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.flatnonzero(d.target < 3)[:n]
    u8 = (d.images[idx] * (255 / 16)).round().astype(np.uint8).repeat(4, 1).repeat(4, 2)
    caps = [[f"a {WORDS[y]}", f"a handwritten {WORDS[y]}"] for y in d.target[idx]]
    return np.repeat(u8[..., None], 3, -1), caps


def folder_bytes(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data():
    return standin()


@pytest.fixture(scope="module")
def vae_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    train_vae(data[0], out, steps=2, batch_size=4, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(data, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "pipeline"
    info = train_t2i_teacher(data[0], data[1], vae_dir, out, UNET_SMALL, steps=3, batch_size=4, seed=0,
                             progress=False, caption_dropout=0.5)
    return out, info


def test_vae_folder_loads_and_scaling_factor_is_measured(data, vae_dir):
    import json

    from diffusers import AutoencoderKL

    info = json.loads(info_path(vae_dir).read_text())
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    assert (vae_dir / "diffusion_pytorch_model.safetensors").is_file()
    lat = encode_latents(vae, images_to_float(data[0]))
    assert lat.shape[1:] == (4, 8, 8) and info["latent_shape"] == [4, 8, 8]
    assert vae.config.scaling_factor == pytest.approx(1 / float(lat.std()), rel=1e-5)
    assert info["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert math.isfinite(info["psnr_db"]) and info["steps"] == 2


def test_vae_same_seed_byte_identical(data, vae_dir, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    train_vae(data[0], again, steps=2, batch_size=4, seed=0, progress=False)
    train_vae(data[0], other, steps=2, batch_size=4, seed=1, progress=False)
    assert folder_bytes(again) == folder_bytes(vae_dir)
    assert folder_bytes(other) != folder_bytes(vae_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_teacher_pipeline_runs_with_diffusers(teacher):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder, info = teacher
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.config.force_zeros_for_empty_prompt
    assert tuple(pipe.unet.config.block_out_channels) == (16, 16, 16) and pipe.unet.config.sample_size == 8
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(prompt=["a one", "a two"], height=32, width=32, num_inference_steps=2, guidance_scale=6.0,
               generator=gens, output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    assert info["n_unique_captions"] == 6 and info["latent_shape"] == [4, 8, 8] and info_path(folder).is_file()


def test_teacher_same_seed_byte_identical(data, vae_dir, teacher, tmp_path):
    again = tmp_path / "again"
    train_t2i_teacher(data[0], data[1], vae_dir, again, UNET_SMALL, steps=3, batch_size=4, seed=0, progress=False,
                      caption_dropout=0.5)
    assert folder_bytes(again) == folder_bytes(teacher[0])


def test_training_conditioning_is_the_pipelines(data, teacher):
    """The saved text encoders are the seeded ones training used, and the folder's pipeline
    encodes a caption to what training fed the UNet."""
    from diffusers import StableDiffusionXLPipeline

    from tfd.t2i_tiny import tiny_text_encoders
    from tfd.train_t2i import encode_captions

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher[0], local_files_only=True)
    te1, te2 = tiny_text_encoders(0)
    for ours, saved in ((te1, pipe.text_encoder), (te2, pipe.text_encoder_2)):
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in ours.state_dict().items())
    pe, pooled = encode_captions(pipe, ["a one", "a handwritten two"])
    assert pe.shape == (2, 77, 96) and pooled.shape == (2, 64)
    with torch.no_grad():
        ref = pipe.encode_prompt("a one", device=torch.device("cpu"), do_classifier_free_guidance=True)
    torch.testing.assert_close(pe[:1], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[:1], ref[2], atol=1e-5, rtol=1e-5)
    assert not ref[1].any() and not ref[3].any()  # the pipeline's negative: zeros (what dropout trains)


def test_caption_dropout_gives_zero_embeddings():
    g = torch.Generator().manual_seed(0)
    pe, pooled = torch.randn(64, 77, 8) + 1, torch.randn(64, 5) + 1
    z_pe, z_pooled, drop = drop_captions(pe, pooled, 1.0, g)
    assert drop.all() and not z_pe.any() and not z_pooled.any()
    k_pe, k_pooled, drop = drop_captions(pe, pooled, 0.0, g)
    assert not drop.any() and torch.equal(k_pe, pe) and torch.equal(k_pooled, pooled)
    h_pe, h_pooled, drop = drop_captions(pe, pooled, 0.5, g)
    assert 0 < int(drop.sum()) < 64
    assert not h_pe[drop].any() and not h_pooled[drop].any()
    assert torch.equal(h_pe[~drop], pe[~drop]) and torch.equal(h_pooled[~drop], pooled[~drop])


def test_sdxl_schedule():
    abar = sdxl_alphas_cumprod()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)
    sigma = ((1 - abar) / abar).sqrt()
    assert float(sigma[0]) == pytest.approx(0.029168, abs=1e-5) and float(sigma[-1]) == pytest.approx(14.6146, abs=1e-3)


def test_unet_config_and_caption_table():
    cfg = teacher_unet_config((4, 8, 8), (32, 64))
    assert cfg["block_out_channels"] == list(TEACHER_UNET["block_out_channels"]) and cfg["sample_size"] == 8
    assert cfg["cross_attention_dim"] == 96 and cfg["projection_class_embeddings_input_dim"] == 64 + 6 * 8
    assert teacher_unet_config((4, 8, 8), (32, 64), {"layers_per_block": 2})["layers_per_block"] == 2
    with pytest.raises(ValueError, match="sample_size"):
        teacher_unet_config((4, 8, 8), (32, 64), {"sample_size": 16})
    texts, ids, offsets = caption_table([["a", "b"], ["b"], ["c", "a", "d"]])
    assert texts == ["a", "b", "c", "d"] and ids.tolist() == [0, 1, 1, 2, 0, 3] and offsets.tolist() == [0, 2, 3, 6]
    with pytest.raises(ValueError, match="at least one caption"):
        caption_table([["a"], []])


def test_input_errors(data, vae_dir, tmp_path):
    with pytest.raises(ValueError, match="caption lists"):
        train_t2i_teacher(data[0][:3], data[1][:2], vae_dir, tmp_path / "t", steps=1, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        train_vae(data[0].astype(np.float32), tmp_path / "v", steps=1, progress=False)
