"""Convert EDM's pickled `EDMPrecond` to safetensors and load it into our implementation.

The safetensors file holds EDM's own state_dict keys (`model.` prefix, contiguous fp32) and, in
its metadata, `init_kwargs` (JSON constructor kwargs of `tfd.networks.edm.EDMPrecond`) and
`source` (pickle file name and sha256). Only the conversion needs EDM's code; loading does not.
"""
from __future__ import annotations

import inspect
import json
import pickle
import warnings
from pathlib import Path

import torch

from eval.errors import BadFile, UserError
from eval.io import atomic_save_safetensors, file_sha256, load_safetensors, read_safetensors_metadata

from .edm import EDMPrecond, imagenet64_adm_kwargs

FORMAT = "tfd.edm_precond.v1"
EDM_MODULES = ("dnnlib", "torch_utils", "training")
EDM_DEPS = ("requests", "distutils")  # imported by EDM's dnnlib/util.py
EDM_IMPORT_HINT = (
    "convert-edm needs the NVlabs/edm repository importable at conversion time only: "
    "`git clone https://github.com/NVlabs/edm` and run "
    "`PYTHONPATH=/path/to/edm tfd convert-edm IN.pkl OUT.safetensors`")

CONVERT_HELP = """\
Convert an EDM network pickle (e.g. edm-imagenet-64x64-cond-adm.pkl or network-snapshot-*.pkl,
a dict whose 'ema' entry is EDM's EDMPrecond with a DhariwalUNet) into a safetensors file that
tfd loads without any EDM code: EDM's state_dict keys, fp32 tensors, and the constructor kwargs
and source sha256 in the file's metadata. Unpickling needs EDM's `dnnlib` and `torch_utils`
importable, this once:

    git clone https://github.com/NVlabs/edm
    PYTHONPATH=/path/to/edm tfd convert-edm IN.pkl OUT.safetensors

Only convert pickles you trust: unpickling runs code from the file.
"""


def _plain(obj):
    """JSON-friendly copy of EDM's init kwargs (EasyDict, tuples, numpy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def _edm_init_kwargs(obj) -> dict | None:
    """Constructor kwargs recorded by EDM's `persistence` decorator (args bound by name)."""
    try:
        kwargs, args = obj.init_kwargs, getattr(obj, "init_args", ())
    except (AttributeError, AssertionError):
        return None
    if kwargs is None:
        return None
    kwargs = dict(kwargs)
    if args:
        kwargs = dict(inspect.signature(EDMPrecond).bind(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("model_kwargs", {}))
    return _plain(kwargs)


def save_edm_safetensors(net: EDMPrecond, path, source: str | None = None) -> None:
    """Write `net` as safetensors (fp32, EDM's state_dict keys) with `format`, `init_kwargs` and
    `source` in the metadata, atomically and byte-reproducibly (`eval.io.atomic_save_safetensors`)."""
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "init_kwargs": net.init_kwargs}
    if source:
        meta["source"] = source
    atomic_save_safetensors(tensors, path, meta)


def load_edm_safetensors(path, device="cpu") -> EDMPrecond:
    """Rebuild `EDMPrecond` from the file's `init_kwargs` and load its weights strictly (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM safetensors file not found: {path}")
    meta = read_safetensors_metadata(path)
    if "init_kwargs" not in meta:
        raise UserError(f"{path} has no 'init_kwargs' metadata; convert it with `tfd convert-edm`")
    kwargs = meta["init_kwargs"]
    try:
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs  # older files: a JSON string
        net = EDMPrecond(**kwargs)
    except (TypeError, ValueError) as e:
        raise BadFile(path, "init_kwargs do not describe an EDM network", key="init_kwargs", found=e) from None
    state = load_safetensors(path, "EDM network")[0]
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise BadFile(path, "tensors do not fit the network its init_kwargs describe",
                      found="; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                                  f"unexpected {unexpected[:3]}" if unexpected else "",
                                                  f"shapes {shapes[:3]}" if shapes else "") if x))
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


def convert_edm_pickle(pkl_path, out_path) -> dict:
    """Unpickle EDM's `dict(ema=EDMPrecond, ...)`, load it strictly into ours, write safetensors."""
    pkl_path, out_path = Path(pkl_path), Path(out_path)
    if not pkl_path.is_file():
        raise FileNotFoundError(f"EDM pickle not found: {pkl_path}")
    try:
        with open(pkl_path, "rb") as f:
            data = pickle.load(f)
    except ImportError as e:  # includes ModuleNotFoundError
        root = (e.name or "").split(".")[0]
        if root in EDM_MODULES:
            raise UserError(f"{EDM_IMPORT_HINT} (unpickling failed: {e})") from e
        if root in EDM_DEPS:
            raise UserError(f"EDM's dnnlib needs `{root}` at conversion time "
                               f"(`pip install requests setuptools`): {e}") from e
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        what = "an empty file" if pkl_path.stat().st_size == 0 else f"{type(e).__name__}: {e}"
        raise BadFile(pkl_path, "not an EDM network pickle (not a readable pickle)", found=what,
                      hint="give the .pkl of EDM's release (e.g. edm-imagenet-64x64-cond-adm.pkl)") from None
    if not isinstance(data, dict) or "ema" not in data:
        raise UserError(f"{pkl_path} is not an EDM network pickle (expected a dict with key 'ema')")
    ema = data["ema"]

    kwargs = _edm_init_kwargs(ema)
    if kwargs is None:
        warnings.warn(f"{pkl_path.name}: no init_kwargs recorded; assuming the ImageNet-64 ADM preset")
        kwargs = imagenet64_adm_kwargs()
    net = EDMPrecond(**kwargs)

    state = ema.state_dict()
    missing = sorted(set(net.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(net.state_dict()))
    if missing or unexpected:
        raise UserError(f"{pkl_path.name} does not match EDMPrecond({kwargs}): "
                           f"missing keys {missing}; unexpected keys {unexpected}")
    try:
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                             for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f"{pkl_path.name} does not match EDMPrecond({kwargs}): {e}") from None

    sha = file_sha256(pkl_path)
    source = f"{pkl_path.name} sha256:{sha}"
    save_edm_safetensors(net, out_path, source=source)
    return dict(out_path=str(out_path), source=source, sha256=sha, init_kwargs=net.init_kwargs,
                num_params=sum(p.numel() for p in net.parameters()), num_tensors=len(state))
