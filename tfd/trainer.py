"""The trainer every method shares: optimisers, warm-up, clipping, precision, EMA, DDP,
checkpoint/resume, NaN guard, `stats.jsonl` and a progress bar.

A method (tfd.methods) owns networks and losses; `train_step` returns one loss per network to
update. Gradients are averaged over ranks after each network's backward, one all-reduce per bucket of
`train.bucket_cap_mb` MB (DDP's bucketing and default, `tfd.dist.all_reduce_mean_`): the extra memory
is one bucket, not a copy of every gradient.

Why not `torch.nn.parallel.DistributedDataParallel`: its reducer only reduces the gradients of a
backward that follows a call of the wrapper's `forward` (which arms it), and expects each armed
network's parameters to get gradients exactly once before the next forward. The methods do not fit
that: they call `Denoiser.denoise` / `features` (forward hooks) and submodules (DMD2's `fake.head`,
`fake.net`), never `forward`, so a wrapper would never be armed; one step runs a network several times
with and without grad (DMD2: fake score under no_grad for the DM target, with grad for its own loss and
the discriminator, with `requires_grad` switched off for the generator's GAN term; few-step students
unroll the generator), and backpropagates two losses in turn. Reducing after each network's backward
from torch.distributed's `all_reduce` is correct for all of them; it gives up DDP's overlap of
communication with the backward pass.

Faults a cluster job meets are survived, so that a resubmitted (SLURM) job makes progress: a job
killed at any point resumes from its last good checkpoint, and its logs hold each step once; a
damaged checkpoint (truncated, bit rot: checked against its sha256) is set aside and the one
before it resumed; a second trainer on the same run folder is refused (`RunBusy`); a full disk
stops the run with the `OSError` and leaves the previous checkpoint in place.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from eval.errors import UserError
from tfd import dist, fsdp, sharded_ckpt
from tfd.config import TrainCfg, params_spec  # noqa: F401  (TrainCfg re-exported: the trainer's settings)
from tfd.utils import (
    JsonlLogger,
    RunLock,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    provenance,
    seal_record,
    temp_path,
)


class NonFiniteLoss(UserError, FloatingPointError):
    """A loss of the step is NaN/inf (the message names the step, the losses and the last good checkpoint)."""


# The keys of a resume state (`Trainer.state_dict`); a checkpoint lacking one is damaged.
CKPT_KEYS = ("step", "train_wall_s", "updates", "nets", "opts", "ema", "scaler", "rng", "world_size", "config",
             "method", "method_params")


def _warn(msg: str) -> None:
    """One warning line on stderr (from the calling rank)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def checksum_path(path: Path) -> Path:
    """The checksum file of checkpoint `path`: `<name>.sha256`, one line `<hex sha256>  <name>`
    (the format of `sha256sum`, so `cd ckpt && sha256sum -c *.sha256` checks them by hand)."""
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read now (no cache: a damaged file must be seen as it is)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _read_checksum(side: Path) -> str:
    """The hex digest of a `.sha256` file; ValueError when it holds none."""
    words = side.read_text(errors="replace").split()
    if not words or len(words[0]) != 64 or any(c not in "0123456789abcdef" for c in words[0]):
        raise ValueError(f"{side}: no sha256 in it")
    return words[0]


class _HashingFile:
    """A binary file wrapper that hashes (sha256) what is written through it, in order. `hexdigest()`
    is None when the writer seeked (the bytes on disk are then not the written stream)."""

    def __init__(self, f):
        self._f, self._h, self._linear = f, hashlib.sha256(), True

    def write(self, data) -> int:
        n = self._f.write(data)
        self._h.update(memoryview(data)[:n] if n is not None else data)
        return n

    def seek(self, *args):
        self._linear = False
        return self._f.seek(*args)

    def hexdigest(self) -> str | None:
        return self._h.hexdigest() if self._linear else None

    def __getattr__(self, name):
        return getattr(self._f, name)


