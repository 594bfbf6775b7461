"""Train the embedded text-to-image teacher: a tiny VAE, then a tiny SDXL-topology UNet on its latents.

Both run on a CPU in minutes on the `digits_text` set (32x32 RGB digits with captions) and produce
files in the formats of the real thing, so the text-to-image track (`tfd.diffusers_denoiser`,
diffusers' `StableDiffusionXLPipeline`) runs on them unchanged.

* `train_vae`: a diffusers `AutoencoderKL` (`tfd.t2i_tiny.tiny_vae_config`) trained as a plain
  VAE: loss = mean over pixels of (decoder(z) - x)^2 with z a posterior sample, plus `kl_weight`
  x mean over latent elements of KL(q(z|x) || N(0, I)); no GAN, no LPIPS (SD's VAE adds both for
  sharpness at 256+ px; at 32 px the L2 VAE reconstructs digits well, see the reported PSNR). The
  config's `scaling_factor` is set to 1 / std of the posterior means of all training images,
  measured after training, so the diffusion model sees unit-variance latents (Rombach et al. 2022,
  Sec. 4.3.2; SDXL's 0.13025 is the same quantity for its VAE). Saved with `save_pretrained`
  (safetensors), atomically.
* `train_t2i_teacher`: a `UNet2DConditionModel` with SDXL base's topology (`tiny_unet_config`)
  trained with SDXL's objective: latents x0 = posterior mean x `scaling_factor` (encoded once);
  epsilon prediction, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t uniform in 0..999, abar from
  SDXL's scaled-linear betas 0.00085..0.012 (`sdxl_scheduler_config`); unweighted MSE (Ho et al.
  2020, Eq. 14). Conditioning exactly as diffusers' `StableDiffusionXLPipeline.encode_prompt`
  computes it (the pipeline's own method is called): prompt_embeds = penultimate hidden states of
  both tiny frozen text encoders (`tiny_text_encoders`, seeded) concatenated, pooled text_embeds
  from encoder 2, add_time_ids (H, W, 0, 0, H, W). Each step draws one caption per image at random;
  with probability `caption_dropout` both embeddings are ZERO, which is the negative the SDXL
  pipeline uses for classifier-free guidance (`force_zeros_for_empty_prompt=True`), so guided
  sampling matches training. AdamW with linear warm-up; an EMA of the UNet (half-life in steps) is
  exported. The whole `StableDiffusionXLPipeline` folder (EMA UNet, trained VAE, text encoders,
  tokenizers, SDXL's Euler scheduler) is written by `tfd.t2i_tiny.save_pipeline_folder`.

Each function also writes a JSON record next to its folder (`<folder>.json`: settings, wall time,
losses, measurements, provenance). Seeded and deterministic on the CPU: the same seed and thread
count give byte-identical folders.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval.errors import UserError
from eval.io import atomic_directory, atomic_write_json, check_folder_manifest, provenance
from eval.sample import dequantise_edm
from tfd.t2i_tiny import (
    clip_tokenizer,
    save_pipeline_folder,
    sdxl_scheduler_config,
    tiny_text_encoders,
    tiny_unet_config,
    tiny_vae_config,
)

# ----------------------------------------------------------------------------------------------
# shared helpers


def images_to_float(images_u8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC [N,H,W,C] -> float32 NCHW [N,C,H,W] in [-1, 1] (`u8 / 127.5 - 1`, the VAE's range).
    TypeError for other dtypes, ValueError for another rank."""
    a = np.asarray(images_u8_nhwc)
    if a.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {a.dtype}")
    if a.ndim != 4:
        raise UserError(f"expected NHWC images, got shape {a.shape}")
    return dequantise_edm(torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))))


def save_pretrained_atomic(model, out_dir: str | os.PathLike) -> Path:
    """`model.save_pretrained(out_dir, safe_serialization=True)` into a temporary sibling folder,
    then renamed into place (an existing `out_dir` is moved aside and deleted after), so a killed
    job leaves the old folder or the new one, never half of one. Returns `out_dir` as a Path."""
    out = Path(out_dir)
    with atomic_directory(out, manifest=True) as tmp:  # + its checksum manifest (verified on load)
        model.save_pretrained(tmp, safe_serialization=True)
    return out


