"""One interface for every network a method touches: the frozen teacher, the generator, DMD2's
fake score, CD's online and target networks.

A `Denoiser` is an `nn.Module` in the EDM convention (Karras et al. 2022, Sec. 2 and Table 1):
`denoise(x, sigma, cond) -> D(x; sigma, c)`, the estimate of the clean sample `x0` from
`x = x0 + sigma * n`. It owns everything a method must not hard-code:

- its noise range `sigma_min .. sigma_max` (EDM nets: 0.002..80; a diffusers SDXL teacher will
  bring 0.029..14.6) and `sigma_data`;
- `sample_shape`, the shape of one sample in model space (pixels `[C, H, W]` now; latents later),
  and `decode()` from model space to pixels in [-1, 1] (identity for pixel-space nets);
- how a condition is encoded: methods pass opaque integer condition ids `[N]` (int64: class
  indices, or row ids of a prompt table) and never build one-hot labels or text embeddings;
- classifier-free guidance per call (`guidance=` scale, Ho & Salimans 2022:
  `D_u + w (D_c - D_u)`), an error for a network without an unconditional branch;
- hidden features of any module path by forward hooks (`features`), with network-specific
  aliases (`enc:6`, `dec:12`, `bottleneck` on the EDM/ADM UNet);
- a trainable copy (`copy()`) and save/load (`save()`, `load_denoiser()`).

Method code never reads raw network attributes (`img_resolution`, `label_dim`, `.model`);
`tests/test_denoiser.py` greps `tfd/methods/` and `docs/method_template.py` for them.

Adding a network kind (e.g. a diffusers UNet in latent space): subclass `Denoiser` and implement
`encode_cond`, `uncond`, `_denoise`, `raw`, `resolve_layer`, `layer_names`, `save`, `decode` and
the four attributes; write a `format` of its own in `save()` and `register_denoiser_format` its
loader, so `load_denoiser` (teachers and exported generators) reads it; then let the config build
it (`TeacherCfg.kind` in `tfd/config.py` and the schema) and give the benchmark its condition list
(`tfd.runs.conditions`: a `PromptTable` for prompts).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import UserError
from eval.io import read_safetensors_metadata
from tfd.networks.convert import FORMAT as EDM_FORMAT
from tfd.networks.convert import load_edm_safetensors, save_edm_safetensors
from tfd.networks.edm import EDMPrecond, list_layers, resolve_layer


class _StopForward(Exception):
    """Raised by a feature hook once every requested layer is captured (the rest is not run)."""


class Denoiser(nn.Module):
    """Base class: the contract every network implements (see the module docstring).

    Subclasses implement `encode_cond`, `uncond`, `_denoise`, `raw`, `resolve_layer`,
    `layer_names`, `save`, and set `sigma_min`, `sigma_max`, `sigma_data`, `sample_shape`.
    """

    kind: ClassVar[str] = "abstract"
    sigma_min: float
    sigma_max: float
    sigma_data: float
    sample_shape: tuple[int, ...]
    has_uncond: bool = False

    # -- conditioning -------------------------------------------------------------------------
    def encode_cond(self, cond: torch.Tensor | None) -> Any:
        """Condition ids `[N]` int64 -> what the network takes (e.g. one-hot `[N, C]` float32)."""
        raise NotImplementedError

    def uncond(self, n: int, device) -> Any:
        """The encoded unconditional condition for `n` samples (classifier-free guidance)."""
        raise UserError(f"{type(self).__name__} has no unconditional branch: guidance is not available")

    # -- the denoiser -------------------------------------------------------------------------
    def broadcast_sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """A scalar, `[N]` or `[N, 1, ...]` sigma -> float32 `[N, 1, ..., 1]` broadcastable to x."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return s.expand(x.shape[0], *s.shape[1:])

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, c: Any) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, sigma, cond: torch.Tensor | None, guidance: float | None = None) -> torch.Tensor:
        """D(x; sigma, c) (EDM Eq. 7 convention): x `[N, *sample_shape]` float32, sigma a scalar or
        one per sample, cond `[N]` int64 condition ids -> x0 estimate, float32 like x.

        `guidance` None or 1: the conditional denoiser. Otherwise classifier-free guidance
        `D_u + w (D_c - D_u)` (Ho & Salimans 2022, Eq. 6 in x0 form), which needs an
        unconditional branch (`has_uncond`); ValueError otherwise.
        """
        s = self.broadcast_sigma(sigma, x)
        if guidance is None or guidance == 1:
            return self._denoise(x, s, self.encode_cond(cond))
        d_u = self._denoise(x, s, self.uncond(x.shape[0], x.device))
        d_c = self._denoise(x, s, self.encode_cond(cond))
        return d_u + guidance * (d_c - d_u)

    def forward(self, x, sigma, cond=None, guidance=None):
        return self.denoise(x, sigma, cond, guidance)

    def raw(self, x: torch.Tensor, sigma, cond: torch.Tensor | None) -> torch.Tensor:
        """The network's output F before the skip/out scalings, `D = c_skip x + c_out F` (EDM
        Eq. 7); consistency models wrap F in their own boundary scalings (cd.py)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels in [-1, 1], `[N, C, H, W]` float32 (identity for pixel-space nets)."""
        return x

    def discrete_sigmas(self) -> torch.Tensor:
        """The noise levels of a discrete-time model's training timesteps t = 0..T-1, ascending,
        float32 `[T]` (SDXL: 0.0292..14.61). ValueError for a continuous-time net (EDM)."""
        raise UserError(f"{type(self).__name__} is a continuous-time denoiser: it has no discrete timesteps "
                         "(use sigma_grid: karras, generator_sigma instead of generator_timestep)")

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass (memory for compute). ValueError for a network
        kind without it (the EDM/ADM UNet)."""
        if enabled:
            raise UserError(f"{type(self).__name__}: gradient checkpointing is not available for this network kind")

    def timestep_sigma(self, t: int) -> float:
        """sigma of training timestep `t` (`discrete_sigmas()[t]`); ValueError when out of range."""
        grid = self.discrete_sigmas()
        if not 0 <= int(t) < len(grid):
            raise UserError(f"timestep {t} is outside 0..{len(grid) - 1}")
        return float(grid[int(t)])

    # -- hidden features ----------------------------------------------------------------------
    def resolve_layer(self, name: str) -> tuple[str, nn.Module]:
        """A layer name (alias or module path relative to this denoiser) -> (module path, module)."""
        raise NotImplementedError

    def layer_names(self) -> list[str]:
        """Human-readable list of the layer aliases and their module paths."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, sigma, cond: torch.Tensor | None, layers: list[str],
                 return_output: bool = False, guidance: float | None = None):
        """Hidden states `{layer: Tensor [N, C_l, H_l, W_l]}` of one forward pass, by forward hooks.

        A module whose output is a tuple (diffusers down blocks) gives its `[0]`. Without
        `return_output` the forward stops as soon as every layer is captured (DMD2's
        `return_bottleneck`); with it, returns `(features, D(x; sigma, c))`. Raises ValueError
        for an unknown layer name.
        """
        feats: dict[str, torch.Tensor] = {}
        modules = {name: self.resolve_layer(name)[1] for name in layers}
        handles = []
        for name, module in modules.items():
            def hook(_m, _inp, out, name=name):
                feats[name] = out[0] if isinstance(out, (tuple, list)) else out
                if not return_output and len(feats) == len(modules):
                    raise _StopForward
            handles.append(module.register_forward_hook(hook))
        out = None
        try:
            out = self.denoise(x, sigma, cond, guidance)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return (feats, out) if return_output else feats

    # -- copies and files ---------------------------------------------------------------------
    def frozen(self) -> "Denoiser":
        """Eval mode, no gradients (the teacher); returns self."""
        self.requires_grad_(False).eval()
        return self

    def copy(self) -> "Denoiser":
        """A trainable deep copy (generator / fake score initialisation), in train mode."""
        net = copy.deepcopy(self).train()
        net.requires_grad_(True)
        return net

    def save(self, path: str | Path) -> None:
        """Write the weights (and what is needed to rebuild the network) to `path`, atomically."""
        raise NotImplementedError


