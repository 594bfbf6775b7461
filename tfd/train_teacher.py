"""Train the embedded teacher (a small EDM-preconditioned ADM UNet) on `digits` with the EDM loss."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from eval.errors import UserError
from tfd.config import TeacherCfg
from tfd.denoiser import EDMDenoiser
from tfd.utils import JsonlLogger, atomic_write_json, provenance


def edm_loss(net, x, cond, P_mean: float = -1.2, P_std: float = 1.2):
    """EDM training loss (Karras et al. 2022, Eq. 8 with Table 1's lambda and p_train) of a
    `Denoiser` on clean samples x `[N, *sample_shape]` with condition ids cond `[N]`; a scalar."""
    sd = net.sigma_data
    sigma = (torch.randn([x.shape[0], *([1] * (x.ndim - 1))], device=x.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    D = net.denoise(x + torch.randn_like(x) * sigma, sigma, cond)
    return (weight * (D - x) ** 2).mean()


def build_teacher_arch(cfg: TeacherCfg, label_dim: int, resolution: int, channels: int):
    """The untrained embedded teacher (`EDMPrecond`, the `digits` preset with `cfg.arch_overrides`)."""
    from tfd.networks import edm

    if cfg.arch != "digits":
        raise UserError(f"teacher.arch {cfg.arch!r}: only the 'digits' preset can be trained here")
    kwargs = edm.digits_unet_kwargs(**{"label_dim": label_dim, "img_resolution": resolution,
                                       "img_channels": channels, **cfg.arch_overrides})
    return edm.EDMPrecond(**kwargs)


def train_teacher(cfg: TeacherCfg, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  out: str | Path, progress: bool = True) -> dict:
    """Train with Adam + warm-up, keep an EMA (half-life in steps), save the EMA as the teacher.
    images `[N, C, H, W]` float32 in [-1, 1], labels `[N]` int64 class indices."""
    out = Path(out)
    t = cfg.train
    torch.manual_seed(t.seed)
    net = EDMDenoiser(build_teacher_arch(cfg, num_classes, images.shape[-1], images.shape[1]), trainable=True).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=t.lr, betas=(0.9, 0.99), eps=1e-8)
    beta = 0.5 ** (1.0 / max(t.ema_halflife_steps, 1e-8))
    log = JsonlLogger(out.with_name("stats.jsonl"))
    gen = torch.Generator().manual_seed(t.seed)
    start, running = time.time(), 0.0
    bar = tqdm(range(t.steps), desc="train-teacher", disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.randint(len(images), (t.batch_size,), generator=gen)
        loss = edm_loss(net, images[idx], labels[idx])
        for g in opt.param_groups:
            g["lr"] = t.lr * min(1.0, (step + 1) / max(t.warmup_steps, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - beta)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-teacher: loss is {loss.item()} at step {step}; nothing was saved")
        running += loss.item()
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            n = (step % t.log_every) + 1
            rec = {"step": step + 1, "loss": running / n, "lr": opt.param_groups[0]["lr"],
                   "wall_s": time.time() - start}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            running = 0.0
    wall = time.time() - start
    ema.save(out)
    info = {"steps": t.steps, "wall_s": wall, "params": sum(p.numel() for p in net.parameters()),
            **provenance(config=asdict(cfg))}
    atomic_write_json(out.with_suffix(".json"), info)
    return info