def info_path(folder: str | os.PathLike) -> Path:
    """The JSON record written next to a model folder: `<folder>.json`."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".json")


def lr_warmup(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup_steps`, then constant `lr`."""
    return lr * min(1.0, (step + 1) / max(warmup_steps, 1))


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    """FloatingPointError naming `what` and `step` when `loss` is not finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss is {loss.item()} at step {step}; nothing was saved")


# ----------------------------------------------------------------------------------------------
# VAE


def vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE loss of images x [B,C,H,W] in [-1, 1] -> (total, reconstruction MSE), scalars.

    total = mean_pixels (decode(z) - x)^2 + kl_weight * mean_latent KL(N(mu, s^2) || N(0, 1)),
    z = mu + s * n with n drawn from `gen` (Kingma & Welling 2014, Eq. 10; diffusers'
    `DiagonalGaussianDistribution.kl` summed, here averaged per element)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = ((vae.decode(z).sample - x) ** 2).mean()
    kl = 0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar).mean()
    return rec + kl_weight * kl, rec


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of images x [N,C,H,W] in [-1, 1] -> float32 [N, latent_channels, h, w]
    (NOT multiplied by `scaling_factor`), in batches of `batch_size`."""
    return torch.cat([vae.encode(x[i:i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruction_psnr(vae, x: torch.Tensor, batch_size: int = 256) -> float:
    """PSNR in dB of decode(posterior mean) against x [N,C,H,W] in [-1, 1] after quantising both to
    uint8 the way samples are (`round((v + 1) * 127.5)`, clipped): 10 log10(255^2 / MSE)."""
    def u8(v):
        return ((v.clamp(-1, 1) + 1) * 127.5).round()

    se = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        rec = vae.decode(vae.encode(xb).latent_dist.mean).sample
        se += float(((u8(rec) - u8(xb)) ** 2).double().sum())
    return 10 * math.log10(255.0 ** 2 / max(se / x.numel(), 1e-12))


def train_vae(images_u8_nhwc: np.ndarray, out_dir: str | os.PathLike, vae_config: Mapping | None = None,
              steps: int = 500, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-4, seed: int = 0,
              progress: bool = True, *, warmup_steps: int = 50) -> dict:
    """Train a diffusers `AutoencoderKL` on uint8 NHWC images and save it to `out_dir`.

    `vae_config`: an `AutoencoderKL` config (default `tiny_vae_config()`: 3 blocks (16, 32, 32),
    4x downsampling, 4 latent channels); its `scaling_factor` is replaced by 1 / std(posterior
    means of all images) measured after training. Loss: `vae_loss` (L2 + `kl_weight` x KL),
    AdamW(`lr`, weight decay 0) with `warmup_steps` of linear warm-up, `steps` steps of
    `batch_size` random images. Writes `out_dir` (`save_pretrained`, safetensors, atomically) and
    `info_path(out_dir)`; returns that record: `psnr_db` (all images, posterior mean, uint8),
    `latent_std`, `latent_mean`, `scaling_factor`, `latent_shape`, `wall_s`, losses, settings,
    provenance. Raises FloatingPointError on a non-finite loss (nothing written)."""
    from diffusers import AutoencoderKL

    cfg = dict(vae_config or tiny_vae_config())
    x = images_to_float(images_u8_nhwc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=True)
    curve, recs, start = [], [], time.time()
    vae.train()
    for step in tqdm(range(steps), desc="train-vae", disable=not progress, mininterval=2):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_warmup(step, lr, warmup_steps)
        loss, rec = vae_loss(vae, x[idx], kl_weight, gen)
        _check_finite(loss, "train-vae", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recs.append(rec.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            curve.append([step + 1, float(np.mean(recs[-100:]))])
    wall = time.time() - start
    vae.eval()
    lat = encode_latents(vae, x)
    std, mean = float(lat.std()), float(lat.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "warmup_steps": warmup_steps, "wall_s": wall, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in vae.parameters()), "psnr_db": reconstruction_psnr(vae, x),
            "latent_std": std, "latent_mean": mean, "scaling_factor": 1.0 / std,
            "latent_shape": list(lat.shape[1:]), "rec_mse_curve": curve, "vae_config": dict(vae.config),
            **provenance()}
    save_pretrained_atomic(vae, out_dir)
    atomic_write_json(info_path(out_dir), info)
    return info


# ----------------------------------------------------------------------------------------------
# text-to-image teacher


def sdxl_alphas_cumprod() -> torch.Tensor:
    """abar_t, t = 0..999, float64 [1000]: SDXL's scaled-linear schedule (betas = linspace(sqrt
    0.00085, sqrt 0.012, 1000)^2), taken from diffusers' `EulerDiscreteScheduler` built from
    `sdxl_scheduler_config()` (the scheduler saved with the pipeline)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(sdxl_scheduler_config()).alphas_cumprod.to(torch.float64)


@torch.no_grad()
def encode_captions(pipe, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (prompt_embeds float32 [M,77,D1+D2], pooled text_embeds float32 [M,P2]) through
    the pipeline's own `StableDiffusionXLPipeline.encode_prompt` (no CFG, clip_skip None)."""
    pe, pooled = [], []
    for i in range(0, len(texts), batch_size):
        p, _, q, _ = pipe.encode_prompt(list(texts[i:i + batch_size]), device=torch.device("cpu"),
                                        num_images_per_prompt=1, do_classifier_free_guidance=False)
        pe.append(p.float())
        pooled.append(q.float())
    return torch.cat(pe), torch.cat(pooled)


def caption_table(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Ragged captions (image i has `captions[i]`, >= 1) -> (unique caption texts in first-seen
    order, int64 [M] caption id of every (image, caption) pair flattened, int64 [N+1] offsets of
    each image's pairs). ValueError when an image has no caption."""
    if any(len(c) == 0 for c in captions):
        raise UserError("every image needs at least one caption")
    ids: dict[str, int] = {}
    flat = [ids.setdefault(c, len(ids)) for caps in captions for c in caps]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in captions])])
    return list(ids), torch.as_tensor(flat, dtype=torch.int64), torch.as_tensor(offsets, dtype=torch.int64)


def drop_captions(prompt_embeds: torch.Tensor, pooled: torch.Tensor, p: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption dropout: each row of prompt_embeds [B,77,D] and pooled [B,P] is set to ZERO with
    probability p (SDXL's unconditional embedding with `force_zeros_for_empty_prompt`).
    Returns (prompt_embeds, pooled, dropped bool [B]); the inputs are not modified."""
    drop = torch.rand(len(pooled), generator=gen) < p
    keep = (~drop).to(prompt_embeds.dtype)
    return prompt_embeds * keep[:, None, None], pooled * keep[:, None], drop


def eps_loss(unet, x0: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor,
             abar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SDXL's epsilon-prediction DDPM loss (Ho et al. 2020, Eq. 14): t ~ U{0..999}, eps ~ N(0, I),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, mean (unet(x_t, t, cond) - eps)^2.
    x0 [B,4,h,w] scaled latents, prompt_embeds [B,77,D], pooled [B,P], time_ids [B,6], abar [1000]."""
    t = torch.randint(0, len(abar), (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].to(x0.dtype)[:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = unet(xt, t, encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return ((pred - eps) ** 2).mean()


# The teacher's UNet: SDXL's topology (3 blocks, cross-attention in the lower two and the middle)
# at 1.75M parameters. Measured on a 2-core CPU (2 threads, digits-text, the defaults below): 2000
# steps of 64 in 240 s; 400 samples (Euler, 20 steps) are 99.5% class-correct at guidance 6 (91% at
# guidance 1). tiny_unet_config's default ((32, 64, 128), 2 layers per block, 8.1M) costs 2.7x more
# per step, and every distillation method pays for the teacher's size again.
TEACHER_UNET = {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "transformer_layers_per_block": (1, 1, 1)}


def teacher_unet_config(latent_shape: Sequence[int], text_hidden: tuple[int, int],
                        overrides: Mapping | None = None) -> dict:
    """`tiny_unet_config` for latents [C,h,w] and text widths: `TEACHER_UNET` with `overrides` over
    it (keyword arguments of `tiny_unet_config`: block_out_channels, layers_per_block,
    transformer_layers_per_block, addition_time_embed_dim, norm_num_groups). ValueError when an
    override contradicts the latents (`sample_size`, `in_channels`) or the text encoders
    (`text_hidden`)."""
    base = {"sample_size": int(latent_shape[-1]), "in_channels": int(latent_shape[0]),
            "text_hidden": tuple(int(h) for h in text_hidden)}
    over = {**TEACHER_UNET, **(overrides or {})}
    for k, v in base.items():
        if k in over and (tuple(over[k]) if k == "text_hidden" else int(over[k])) != v:
            raise UserError(f"unet_config_overrides[{k!r}] = {over[k]!r} contradicts the data ({v!r})")
    return tiny_unet_config(**{**over, **base})


def ema_update(ema, net, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, parameter by parameter (in place, no grad)."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - beta)


def train_t2i_teacher(images_u8_nhwc: np.ndarray, captions: Sequence[Sequence[str]], vae_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, unet_config_overrides: Mapping | None = None, steps: int = 2000,
                      batch_size: int = 64, lr: float = 1e-3, caption_dropout: float = 0.1,
                      ema_halflife_steps: float = 250.0, seed: int = 0, progress: bool = True, *,
                      text_seed: int = 0, text_hidden: tuple[int, int] = (32, 64), warmup_steps: int = 100,
                      weight_decay: float = 0.01) -> dict:
    """Train the tiny SDXL-topology teacher (see the module docstring) and save its pipeline folder.

    images_u8_nhwc uint8 [N,H,W,3], captions N lists of >= 1 caption, `vae_dir` a `train_vae`
    folder. The UNet is `teacher_unet_config(latents, text_hidden, unet_config_overrides)`
    initialised with `seed`; text encoders `tiny_text_encoders(text_seed, text_hidden)` (frozen).
    AdamW(`lr`, `weight_decay`), `warmup_steps` of linear warm-up, `steps` steps of `batch_size`
    random images with one random caption each; `caption_dropout` of them get zero embeddings;
    EMA with half-life `ema_halflife_steps` steps. Writes the `StableDiffusionXLPipeline` folder
    `out_dir` (EMA UNet) and `info_path(out_dir)`; returns that record. ValueError for mismatched
    inputs, FloatingPointError on a non-finite loss (nothing written)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if len(images_u8_nhwc) != len(captions):
        raise UserError(f"{len(images_u8_nhwc)} images but {len(captions)} caption lists")
    check_folder_manifest(vae_dir, "VAE folder")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    x0 = encode_latents(vae, images_to_float(images_u8_nhwc)) * vae.config.scaling_factor
    te1, te2 = tiny_text_encoders(text_seed, text_hidden)
    ucfg = teacher_unet_config(x0.shape[1:], text_hidden, unet_config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(ucfg)
    scheduler = EulerDiscreteScheduler.from_config(sdxl_scheduler_config())
    parts = dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                 tokenizer_2=clip_tokenizer(pad_token="!"), scheduler=scheduler)
    texts, cap_ids, offsets = caption_table(captions)
    pe_all, pooled_all = encode_captions(StableDiffusionXLPipeline(unet=unet, **parts), texts)
    px = float(images_u8_nhwc.shape[1])
    time_ids = torch.tensor([px, px, 0.0, 0.0, px, px]).expand(batch_size, 6)  # (H, W, 0, 0, H, W)
    ema, curve, wall = _teacher_loop(unet, x0, pe_all, pooled_all, cap_ids, offsets, time_ids, steps, batch_size,
                                     lr, weight_decay, warmup_steps, caption_dropout, ema_halflife_steps, seed,
                                     progress)
    save_pipeline_folder(out_dir, unet=ema, **parts)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup_steps": warmup_steps, "caption_dropout": caption_dropout,
            "ema_halflife_steps": ema_halflife_steps, "seed": seed, "text_seed": text_seed,
            "text_hidden": list(text_hidden), "wall_s": wall, "threads": torch.get_num_threads(),
            "unet_params": sum(p.numel() for p in unet.parameters()), "unet_config": ucfg,
            "n_images": len(captions), "n_unique_captions": len(texts), "latent_shape": list(x0.shape[1:]),
            "latent_std_scaled": float(x0.std()), "loss_curve": curve, "vae_dir": str(vae_dir), **provenance()}
    atomic_write_json(info_path(out_dir), info)
    return info


def _teacher_loop(unet, x0, pe_all, pooled_all, cap_ids, offsets, time_ids, steps, batch_size, lr, weight_decay,
                  warmup_steps, caption_dropout, ema_halflife_steps, seed, progress):
    """The optimisation of `train_t2i_teacher` -> (EMA UNet in eval mode, loss curve [[step, mean
    loss of the last 100 steps]], wall seconds)."""
    gen = torch.Generator().manual_seed(seed)
    abar = sdxl_alphas_cumprod()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    beta = 0.5 ** (1.0 / max(ema_halflife_steps, 1e-8))
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    counts = offsets[1:] - offsets[:-1]
    losses, curve, start = [], [], time.time()
    unet.train()
    bar = tqdm(range(steps), desc="train-t2i-teacher", disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.randint(len(x0), (batch_size,), generator=gen)
        cid = cap_ids[offsets[idx] + (torch.rand(batch_size, generator=gen) * counts[idx]).long()]
        pe, pooled, _ = drop_captions(pe_all[cid], pooled_all[cid], caption_dropout, gen)
        for g in opt.param_groups:
            g["lr"] = lr_warmup(step, lr, warmup_steps)
        loss = eps_loss(unet, x0[idx], pe, pooled, time_ids, abar, gen)
        _check_finite(loss, "train-t2i-teacher", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, unet, beta)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            curve.append([step + 1, float(np.mean(losses[-100:]))])
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
    return ema, curve, time.time() - start
