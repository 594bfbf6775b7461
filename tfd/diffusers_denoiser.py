"""A diffusers SDXL `UNet2DConditionModel` behind the EDM `Denoiser` interface (latent space).

The discrete-time VP model of SDXL (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t = 0..999) is
the EDM variance-exploding model x = x0 + sigma n seen through sigma_t = sqrt((1 - abar_t)/abar_t)
and x_t = x / sqrt(sigma^2 + 1) (Karras et al. 2022, Sec. 2 and App. C.3; k-diffusion's
`external.DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`). With c_in = 1/sqrt(sigma^2 + 1):

- epsilon prediction: D(x; sigma) = x - sigma * eps(c_in x, t(sigma))  (c_skip 1, c_out -sigma);
- v prediction:       D(x; sigma) = x/(sigma^2 + 1) - sigma/sqrt(sigma^2 + 1) * v(c_in x, t(sigma)).

Both equal DMD2's x0 = (x_t - sqrt(1 - abar) eps)/sqrt(abar) with x_t = c_in x (DMD2
`sd_guidance.py`; checked in tests/test_sdxl_adapter.py). t(sigma) interpolates linearly in
log-sigma between the 1000 grid points and is passed to the UNet as a float timestep (k-diffusion
`sigma_to_t`), clamped to [0, 999]. SDXL base: sigma 0.029168 .. 14.6146.

`sigma_data` is 1.0: the model space is the VAE latent times `scaling_factor` (0.13025 for SDXL),
a factor chosen to give the latents unit variance (Rombach et al. 2022, Sec. 4.3.2), and 1.0 is
what the VP/EDM correspondence above implies (k-diffusion uses sigma_data 1 for these models).

Conditioning (diffusers `StableDiffusionXLPipeline.encode_prompt`): condition ids are rows of a
bound `PromptTable`; a caption becomes `prompt_embeds` [77, D1 + D2] (penultimate hidden states of
both CLIP encoders, concatenated), `text_embeds` [P2] (encoder 2's projected pooled output) and
`time_ids` [6] = (H, W, 0, 0, H, W) of the pixel resolution. The unconditional branch is zeros for
both embeddings (SDXL's `force_zeros_for_empty_prompt`; DMD2 does the same). Text encoders, VAE and
tokenizers are frozen and *shared* between a denoiser and its copies (`copy()`, `deepcopy`): only
the UNet is a registered submodule, so `parameters()`, `state_dict()` and optimisers see the UNet
alone. They stay on the device they were loaded on; outputs are moved to the UNet's device.

Files: `save()` writes the UNet weights with metadata `format` "tfd.diffusers_unet.v1", the UNet
config and the base pipeline folder relative to the file (text encoders, VAE and scheduler come
from there);
`load_denoiser` reads it once this module is imported (it registers the format at import).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from eval.errors import UserError
from eval.io import atomic_save_safetensors, check_folder_manifest, load_safetensors, read_safetensors_metadata
from tfd.denoiser import Denoiser, register_denoiser_format

FORMAT = "tfd.diffusers_unet.v1"
CLIP_VOCAB_SIZE = 49408
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class SDXLCond(NamedTuple):
    """Encoded SDXL conditioning for N samples (float32, on the UNet's device):
    `prompt_embeds` [N, 77, D1 + D2], `text_embeds` [N, P2], `time_ids` [N, 6]."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor


class _Frozen:
    """The frozen parts a denoiser shares with its copies (deliberately not an `nn.Module`, so
    they are neither parameters nor state of the denoiser): text encoders, tokenizers, VAE, the
    bound prompt table and the caption -> embedding cache."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, cache_size: int):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.vae = vae
        self.prompts = None
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_size = int(cache_size)
        for m in (text_encoder, text_encoder_2, vae):
            m.requires_grad_(False).eval()


def torch_dtype(name, key: str = "dtype") -> torch.dtype:
    """'fp32' / 'bf16' (or a torch.dtype of those) -> torch.dtype; ValueError naming `key` for
    anything else (fp16 is refused: SDXL's VAE overflows in fp16, see the sdxl-adapter note)."""
    if isinstance(name, torch.dtype) and name in (torch.float32, torch.bfloat16):
        return name
    if isinstance(name, str) and name.lower() in _DTYPES:
        return _DTYPES[name.lower()]
    raise UserError(f"{key}: {name!r} is not supported; use 'fp32' or 'bf16' (fp16 is refused: "
                     "SDXL's VAE produces NaN in fp16)")


# -- loading a pipeline folder ----------------------------------------------------------------
def _check_folder(folder: Path, subfolders=PIPELINE_SUBFOLDERS) -> None:
    """FileNotFoundError naming the folder, or the first missing subfolder of a pipeline folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers pipeline folder not found: {folder}")
    for sub in subfolders:
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"diffusers pipeline folder {folder} has no {sub}/ subfolder "
                                    f"(a StableDiffusionXLPipeline folder needs {', '.join(PIPELINE_SUBFOLDERS)})")


def _load_tokenizer(path: Path):
    """A CLIP tokenizer from a local folder; ValueError naming the folder when its vocabulary is not
    CLIP's 49,408 tokens (offline `from_pretrained` can silently return a 2-word vocabulary)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.vocab_size != CLIP_VOCAB_SIZE:
        raise UserError(f"tokenizer {path}: vocabulary has {tok.vocab_size} tokens, expected CLIP's "
                         f"{CLIP_VOCAB_SIZE} (a broken or non-CLIP tokenizer folder)")
    return tok


def _load_scheduler(folder: Path):
    """The scheduler of a pipeline folder, by the `_class_name` in `scheduler/scheduler_config.json`."""
    import diffusers

    cfg_path = folder / "scheduler" / "scheduler_config.json"
    try:
        name = json.loads(cfg_path.read_text())["_class_name"]
        cls = getattr(diffusers, name)
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise UserError(f"{cfg_path}: not a readable diffusers scheduler config ({e!r})") from None
    return cls.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)


def load_pipeline_components(folder, device="cpu", dtype=torch.float32, vae_dtype=torch.float32,
                             load_unet: bool = True) -> dict[str, Any]:
    """The parts of a local `StableDiffusionXLPipeline` folder, loaded with `local_files_only=True`.

    Returns {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
    "scheduler"} (the pipeline's constructor keywords; no "unet" with `load_unet=False`, for a
    caller that brings its own), networks frozen, on `device`; the UNet and text encoders in
    `dtype`, the VAE in `vae_dtype` (fp32 or bf16 each; fp16 is a ValueError). Raises
    FileNotFoundError naming the folder or its missing subfolder, ValueError naming a
    tokenizer folder whose vocabulary is not CLIP's 49,408 tokens, and BadFile naming a file that
    does not match the folder's checksum manifest (a folder the suite wrote: `eval.io.MANIFEST`).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    dtype, vae_dtype = torch_dtype(dtype), torch_dtype(vae_dtype, "vae_dtype")
    _check_folder(folder, PIPELINE_SUBFOLDERS if load_unet else PIPELINE_SUBFOLDERS[1:])
    check_folder_manifest(folder, "pipeline folder")  # a folder the suite wrote: every file as written
    parts: dict[str, Any] = {
        "tokenizer": _load_tokenizer(folder / "tokenizer"),
        "tokenizer_2": _load_tokenizer(folder / "tokenizer_2"),
        "scheduler": _load_scheduler(folder),
        "text_encoder": CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                                      dtype=dtype).to(device),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            str(folder / "text_encoder_2"), local_files_only=True, dtype=dtype).to(device),
        "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True,
                                             torch_dtype=vae_dtype).to(device),
    }
    if load_unet:
        parts["unet"] = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True,
                                                             torch_dtype=dtype).to(device)
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if name in parts:
            parts[name].requires_grad_(False).eval()
    return parts


# -- the denoiser -----------------------------------------------------------------------------
class DiffusersDenoiser(Denoiser):
    """SDXL's UNet as an EDM denoiser in scaled-latent space (see the module docstring).

    Built from `load_pipeline_components` parts; use `load_diffusers_denoiser` for a folder.
    `prompts` (or `bind_prompts`) maps condition ids to captions; `cache_size` bounds the
    caption -> embedding cache (SDXL: 77 x 2048 float32 = 0.6 MB per caption).
    """

    kind = "diffusers"

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 pipeline_folder: str | Path | None = None, prompts=None, trainable: bool = False,
                 cache_size: int = 1024):
        super().__init__()
        self.unet = unet
        self._frozen = _Frozen(text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, cache_size)
        self.pipeline_folder = None if pipeline_folder is None else str(Path(pipeline_folder).resolve())
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"scheduler config of {self.pipeline_folder or '(in memory)'}: prediction_type "
                             f"{self.prediction_type!r} is not supported (epsilon or v_prediction)")
        abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        log_sigmas = (((1 - abar) / abar).sqrt()).log()
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)
        self.sigma_min, self.sigma_max = float(log_sigmas[0].exp()), float(log_sigmas[-1].exp())
        self.sigma_data = 1.0
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = int(unet.config.sample_size)
        self.sample_shape = (int(unet.config.in_channels), size, size)
        self.has_uncond = True
        if prompts is not None:
            self.bind_prompts(prompts)
        if not trainable:
            self.frozen()

    # -- frozen parts, shared by copies ---------------------------------------------------------
    @property
    def vae(self):
        return self._frozen.vae

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def __deepcopy__(self, memo):
        """Deep copy everything except the frozen shared parts (`_Frozen`), which copies share."""
        memo[id(self._frozen)] = self._frozen
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def copy(self) -> "DiffusersDenoiser":
        """A trainable copy: a deep copy of the UNet in float32 (whatever the loaded dtype), train
        mode, gradients on; text encoders, tokenizers, VAE and prompt cache are shared, frozen."""
        net = copy.deepcopy(self)
        net.unet.float()
        net.train()
        net.unet.requires_grad_(True)
        return net

    # -- conditioning ---------------------------------------------------------------------------
    def bind_prompts(self, table) -> None:
        """Use `table` (`eval.conditions.PromptTable`) to map condition ids to captions (shared
        with every copy of this denoiser; the embedding cache is keyed by caption text)."""
        self._frozen.prompts = table

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption -> (prompt_embeds [77, D1 + D2], text_embeds [P2]) float32 on the encoders'
        device, as diffusers' `StableDiffusionXLPipeline.encode_prompt` (clip_skip None): the
        penultimate hidden states (`hidden_states[-2]`) of both encoders, concatenated; the pooled
        projection of encoder 2. Captions are encoded one at a time so an embedding never depends
        on which other captions share its batch."""
        fr = self._frozen
        hidden = []
        pooled = None
        for tok, enc in ((fr.tokenizer, fr.text_encoder), (fr.tokenizer_2, fr.text_encoder_2)):
            ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(next(enc.parameters()).device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0].float())
            pooled = out[0][0].float()
        return torch.cat(hidden, dim=-1), pooled

    def _embedding(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached `_encode_text` (least recently used entries dropped beyond `cache_size`)."""
        cache = self._frozen.cache
        if text in cache:
            cache.move_to_end(text)
            return cache[text]
        with torch.no_grad():
            emb = self._encode_text(text)
        cache[text] = emb
        while len(cache) > self._frozen.cache_size:
            cache.popitem(last=False)
        return emb

    def time_ids(self, n: int, device) -> torch.Tensor:
        """SDXL micro-conditioning `[n, 6]` float32: (H, W, 0, 0, H, W) with H = W the pixel size
        of a sample (original size = target size, no crop: the pipeline's default)."""
        px = float(self.sample_shape[-1] * self.vae_scale_factor)
        return torch.tensor([px, px, 0.0, 0.0, px, px], device=device).expand(n, 6)

    def encode_cond(self, cond) -> SDXLCond:
        """Condition ids `[N]` int64 (rows of the bound prompt table) -> `SDXLCond` on the UNet's
        device. An `SDXLCond` passes through. Raises ValueError when cond is None or no prompt table
        is bound, KeyError naming an id that is not in the table."""
        if isinstance(cond, SDXLCond):
            return cond
        if cond is None:
            raise UserError("DiffusersDenoiser is text-conditional: pass condition ids (prompt table rows), not None")
        table = self._frozen.prompts
        if table is None:
            raise UserError("DiffusersDenoiser: no prompts are bound; call bind_prompts(PromptTable) (or pass "
                             "prompts= to load_diffusers_denoiser) before encoding condition ids")
        embs = [self._embedding(text) for text in table.captions(torch.as_tensor(cond).cpu().numpy())]
        dev = self.device
        pe = torch.stack([e[0] for e in embs]).to(dev)
        pooled = torch.stack([e[1] for e in embs]).to(dev)
        return SDXLCond(pe, pooled, self.time_ids(len(embs), dev))

    def uncond(self, n: int, device) -> SDXLCond:
        """Zeros for both embeddings, the same `time_ids` (SDXL `force_zeros_for_empty_prompt`;
        DMD2 "SDXL uses zero as the uncond_embedding")."""
        d = int(self.unet.config.cross_attention_dim)
        p = int(self._frozen.text_encoder_2.config.projection_dim)
        length = int(self._frozen.tokenizer.model_max_length)
        return SDXLCond(torch.zeros(n, length, d, device=device), torch.zeros(n, p, device=device),
                        self.time_ids(n, device))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """diffusers' `enable_gradient_checkpointing` / `disable_gradient_checkpointing` on the UNet."""
        (self.unet.enable_gradient_checkpointing if enabled else self.unet.disable_gradient_checkpointing)()

    @contextlib.contextmanager
    def prompts_bound(self, table):
        """Bind `table` for the duration of a `with` block (e.g. the evaluation prompts of a
        convergence record during training on the training prompts), then restore the previous one."""
        old = self._frozen.prompts
        self._frozen.prompts = table
        try:
            yield self
        finally:
            self._frozen.prompts = old

    # -- the denoiser ---------------------------------------------------------------------------
    def discrete_sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..999 (ascending), float32 on the UNet's device."""
        return self.log_sigmas.exp().float()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma `[N]` -> fractional timestep `[N]` float32 in [0, 999]: linear interpolation in
        log-sigma between the grid points, weight clamped to [0, 1] (k-diffusion `sigma_to_t`)."""
        ls = self.log_sigmas
        x = sigma.to(ls.device, torch.float64).clamp_min(1e-30).log()
        lo = (torch.searchsorted(ls, x, right=True) - 1).clamp(0, len(ls) - 2)
        w = ((x - ls[lo]) / (ls[lo + 1] - ls[lo])).clamp(0, 1)
        return (lo + w).to(torch.float32)

    def _scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for sigma `[N, 1, 1, 1]` float32 (module docstring formulas)."""
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        return c_in ** 2, -sigma * c_in, c_in

    def _unet(self, x: torch.Tensor, sigma: torch.Tensor, c: SDXLCond) -> torch.Tensor:
        """F = unet(c_in x, t(sigma), c): x `[N, C, H, W]` float32, sigma `[N, 1, 1, 1]` -> float32.
        The UNet may hold bf16 weights: inputs are cast to its dtype, the output back to float32."""
        dt = self.unet.dtype
        c_in = self._scalings(sigma)[2]
        t = self.sigma_to_t(sigma.reshape(-1)).to(x.device)
        out = self.unet((c_in * x).to(dt), t, encoder_hidden_states=c.prompt_embeds.to(dt),
                        added_cond_kwargs={"text_embeds": c.text_embeds.to(dt), "time_ids": c.time_ids.to(dt)},
                        return_dict=False)[0]
        return out.float()

    def _denoise(self, x, sigma, c):
        c_skip, c_out, _ = self._scalings(sigma)
        return c_skip * x + c_out * self._unet(x, sigma, c)

    def raw(self, x, sigma, cond):
        """The UNet's own output F (epsilon or v, float32), `D = c_skip x + c_out F`."""
        return self._unet(x, self.broadcast_sigma(sigma, x), self.encode_cond(cond))

    # -- pixels <-> latents ---------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents `[N, 4, h, w]` -> pixels `[N, 3, h*f, w*f]` float32 in [-1, 1] (clamped)
        on x's device: `vae.decode(x / scaling_factor + shift_factor)` in the VAE's dtype (fp32 or
        bf16; DMD2 and FastGen decode in fp32, SDXL's VAE overflows in fp16: ValueError)."""
        vae = self.vae
        if vae.dtype == torch.float16:
            raise UserError("DiffusersDenoiser.decode: the VAE is fp16, which overflows for SDXL; load it "
                             "with vae_dtype fp32 or bf16")
        shift = vae.config.get("shift_factor") or 0.0
        z = x.to(next(vae.parameters()).device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1).to(x.device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `[N, 3, H, W]` in [-1, 1] -> scaled latents `[N, 4, H/f, W/f]` float32: the
        posterior *mean* times `scaling_factor` (deterministic; DMD2 samples the posterior, whose
        std is tiny for SDXL's VAE)."""
        vae = self.vae
        shift = vae.config.get("shift_factor") or 0.0
        post = vae.encode(pixels.to(next(vae.parameters()).device, vae.dtype)).latent_dist
        return ((post.mean.float() - shift) * vae.config.scaling_factor).to(pixels.device)

    # -- hidden features ------------------------------------------------------------------------
    def resolve_layer(self, name: str) -> tuple[str, nn.Module]:
        """A module path on the UNet (`down_blocks.2`, `mid_block`, `up_blocks.0`, any dotted path;
        an optional `unet.` prefix) -> (path, module). ValueError listing the top-level names."""
        path = name.strip().removeprefix("unet.")
        if path:
            try:
                return path, self.unet.get_submodule(path)
            except AttributeError:
                pass
        top = [n for n, _ in self.unet.named_children()]
        raise UserError(f"unknown layer {name!r} of the diffusers UNet; use a module path such as "
                         f"'down_blocks.2', 'mid_block', 'up_blocks.0' (top-level modules: {', '.join(top)})")

    def layer_names(self) -> list[str]:
        """The UNet's blocks with their classes, e.g. `down_blocks.2 = CrossAttnDownBlock2D`."""
        names = [f"down_blocks.{i} = {type(b).__name__}" for i, b in enumerate(self.unet.down_blocks)]
        names.append(f"mid_block = {type(self.unet.mid_block).__name__}")
        names += [f"up_blocks.{i} = {type(b).__name__}" for i, b in enumerate(self.unet.up_blocks)]
        return names

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """The UNet's weights (in their dtype) as safetensors, atomically (`eval.io`), with metadata
        `format` FORMAT, `unet_config` (diffusers config dict) and `pipeline`: the base pipeline
        folder relative to the file's folder (so the file's bytes do not depend on where the checkout
        lives, and a results tree moved as a whole still loads; absolute where no relative path
        exists, e.g. another drive). UserError when the denoiser was not loaded from a folder."""
        if self.pipeline_folder is None:
            raise UserError(f"cannot save {path}: this DiffusersDenoiser has no base pipeline folder "
                             "(build it with load_diffusers_denoiser)")
        try:
            pipeline = Path(os.path.relpath(self.pipeline_folder, Path(path).resolve().parent)).as_posix()
        except ValueError:  # no relative path between them (Windows drives)
            pipeline = self.pipeline_folder
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
        config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        atomic_save_safetensors(tensors, path, {"format": FORMAT, "unet_config": config, "pipeline": pipeline,
                                                "prediction_type": self.prediction_type})


def load_diffusers_denoiser(folder, prompts=None, device="cpu", dtype=torch.float32,
                            vae_dtype=torch.float32) -> DiffusersDenoiser:
    """A frozen `DiffusersDenoiser` from a local SDXL pipeline folder (see
    `load_pipeline_components` for the dtypes and the errors); `prompts` a `PromptTable` to bind."""
    parts = load_pipeline_components(folder, device, dtype, vae_dtype)
    return DiffusersDenoiser(**parts, pipeline_folder=folder, prompts=prompts)


def load_diffusers_unet_file(path: str | Path, device="cpu", dtype=torch.float32,
                             vae_dtype=torch.float32, prompts=None) -> DiffusersDenoiser:
    """A frozen `DiffusersDenoiser` from a `save()` file: the UNet from the file (config from its
    metadata, weights cast to `dtype`), everything else from the base pipeline folder it names.
    Raises ValueError naming the file for another format, FileNotFoundError naming the file and
    its missing base pipeline folder."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    folder = Path(meta.get("pipeline") or "")
    if meta.get("pipeline"):  # relative to the file's folder (`save`); an absolute path stays as it is
        folder = path.resolve().parent / folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: its base pipeline folder {folder} (metadata 'pipeline') is missing")
    parts = load_pipeline_components(folder, device, dtype, vae_dtype, load_unet=False)
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    unet.load_state_dict(load_safetensors(path, "UNet")[0], strict=True)
    parts["unet"] = unet.to(device=device, dtype=torch_dtype(dtype)).requires_grad_(False).eval()
    return DiffusersDenoiser(**parts, pipeline_folder=folder, prompts=prompts)


def _load_registered(path: Path, device) -> Denoiser:
    """`load_denoiser` entry for FORMAT (float32, no prompts bound: call `bind_prompts`)."""
    return load_diffusers_unet_file(path, device)


register_denoiser_format(FORMAT, _load_registered)