def _save_checkpoint_file(state: dict, path: Path) -> str:
    """`torch.save(state)` to `path` atomically (`eval.io.atomic_write`: on a full disk the OSError is
    raised and no temporary file is left), then its checksum file; returns the hex sha256."""
    digest = {}

    def write(f):
        h = _HashingFile(f)
        torch.save(state, h)
        digest["sha"] = h.hexdigest()

    atomic_write(path, write)
    sha = digest["sha"] or _sha256(path)
    atomic_write_text(checksum_path(path), f"{sha}  {path.name}\n")
    return sha


def _rotate(cur: Path, prev: Path) -> None:
    """Make the latest checkpoint `cur` the previous one `prev` (with its checksum file), before a new
    `cur` is written. Each step leaves every checksum file either matching its checkpoint or absent
    (an unverified but readable checkpoint), so a kill -9 between any two steps never makes a good
    checkpoint look damaged."""
    side_cur, side_prev = checksum_path(cur), checksum_path(prev)
    if not cur.exists():
        side_cur.unlink(missing_ok=True)  # an orphan (killed between the steps below)
        return
    side_prev.unlink(missing_ok=True)
    os.replace(cur, prev)
    try:
        sha = _read_checksum(side_cur) if side_cur.is_file() else None
    except (OSError, ValueError):
        sha = None
    if sha is not None:
        atomic_write_text(side_prev, f"{sha}  {prev.name}\n")
    side_cur.unlink(missing_ok=True)


def _set_aside(path: Path, tag: str) -> Path:
    """Rename checkpoint `path` (and its checksum file) to `<name>.<tag>`; `corrupt` never replaces an
    older one (`<name>.corrupt.1`, `.2`, ... instead), `stale` does. Returns the new path."""
    dest = path.with_name(f"{path.name}.{tag}")
    n = 0
    while tag == "corrupt" and (dest.exists() or checksum_path(dest).exists()):
        n += 1
        dest = path.with_name(f"{path.name}.{tag}.{n}")
    if dest.is_dir():  # a sharded checkpoint (a folder) set aside as `stale` before
        shutil.rmtree(dest)
    os.replace(path, dest)
    if checksum_path(path).exists():
        os.replace(checksum_path(path), checksum_path(dest))
    else:
        checksum_path(dest).unlink(missing_ok=True)
    return dest


