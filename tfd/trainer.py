"""The trainer every method shares: optimisers, warm-up, clipping, precision, EMA, DDP,
checkpoint/resume, NaN guard, `stats.jsonl` and a progress bar.

A method (tfd.methods) owns networks and losses; `train_step` returns one loss per network to
update. Gradients are averaged over ranks with one flat all-reduce per network (the arithmetic of
DistributedDataParallel, without wrapping modules, so a method may run any network any number of
times per step).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from tfd import dist
from tfd.config import TrainCfg  # noqa: F401  (re-exported: the trainer's settings)
from tfd.utils import JsonlLogger, atomic_torch_save, atomic_write_json, provenance


class NonFiniteLoss(FloatingPointError):
    pass


class Trainer:
    """Runs `method.train_step` for `cfg.steps` steps in `run_dir`.

    Files: `run_dir/ckpt/training-state.pt` (resume state: networks, optimisers, EMA, RNG, step),
    `run_dir/generator.safetensors` (the exported generator, written by its `Denoiser.save`),
    `stats.jsonl`, `train.json`.
    """

    def __init__(self, method, cfg: TrainCfg, run_dir: str | Path, device="cpu",
                 eval_fn: Optional[Callable[[torch.nn.Module, int], dict]] = None, progress: bool = True):
        self.method, self.cfg, self.device, self.eval_fn = method, cfg, torch.device(device), eval_fn
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "ckpt" / "training-state.pt"
        self.progress = progress and dist.get_rank() == 0
        self.nets = method.networks()
        if "generator" not in self.nets:
            raise ValueError(f"method {method.name!r}: networks() must include 'generator'")
        if cfg.gradient_checkpointing:  # every trainable Denoiser (DMD2's fake score holds one)
            from tfd.denoiser import Denoiser
            for net in self.nets.values():
                for m in net.modules():
                    if isinstance(m, Denoiser):
                        m.set_gradient_checkpointing(True)
        if cfg.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision {cfg.precision!r} needs a GPU; use fp32 on CPU")
        self.opts = {
            name: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                    lr=cfg.lr_by_network.get(name, cfg.lr), betas=tuple(cfg.betas),
                                    weight_decay=cfg.weight_decay)
            for name, net in self.nets.items()}
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.ema = (copy.deepcopy(self.nets["generator"]).eval().requires_grad_(False)
                    if cfg.ema_halflife_steps > 0 else None)
        self.step = 0
        self.train_wall_s = 0.0
        self.updates = {name: 0 for name in self.nets}   # optimiser steps per network (DMD2: generator every 5th)
        if dist.is_distributed():  # identical initial weights on every rank
            for net in self.nets.values():
                for p in net.parameters():
                    torch.distributed.broadcast(p.data, 0)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "train_wall_s": self.train_wall_s, "updates": dict(self.updates),
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "opts": {k: v.state_dict() for k, v in self.opts.items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "data": self.method.data.generator.get_state()},
                "world_size": dist.get_world_size(), "config": asdict(self.cfg),
                "method": self.method.name, "method_params": asdict(self.method.params)}

    def load_state_dict(self, s: dict) -> None:
        if s["world_size"] != dist.get_world_size():
            raise RuntimeError(f"checkpoint was written with {s['world_size']} processes, resuming with "
                               f"{dist.get_world_size()}: resume with the same number for an exact continuation")
        self.step, self.train_wall_s, self.updates = s["step"], s["train_wall_s"], dict(s["updates"])
        for k, net in self.nets.items():
            net.load_state_dict(s["nets"][k], strict=True)
        for k, opt in self.opts.items():
            opt.load_state_dict(s["opts"][k])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"], strict=True)
        self.scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(s["rng"]["torch"])
        if s["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])
        self.method.data.generator.set_state(s["rng"]["data"])

    def _rank_ckpt_path(self) -> Path:
        """This rank's checkpoint: `training-state.pt` (rank 0) or `training-state-rank<r>.pt`."""
        rank = dist.get_rank()
        return self.ckpt_path if rank == 0 else self.ckpt_path.with_name(f"training-state-rank{rank}.pt")

    def save_checkpoint(self) -> None:
        """Per-rank RNG differs, so every rank keeps its own file; rank 0's also holds the weights."""
        state = self.state_dict()
        path = self._rank_ckpt_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, path)
        dist.barrier()

    # Settings that may change between a run and its resumption (e.g. extending `steps`).
    RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "eval_every")

    def _same_run(self, s: dict) -> bool:
        ours = {k: v for k, v in asdict(self.cfg).items() if k not in self.RESUMABLE_CHANGES}
        theirs = {k: v for k, v in s["config"].items() if k not in self.RESUMABLE_CHANGES}
        return (ours == theirs and s.get("method") == self.method.name
                and s.get("method_params") == asdict(self.method.params))

    def try_resume(self) -> bool:
        """Resume from this run's checkpoint; one written with other settings is set aside, not resumed."""
        path = self._rank_ckpt_path()
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if not self._same_run(state):
            os.replace(path, path.with_name(path.name + ".stale"))
            dist.print0(f"warning: {path} was written with other settings; starting from scratch "
                        f"(old checkpoint kept as {path.name}.stale)")
            return False
        self.load_state_dict(state)
        dist.print0(f"resumed from {path} at step {self.step}")
        return True

    def export_generator(self) -> Path:
        """Write the generator (its EMA when enabled) with its own `save()` (rank 0)."""
        net = self.ema if self.ema is not None else self.nets["generator"]
        out = self.run_dir / "generator.safetensors"
        if dist.get_rank() == 0:
            net.save(out)
        return out

    # -- one update ----------------------------------------------------------------------------
    def _lr_scale(self) -> float:
        return min(1.0, (self.step + 1) / max(self.cfg.warmup_steps, 1))

    def _allreduce_grads(self, net: torch.nn.Module) -> None:
        if not dist.is_distributed():
            return
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= dist.get_world_size()
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def _step_network(self, name: str, loss: torch.Tensor, metrics: dict) -> None:
        """Backward, all-reduce, unscale, clip, warm-up lr and one optimiser step of one network."""
        net, opt = self.nets[name], self.opts[name]
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._allreduce_grads(net)
        self.scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
            metrics[f"grad_norm/{name}"] = float(norm)
        for g in opt.param_groups:
            g["lr"] = self.cfg.lr_by_network.get(name, self.cfg.lr) * self._lr_scale()
        self.scaler.step(opt)
        self.updates[name] += 1
        metrics[f"loss/{name}"] = float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of the generator with half-life `ema_halflife_steps` iterations."""
        beta = 0.5 ** (1.0 / self.cfg.ema_halflife_steps)
        for pe, p in zip(self.ema.parameters(), self.nets["generator"].parameters()):
            pe.lerp_(p, 1 - beta)

    def train_one_step(self) -> dict:
        """One training iteration: `make_batch`, `train_step` under autocast, the NaN guard, then
        one optimiser step per returned loss (in dict order) and the EMA. Returns the metrics."""
        batch = self.method.make_batch()
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            out = self.method.train_step(batch, self.step)
        bad = {k: float(v.detach()) for k, v in out.losses.items() if not torch.isfinite(v.detach()).all()}
        if bad:
            raise NonFiniteLoss(f"non-finite loss at step {self.step}: {bad}; stopping. The last good "
                                f"checkpoint is {self.ckpt_path if self.ckpt_path.exists() else '(none yet)'}; "
                                "lower the learning rate or use fp32/bf16 and resume.")
        metrics = dict(out.metrics)
        for name, loss in out.losses.items():
            self._step_network(name, loss, metrics)
        self.scaler.update()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return metrics

    # -- loop ----------------------------------------------------------------------------------
    def _record_convergence(self, conv) -> None:
        """One point of the convergence record: the eval_fn's FID of the generator (its EMA when
        enabled) at this iteration, with the generator update count and the training wall time."""
        net = self.ema if self.ema is not None else self.nets["generator"]
        conv.write({"step": self.step, "generator_updates": self.updates["generator"],
                    "train_wall_s": self.train_wall_s, **self.eval_fn(net, self.step)})

    def fit(self, resume: bool = True) -> dict:
        """Train to `cfg.steps` iterations (resuming from this run's checkpoint by default), export
        the generator, write `train.json`; returns its contents."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1000 + dist.get_rank())  # per-rank seed offset
        if not (resume and self.try_resume()) and dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        rank0 = dist.get_rank() == 0
        log = JsonlLogger(self.run_dir / "stats.jsonl", append=self.step > 0) if rank0 else None
        conv = JsonlLogger(self.run_dir / "convergence.jsonl", append=self.step > 0) if rank0 else None
        recording = self.eval_fn is not None and cfg.eval_every > 0 and conv is not None
        if recording and self.step == 0:  # the initial generator (the EMA equals it at step 0)
            conv.write({"step": 0, "generator_updates": 0, "train_wall_s": 0.0,
                        **self.eval_fn(self.nets["generator"], 0)})
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.method.name}",
                   disable=not self.progress, mininterval=2)
        acc: dict[str, float] = {}
        cnt: dict[str, int] = {}  # per key: some metrics exist only on some steps (DMD2's generator turns)
        n_acc, t_log = 0, time.time()
        while self.step < cfg.steps:
            t0 = time.time()
            m = self.train_one_step()
            self.train_wall_s += time.time() - t0
            for k, v in m.items():
                acc[k] = acc.get(k, 0.0) + v
                cnt[k] = cnt.get(k, 0) + 1
            n_acc += 1
            bar.update(1)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                rec = {"step": self.step, **{k: v / cnt[k] for k, v in acc.items()},
                       "lr_scale": self._lr_scale(), "steps_per_s": n_acc / max(time.time() - t_log, 1e-9),
                       "train_wall_s": self.train_wall_s}
                if log:
                    log.write(rec)
                bar.set_postfix(loss=f"{rec.get('loss', 0.0):.4g}")
                acc, cnt, n_acc, t_log = {}, {}, 0, time.time()
            if recording and (self.step % cfg.eval_every == 0 or last):
                self._record_convergence(conv)
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        out = self.export_generator()
        gen_updates = self.updates["generator"]
        info = {"method": self.method.name, "iters": self.step, "network_updates": dict(self.updates),
                "generator_updates": gen_updates, "train_wall_s": self.train_wall_s,
                "wall_s_per_generator_update": self.train_wall_s / max(gen_updates, 1),
                "world_size": dist.get_world_size(), "generator": str(out),
                **provenance(train=asdict(cfg), method_params=asdict(self.method.params))}
        if dist.get_rank() == 0:
            atomic_write_json(self.run_dir / "train.json", info)
        return info
