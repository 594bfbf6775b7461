"""Sharded resume checkpoints with `torch.distributed.checkpoint` (DCP), for runs under torchrun.

A checkpoint is a folder (`ckpt/training-state.dcp/`) written by every rank together:

    __<rank>_0.distcp     each rank's shard of the tensors (DCP's FileSystemWriter)
    .metadata             DCP's index of every tensor (global shapes, which file holds which chunk)
    trainer.json          written last by rank 0: step, world size, config, ... (the trainer's small
                          state) and `files`: the sha256 of every other file of the folder

Tensors: the trainable networks' weights and their AdamW state (`get_model_state_dict` /
`get_optimizer_state_dict`: keyed by parameter name, whether the network is sharded by FSDP2 or
replicated), the EMA, and each rank's RNG states under its own key (`rank<r>`). Written to
`.training-state.dcp.tmp/` and renamed into place once complete, so a killed job leaves the previous
checkpoints whole; a folder whose files do not match `trainer.json` (or that lacks it) is damaged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "trainer.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read now."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write(state: dict, meta: dict, path: Path, keep: Path | None, rank: int, barrier) -> None:
    """Save `state` (a nested dict of tensors and small objects, every rank its own view) to folder
    `path` with `dcp.save`, then rank 0 writes `trainer.json` (`meta` + the files' sha256). Goes
    through `<parent>/.<name>.tmp`; once it is complete, an existing `path` becomes `keep` (replacing
    it; `path` is removed when `keep` is None) and the new folder is renamed onto `path`. On any error the
    temporary folder is removed (rank 0), `path` and `keep` are left as they were and the error is
    raised. A collective."""
    import torch.distributed.checkpoint as dcp
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        if rank == 0:
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            text = json.dumps({**meta, "files": files}, indent=2, sort_keys=True, default=str) + "\n"
            (tmp / MANIFEST).write_text(text)
            with open(tmp / MANIFEST, "rb") as f:
                os.fsync(f.fileno())
            if keep is not None and path.exists():
                shutil.rmtree(keep, ignore_errors=True)
                os.replace(path, keep)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def read_meta(path: Path) -> tuple[dict | None, str | None]:
    """(trainer.json of checkpoint folder `path`, None) when every file listed there exists with its
    sha256 and no tensor file is missing from the list; (None, what is wrong) otherwise."""
    try:
        meta = json.loads((path / MANIFEST).read_text())
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"no readable {MANIFEST} ({type(e).__name__})"
    on_disk = {p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST}
    if on_disk != set(files):
        return None, f"files differ from {MANIFEST} (missing {sorted(set(files) - on_disk)}, " \
                     f"extra {sorted(on_disk - set(files))})"
    for name, want in files.items():
        got = sha256_file(path / name)
        if got != want:
            return None, f"checksum mismatch: {name} hashes to {got[:12]}..., {MANIFEST} says {want[:12]}..."
    return meta, None


def tensor_shapes(path: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of the tensors saved under `prefix` (e.g. "nets.generator."), from DCP's
    `.metadata`, keys without the prefix."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(prefix):]: tuple(v.size) for k, v in md.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def load(state: dict, path: Path) -> None:
    """Fill `state` (the same structure `write` saved, each tensor of the right shape) in place from
    checkpoint folder `path` (`dcp.load`; a collective)."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=str(path))


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch (and CUDA) RNG states as tensors."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    cuda = [s[k] for k in sorted((k for k in s if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