def _plain(obj):
    """`obj` as JSON reads it back (tuples become lists): a sharded checkpoint keeps its settings in JSON."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _gather(obj) -> list:
    """`obj` of every rank, by rank (`[obj]` in one process)."""
    if not dist.is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Trainer:
    """Runs `method.train_step` for `cfg.steps` steps in `run_dir`.

    Files (rank 0 writes all but the other ranks' checkpoints; every file gets the umask's mode):

        run_dir/generator.safetensors   the exported generator (its EMA when enabled), by its `Denoiser.save`
        run_dir/train.json              iterations, updates, wall time, world size, config, provenance
                                        and its checksum `record_sha256`
        run_dir/stats.jsonl             one record per `log_every` steps: step, mean losses, lr_scale, ...
        run_dir/convergence.jsonl       one record per `eval_every` steps: step, generator updates,
                                        train_wall_s (s) and the `eval_fn` metrics (when given)
        run_dir/train.lock              the run folder's lock (flock, rank 0; see `tfd.utils.RunLock`)
        run_dir/train.lock.holder       who holds it: host, pid, start time (JSON; removed on release)
        run_dir/ckpt/training-state.pt          one process: the latest resume state: networks, optimisers,
                                                EMA, RNG, step, config (`torch.save`)
        run_dir/ckpt/training-state.pt.sha256   its sha256 (`sha256sum` format), written after it
        run_dir/ckpt/training-state.prev.pt     the checkpoint before the latest (+ `.sha256`): the fallback
        run_dir/ckpt/training-state.dcp/        under torchrun: the latest, sharded (`torch.distributed.checkpoint`,
                                                `tfd.sharded_ckpt`): every rank's shard of the weights, AdamW
                                                state and EMA, each rank's RNG, and `trainer.json` (step,
                                                config, world size, sha256 of every file) written last
        run_dir/ckpt/training-state.prev.dcp/   the sharded checkpoint before the latest: the fallback
        run_dir/ckpt/<name>.corrupt[.N]         set aside on resume: unreadable, checksum mismatch or
                                                missing keys (an older one is never replaced)
        run_dir/ckpt/<name>.stale               set aside on resume: written with other settings

    Resume (`fit(resume=True)`, `try_resume`) takes the latest checkpoint that reads back whole (and
    matches its checksum, when it has one: checkpoints of older versions have none and are resumed
    unverified), falling back to `.prev`, else starting from scratch with a warning; logs are cut back
    to the resumed step. Under torchrun rank 0 checks the sharded checkpoints and every rank loads the
    one it chose (per-rank `training-state-rank<r>.pt` files of earlier versions are still resumed,
    the ranks agreeing on one step, when no sharded one exists). A checkpoint is resumed only by as
    many processes as wrote it (the RNG streams are per rank). Errors: `RunBusy` (another trainer
    holds the folder), `eval.errors.BadFile` (folder not writable), `UserError` (resumed with another
    number of processes: the message says to resume with `torchrun --nproc_per_node N` or start
    afresh), `NonFiniteLoss`; `OSError` (disk full: ENOSPC/EFBIG) from a checkpoint write, which
    leaves no temporary file and the previous checkpoint resumable.
    """

    def __init__(self, method, cfg: TrainCfg, run_dir: str | Path, device="cpu",
                 eval_fn: Optional[Callable[[torch.nn.Module, int], dict]] = None, progress: bool = True,
                 inputs: Optional[dict[str, str]] = None):
        self.method, self.cfg, self.device, self.eval_fn = method, cfg, torch.device(device), eval_fn
        # {name: sha256} of the files the run is made from (teacher, positives, the convergence record's
        # feature net and reference statistics): a checkpoint made from other files is not resumed
        self.inputs = dict(inputs or {})
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "ckpt" / "training-state.pt"
        self.progress = progress and dist.get_rank() == 0
        self.nets = method.networks()
        # generator-loss add-ons (`runs.<run>.addons`, tfd.addons): their frozen networks are not entries
        # of `nets` (no optimiser, not checkpointed: rebuilt from their seed)
        self.addons = getattr(method, "addons", None)
        if "generator" not in self.nets:
            raise ValueError(f"method {method.name!r}: networks() must include 'generator'")
        if cfg.gradient_checkpointing:  # every trainable Denoiser (DMD2's fake score holds one)
            from tfd.denoiser import Denoiser
            for net in self.nets.values():
                for m in net.modules():
                    if isinstance(m, Denoiser):
                        m.set_gradient_checkpointing(True)
        if cfg.precision != "fp32" and self.device.type != "cuda":
            raise UserError(f"precision {cfg.precision!r} needs a GPU; use fp32 on CPU")
        if dist.is_distributed():  # identical initial weights on every rank
            for net in self.nets.values():
                for p in net.parameters():
                    torch.distributed.broadcast(p.data, 0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.ema = (copy.deepcopy(self.nets["generator"]).eval().requires_grad_(False)
                    if cfg.ema_halflife_steps > 0 else None)
        # FSDP2 (`train.shard: fsdp`) under torchrun; one process has nothing to shard and trains unsharded
        self.fsdp = cfg.shard == "fsdp" and dist.is_distributed()
        if self.fsdp:
            self._shapes = {"generator": fsdp.meta_copy(self.nets["generator"])}  # to rebuild full copies
            mesh = fsdp.mesh(self.device)
            policy = fsdp.policy(cfg.precision)
            for net in [*self.nets.values(), *([self.ema] if self.ema is not None else [])]:
                fsdp.shard(net, mesh, policy)
        self.opts = {  # after sharding: FSDP2 replaces the parameters by sharded ones (DTensor)
            name: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad],
                                    lr=cfg.lr_by_network.get(name, cfg.lr), betas=tuple(cfg.betas),
                                    weight_decay=cfg.weight_decay)
            for name, net in self.nets.items()}
        self.step = 0
        self.train_wall_s = 0.0
        self.updates = {name: 0 for name in self.nets}   # optimiser steps per network (DMD2: generator every 5th)
        # The next checkpoint keeps the latest one as `.prev`: only once this run has resumed or saved one
        # (after a fresh start the files there belong to an earlier run and are not a fallback for this one).
        self._keep_previous = False

    # -- state ---------------------------------------------------------------------------------
    def small_state(self) -> dict:
        """The resume state without tensors: step, wall time, updates, GradScaler, world size, config,
        method, its parameters, input files, add-ons (a sharded checkpoint's `trainer.json`)."""
        return {"step": self.step, "train_wall_s": self.train_wall_s, "updates": dict(self.updates),
                "scaler": self.scaler.state_dict(),
                "world_size": dist.get_world_size(), "config": asdict(self.cfg),
                "method": self.method.name, "method_params": params_spec(self.method.params), "inputs": self.inputs,
                "addons": self.addons.settings() if self.addons is not None else None}

    def state_dict(self) -> dict:
        """The whole resume state of one process (the single-file checkpoint)."""
        return {**self.small_state(),
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "opts": {k: v.state_dict() for k, v in self.opts.items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "data": self.method.data.generator.get_state()}}

    def load_state_dict(self, s: dict) -> None:
        if s["world_size"] != dist.get_world_size():
            raise UserError(self._world_size_message(s["world_size"]))
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

    def _world_size_message(self, theirs: int) -> str:
        n = dist.get_world_size()
        return (f"{self.ckpt_path.parent}: the checkpoint was written by {theirs} process(es) and this run has {n}: "
                f"resume with {theirs} (torchrun --nproc_per_node {theirs}) for an exact continuation, or start "
                f"afresh with `tfd distill --no-resume`")

    def _ckpt_files(self) -> tuple[Path, Path]:
        """This rank's latest and previous checkpoints: `training-state.pt` / `training-state.prev.pt`
        (rank 0), `training-state-rank<r>.pt` / `training-state-rank<r>.prev.pt` (rank r)."""
        rank = dist.get_rank()
        stem = "training-state" if rank == 0 else f"training-state-rank{rank}"
        return self.ckpt_path.with_name(f"{stem}.pt"), self.ckpt_path.with_name(f"{stem}.prev.pt")

    def _rank_ckpt_path(self) -> Path:
        """This rank's latest checkpoint: `training-state.pt` (rank 0) or `training-state-rank<r>.pt`."""
        return self._ckpt_files()[0]

    # -- sharded checkpoints (under torchrun: torch.distributed.checkpoint, tfd.sharded_ckpt) ----
    def _dcp_dirs(self) -> tuple[Path, Path]:
        """The latest and previous sharded checkpoints: `training-state.dcp/`, `training-state.prev.dcp/`."""
        return (self.ckpt_path.with_name("training-state.dcp"), self.ckpt_path.with_name("training-state.prev.dcp"))

    def _dcp_tensors(self, stepped: list[str]) -> dict:
        """The tensors of a sharded checkpoint, this rank's view: weights and AdamW state by parameter
        name (`torch.distributed.checkpoint.state_dict`: sharded under FSDP2, replicated otherwise),
        the EMA, and this rank's RNG states under `rng.rank<r>`. Only the optimisers named in `stepped`
        are included: `get_optimizer_state_dict` fills an empty AdamW state by a zero step (its step
        count would then differ from an uninterrupted run's; DPDMD's generator, CD's target)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        out = {"nets": {k: get_model_state_dict(net) for k, net in self.nets.items()},
               "opts": {k: get_optimizer_state_dict(self.nets[k], self.opts[k]) for k in stepped},
               "rng": {f"rank{dist.get_rank()}": {**sharded_ckpt.rng_state(),
                                                  "data": self.method.data.generator.get_state()}}}
        if self.ema is not None:
            out["ema"] = get_model_state_dict(self.ema)
        return out

    def _save_sharded(self) -> None:
        cur, prev = self._dcp_dirs()
        if dist.get_rank() == 0:
            cur.parent.mkdir(parents=True, exist_ok=True)
            if not self._keep_previous:  # an earlier run's checkpoints are no fallback for this one
                shutil.rmtree(prev, ignore_errors=True)
        stepped = [k for k, opt in self.opts.items() if opt.state]
        sharded_ckpt.write(self._dcp_tensors(stepped), {**self.small_state(), "optimizers_stepped": stepped}, cur,
                           prev if self._keep_previous else None, dist.get_rank(), dist.barrier)
        self._keep_previous = True

    def _choose_sharded(self) -> tuple[str, object]:
        """Rank 0: which sharded checkpoint to resume: ("resume", (path, trainer.json)), ("scratch", None)
        or ("error", message). Damaged ones are set aside as `.corrupt`, ones of other settings as
        `.stale` (as the single-file checkpoints)."""
        cands = [p for p in self._dcp_dirs() if p.is_dir()]
        damaged = False
        for i, path in enumerate(cands):
            meta, problem = sharded_ckpt.read_meta(path)
            missing = [k for k in (*CKPT_KEYS, "optimizers_stepped")
                       if k not in ("nets", "opts", "ema", "rng") and k not in (meta or {})]
            if problem is None and missing:
                problem = f"missing keys {missing}"
            if problem is not None:
                dest = _set_aside(path, "corrupt")
                _warn(f"{path}: damaged checkpoint, {problem}; set aside as {dest.name}")
                damaged = True
                continue
            if meta["world_size"] != dist.get_world_size():
                return "error", self._world_size_message(meta["world_size"])
            shapes = {name: {k: torch.empty(shape, device="meta") for k, shape in
                             sharded_ckpt.tensor_shapes(path, f"nets.{name}.").items()} for name in self.nets}
            reason = self._stale_reason({**meta, "nets": shapes})
            if reason is not None:
                _warn(f"{path} was written with {reason}; starting from scratch (old checkpoint kept as "
                      f"{path.name}.stale)")
                for p in cands[i:]:
                    _set_aside(p, "stale")
                return "scratch", None
            return "resume", (str(path), meta)
        if damaged:
            _warn(f"no good checkpoint left in {self.ckpt_path.parent}; starting from scratch")
        return "scratch", None

    def _try_resume_sharded(self) -> bool:
        """Resume from the sharded checkpoint rank 0 chose (`_choose_sharded`); every rank loads it."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        choice = [self._choose_sharded() if dist.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(choice, src=0)
        kind, arg = choice[0]
        if kind == "error":
            raise UserError(arg)
        if kind == "scratch":
            return False
        path, meta = arg
        tensors = self._dcp_tensors(meta["optimizers_stepped"])
        sharded_ckpt.load(tensors, Path(path))
        for k, net in self.nets.items():
            set_model_state_dict(net, tensors["nets"][k])
        for k, osd in tensors["opts"].items():
            set_optimizer_state_dict(self.nets[k], self.opts[k], osd)
        if self.ema is not None:
            set_model_state_dict(self.ema, tensors["ema"])
        mine = tensors["rng"][f"rank{dist.get_rank()}"]
        sharded_ckpt.set_rng_state(mine)
        self.method.data.generator.set_state(mine["data"])
        self.step, self.train_wall_s, self.updates = meta["step"], meta["train_wall_s"], dict(meta["updates"])
        self.scaler.load_state_dict(meta["scaler"])
        self._keep_previous = True
        dist.print0(f"resumed from {path} at step {self.step}")
        return True

    def save_checkpoint(self) -> None:
        """Under torchrun: a sharded checkpoint (`_save_sharded`, see the class docstring). In one
        process: write `training-state.pt`: the latest becomes `.prev`, the new one is written atomically,
        then its `.sha256`. Raises the OSError of a full disk (ENOSPC/EFBIG) with no temporary file left and the
        `.prev` checkpoint in place."""
        if dist.is_distributed():
            return self._save_sharded()
        state = self.state_dict()
        cur, prev = self._ckpt_files()
        cur.parent.mkdir(parents=True, exist_ok=True)
        if self._keep_previous:
            _rotate(cur, prev)
        else:  # first checkpoint after a fresh start: an earlier run's files are no fallback for this one
            for p in (checksum_path(prev), prev, checksum_path(cur)):
                p.unlink(missing_ok=True)
        _save_checkpoint_file(state, cur)
        self._keep_previous = True
        dist.barrier()

    # Settings that may change between a run and its resumption (e.g. extending `steps`).
    RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "eval_every", "bucket_cap_mb")

    def _stale_reason(self, s: dict) -> str | None:
        """Why checkpoint state `s` belongs to another run (other settings, method, parameters or
        network shapes), or None when this run can resume it."""
        theirs = {**TrainCfg.NEW_DEFAULTS, **dict(s["config"])}  # checkpoints older than an option: its default
        ours = _plain({k: v for k, v in asdict(self.cfg).items() if k not in self.RESUMABLE_CHANGES})
        theirs = _plain({k: v for k, v in theirs.items() if k not in self.RESUMABLE_CHANGES})
        if ours != theirs:
            changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            return f"other settings ({', '.join(changed)})"
        if s.get("method") != self.method.name:
            return f"another method ({s.get('method')!r})"
        if _plain(s.get("method_params")) != _plain(params_spec(self.method.params)):
            return "other method parameters"
        if _plain(s.get("addons")) != _plain(self.addons.settings() if self.addons is not None else None):
            return "other add-on settings (addons)"
        theirs_in = s.get("inputs")
        if theirs_in is not None and theirs_in != self.inputs:  # older checkpoints carry none: not checked
            changed = sorted(k for k in theirs_in.keys() | self.inputs.keys() if theirs_in.get(k) != self.inputs.get(k))
            return f"other input files ({', '.join(changed)})"
        for name, net in self.nets.items():
            mine, saved = net.state_dict(), dict(s["nets"]).get(name)
            if saved is None or mine.keys() != saved.keys() or any(
                    tuple(v.shape) != tuple(getattr(saved[k], "shape", ())) for k, v in mine.items()):
                return f"other networks ({name!r} differs)"
        return None

    def _same_run(self, s: dict) -> bool:
        return self._stale_reason(s) is None

    def _read_checkpoint(self, path: Path) -> tuple[dict | None, str | None]:
        """(state, None) when checkpoint `path` matches its `.sha256` (when it has one), loads and has
        every key of `CKPT_KEYS`; (None, what is wrong) otherwise. Permission errors and MemoryError
        propagate (the file is not at fault)."""
        side = checksum_path(path)
        if side.is_file():
            try:
                want = _read_checksum(side)
            except ValueError:
                return None, f"{side.name} holds no sha256"
            got = _sha256(path)
            if got != want:
                return None, f"checksum mismatch: {side.name} says {want[:12]}..., the file hashes to {got[:12]}..."
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except (MemoryError, PermissionError):
            raise
        except Exception as e:  # truncated zip, bad pickle, ...: torch raises many kinds
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return None, f"unreadable ({type(e).__name__}: {first})"
        if not isinstance(state, dict):
            return None, f"not a training state (a {type(state).__name__})"
        missing = [k for k in CKPT_KEYS if k not in state]
        if missing:
            return None, f"missing keys {missing}"
        return state, None

    def try_resume(self) -> bool:
        """Resume from this run's latest good checkpoint; returns whether it did.

        Candidates: `training-state.pt`, then `training-state.prev.pt` (this rank's files). A damaged one
        (unreadable, checksum mismatch, missing keys) is renamed `<name>.corrupt` with a warning and the
        next one tried; one written with other settings is set aside as `.stale` (with the older one)
        and the run starts from scratch; none good: from scratch, with a warning when one was damaged.
        Under DDP every rank resumes the same step (the newest that all ranks have), or none does.
        Raises `UserError` when the checkpoint was written by another number of processes.

        Under torchrun the checkpoint is sharded (`training-state.dcp/`, chosen by rank 0, loaded by
        all); the per-rank files of earlier versions are still resumed when no sharded one exists."""
        if any(p.is_dir() for p in self._dcp_dirs()):
            if dist.is_distributed():
                return self._try_resume_sharded()
            if not any(p.is_file() for p in self._ckpt_files()):
                for path in self._dcp_dirs():
                    meta, _ = sharded_ckpt.read_meta(path) if path.is_dir() else (None, None)
                    if meta is not None and meta.get("world_size", 1) != 1:
                        raise UserError(self._world_size_message(meta["world_size"]))
        cands = [p for p in self._ckpt_files() if p.is_file()]
        rank, i, damaged = dist.get_rank(), 0, False
        while True:
            state = None
            while state is None and i < len(cands):
                state, problem = self._read_checkpoint(cands[i])
                if problem is not None:
                    dest = _set_aside(cands[i], "corrupt")
                    _warn(f"{cands[i]}: damaged checkpoint, {problem}; set aside as {dest.name}")
                    damaged, i = True, i + 1
            mine = None if state is None else {"step": int(state["step"]), "world_size": state["world_size"],
                                               "stale": self._stale_reason(state)}
            views = _gather(mine)
            if any(v and v["stale"] for v in views):
                if mine and mine["stale"] and (rank == 0 or not (views[0] and views[0]["stale"])):
                    _warn(f"{cands[i]} was written with {mine['stale']}; starting from scratch (old checkpoint "
                          f"kept as {cands[i].name}.stale)")
                for p in cands[i:]:
                    _set_aside(p, "stale")
                return False
            bad = [v["world_size"] for v in views if v and v["world_size"] != dist.get_world_size()]
            if bad:
                raise UserError(self._world_size_message(bad[0]))
            if any(v is None for v in views):
                if state is None and damaged:
                    _warn(f"no good checkpoint left in {self.ckpt_path.parent}; starting from scratch")
                elif state is not None and rank == 0:
                    _warn(f"rank {views.index(None)} has no good checkpoint; all ranks start from scratch")
                return False
            low = min(v["step"] for v in views)
            if all(v["step"] == low for v in views):
                self.load_state_dict(state)
                self._keep_previous = True
                dist.print0(f"resumed from {cands[i]} at step {self.step}")
                return True
            if mine["step"] > low:  # another rank lacks this step: try this rank's older checkpoint
                state, i = None, i + 1

    def exported_net(self) -> torch.nn.Module:
        """The generator to export or evaluate (its EMA when enabled); under FSDP an unsharded copy
        gathered from the shards (a collective: every rank calls it)."""
        net = self.ema if self.ema is not None else self.nets["generator"]
        return fsdp.full_copy(net, self._shapes["generator"]) if self.fsdp else net

    def export_generator(self) -> Path:
        """Write the generator (its EMA when enabled) with its own `save()` (rank 0)."""
        net = self.exported_net()
        out = self.run_dir / "generator.safetensors"
        if dist.get_rank() == 0:
            net.save(out)
        return out

    # -- one update ----------------------------------------------------------------------------
    def _lr_scale(self) -> float:
        return min(1.0, (self.step + 1) / max(self.cfg.warmup_steps, 1))

    def _allreduce_grads(self, net: torch.nn.Module) -> None:
        """Average `net`'s gradients over ranks in place, one all-reduce per `bucket_cap_mb` bucket
        (`tfd.dist.all_reduce_mean_`; the gradients in reverse parameter order, as DDP's buckets)."""
        if self.fsdp:  # FSDP2 reduce-scattered (averaged) them in the backward pass
            return
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        dist.all_reduce_mean_(grads[::-1], self.cfg.bucket_cap_mb)

    def _step_network(self, name: str, loss: torch.Tensor, metrics: dict) -> None:
        """Backward, all-reduce, unscale, clip, warm-up lr and one optimiser step of one network.

        The backward accumulates gradients into this network's trainable parameters only
        (`backward(inputs=...)`): a loss that runs through another trainable network (DMD2's
        generator GAN term through the fake score) leaves that network's `.grad` untouched and its
        weight gradients are never computed. This replaces flipping `requires_grad` around the
        forward, which gradient checkpointing cannot follow: its recomputation in backward would
        see the parameters trainable again and build a different graph (CheckpointError).
        Under FSDP2 (`train.shard: fsdp`) the sharded parameters are not leaves of the graph (FSDP's
        hooks reduce-scatter the unsharded gradients into them), so the backward is plain: another
        network's stray gradients are cleared by its own step's `zero_grad` before its backward."""
        net, opt = self.nets[name], self.opts[name]
        opt.zero_grad(set_to_none=True)
        own = None if self.fsdp else [q for g in opt.param_groups for q in g["params"]]
        self.scaler.scale(loss).backward(inputs=own)
        self._allreduce_grads(net)
        self.scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
            metrics[f"grad_norm/{name}"] = float(fsdp.full(norm))
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
        """One training iteration: `make_batch` (and the add-ons' batch), `train_step` under autocast,
        the add-ons' terms added to the `generator` loss when there is one on this step, the NaN guard,
        then one optimiser step per returned loss (in dict order) and the EMA. Returns the metrics."""
        batch = self.method.make_batch()
        extra = self.addons.make_batch(self.method) if self.addons is not None else None
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            out = self.method.train_step(batch, self.step)
            if extra is not None and "generator" in out.losses:  # the generic hook on the generator loss
                add, m = self.addons.generator_loss(self.method, extra, self.step)
                if add is not None:
                    out.losses["generator"] = out.losses["generator"] + add
                    out.metrics.update(m)
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
        net = self.exported_net()  # every rank (FSDP gathers); rank 0 evaluates and writes
        if conv is not None:
            conv.write({"step": self.step, "generator_updates": self.updates["generator"],
                        "train_wall_s": self.train_wall_s, **self.eval_fn(net, self.step)})

    def _claim_run_dir(self) -> RunLock | None:
        """Rank 0 checks that the run and checkpoint folders are writable (`BadFile` otherwise) and locks
        the run folder (`RunBusy` when another trainer holds it); under DDP the other ranks raise a
        `UserError` with rank 0's message. Then every rank removes the temporary files of its outputs
        that a killed job left. Returns the lock to release (rank 0)."""
        lock, err = None, None
        if dist.get_rank() == 0:
            try:
                ensure_writable_dir(self.run_dir, "run folder")
                ensure_writable_dir(self.ckpt_path.parent, "checkpoint folder")
                lock = RunLock(self.run_dir, "run folder").acquire()
            except UserError as e:
                err = e
        if dist.is_distributed():
            msg = [None if err is None else str(err)]
            torch.distributed.broadcast_object_list(msg, src=0)
            if msg[0] is not None and err is None:
                err = UserError(f"rank 0: {msg[0]}")
        if err is not None:
            raise err
        outputs = [p for f in self._ckpt_files() for p in (f, checksum_path(f))]
        if dist.get_rank() == 0:
            outputs += [self.run_dir / n for n in ("stats.jsonl", "convergence.jsonl", "train.json",
                                                   "generator.safetensors")]
        for out in outputs:  # `.<name>.tmp<pid>` of any pid: the lock says no live trainer writes here
            pattern = temp_path(out).name.removesuffix(str(os.getpid())) + "*"
            for f in out.parent.glob(pattern):
                if f.is_file():
                    f.unlink(missing_ok=True)
        return lock

    def fit(self, resume: bool = True) -> dict:
        """Train to `cfg.steps` iterations (resuming from this run's checkpoint by default), export
        the generator, write `train.json`; returns its contents. Holds the run folder's lock
        throughout (released on return and on any exception); see the class docstring for the files
        and the errors."""
        lock = self._claim_run_dir()
        try:
            return self._fit(resume)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1000 + dist.get_rank())  # per-rank seed offset
        if resume:
            self.try_resume()
        rank0 = dist.get_rank() == 0
        # continuing: cut the logs back to the resumed step (the steps after it are trained again)
        upto = self.step if self.step > 0 else None
        log = JsonlLogger(self.run_dir / "stats.jsonl", resume_step=upto) if rank0 else None
        conv = JsonlLogger(self.run_dir / "convergence.jsonl", resume_step=upto) if rank0 else None
        recording = self.eval_fn is not None and cfg.eval_every > 0 and (conv is not None or self.fsdp)
        if recording and self.step == 0:  # the initial generator (the EMA equals it at step 0)
            self._record_convergence(conv)
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
                "world_size": dist.get_world_size(), "generator": str(out), "inputs_sha256": self.inputs,
                **provenance(train=asdict(cfg), method_params=asdict(self.method.params),
                             **({"addons": self.addons.settings()} if self.addons is not None else {}))}
        if dist.get_rank() == 0:  # with its checksum (`record_sha256`, verified by tfd.tables.read_json)
            atomic_write_json(self.run_dir / "train.json", seal_record(info))
        return info