class EDMDenoiser(Denoiser):
    """The EDM/ADM UNet (`tfd.networks.edm.EDMPrecond`) behind the `Denoiser` interface.

    Conditions are class indices, encoded as EDM's one-hot `[N, label_dim]` float32 (no labels
    for an unconditional net). Noise range 0.002..80 (EDM's sampler defaults). Unconditional
    branch: the zero label vector, what EDM's label dropout trains; available only for nets
    trained with `label_dropout > 0`. Files: EDM-format safetensors (`tfd.networks.convert`).
    """

    kind = "edm"

    def __init__(self, net: EDMPrecond, trainable: bool = False):
        super().__init__()
        self.net = net
        self.num_conditions = int(net.label_dim)
        self.sigma_data = float(net.sigma_data)
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.sample_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.has_uncond = self.num_conditions > 0 and float(net.init_kwargs.get("label_dropout", 0) or 0) > 0
        if not trainable:
            self.frozen()

    def encode_cond(self, cond):
        """Class indices `[N]` int -> one-hot `[N, C]` float32; None (or an unconditional net) -> None."""
        if self.num_conditions == 0 or cond is None:
            return None
        if cond.dtype.is_floating_point:  # already encoded
            return cond
        return F.one_hot(cond.long(), self.num_conditions).float()

    def uncond(self, n, device):
        if not self.has_uncond:
            return super().uncond(n, device)
        return torch.zeros([n, self.num_conditions], device=device)

    def _denoise(self, x, sigma, c):
        return self.net(x, sigma, c)

    def raw(self, x, sigma, cond):
        return self.net.raw(x, self.broadcast_sigma(sigma, x), self.encode_cond(cond))

    def resolve_layer(self, name):
        return resolve_layer(self.net, name)

    def layer_names(self):
        return list_layers(self.net)

    def save(self, path):
        save_edm_safetensors(self.net, path)


# File format (the `format` key of a safetensors file's metadata) -> loader(path, device) -> Denoiser.
# A new network kind (e.g. a diffusers UNet behind `DiffusersDenoiser`) implements the `Denoiser`
# methods above, writes its own format in `save()`, and registers its loader here.
DENOISER_FORMATS: dict[str, Callable[[Path, Any], Denoiser]] = {}


def register_denoiser_format(fmt: str, loader: Callable[[Path, Any], Denoiser]) -> None:
    """Make `load_denoiser` read files whose metadata `format` is `fmt` with `loader(path, device)`."""
    DENOISER_FORMATS[fmt] = loader


def _load_edm(path: Path, device) -> Denoiser:
    return EDMDenoiser(load_edm_safetensors(path).to(device))


register_denoiser_format(EDM_FORMAT, _load_edm)


def load_denoiser(path: str | Path, device="cpu", what: str = "teacher") -> Denoiser:
    """Load a frozen denoiser from a file, by the `format` in its metadata (`DENOISER_FORMATS`):
    EDM-format safetensors (`tfd convert-edm`, `tfd train-teacher`, or a generator exported by
    `tfd distill`).

    Raises FileNotFoundError naming `what` (teacher / generator) when the file is missing, and
    ValueError naming the file for a folder, an unreadable file or an unknown format.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; a denoiser file (safetensors) is expected "
                         f"(known formats: {', '.join(sorted(DENOISER_FORMATS))})")
    if not path.is_file():
        hint = ("set teacher.checkpoint in config.yaml; make it with `tfd convert-edm` or `tfd train-teacher`"
                if what == "teacher" else "it is written by `tfd distill`")
        raise FileNotFoundError(f"{what} checkpoint not found: {path} ({hint})")
    fmt = read_safetensors_metadata(path).get("format")
    import tfd.diffusers_denoiser  # noqa: F401  (registers "tfd.diffusers_unet.v1"; lazy: it imports this module)
    if fmt not in DENOISER_FORMATS:
        raise UserError(f"{what} {path}: unknown denoiser format {fmt!r} "
                         f"(known: {', '.join(sorted(DENOISER_FORMATS))})")
    return DENOISER_FORMATS[fmt](path, device)
