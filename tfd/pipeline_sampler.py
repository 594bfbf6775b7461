"""Table 2's teacher and published rows, sampled with diffusers' own `StableDiffusionXLPipeline`.

The SDXL teacher rows (50 steps, guidance 6 or 8: 100 NFE) and the published few-step baselines
(SDXL-Turbo, SDXL-Lightning, LCM-SDXL, DMD2-SDXL) are sampled by the library that defines them,
with their documented scheduler settings, under this suite's protocol: image `i` gets prompt row
`i % len` and seed `base + i` (`eval.sample.generate`), its starting latents drawn from its own
generator (`StackedRandom`), so the images do not depend on the batch size or the sharding.

What each published checkpoint needs (model cards / DMD2 README; `PUBLISHED` below):

- SDXL-Lightning (ByteDance): the SDXL base pipeline with the Lightning UNet file
  (`unet=.../sdxl_lightning_{2,4,8}step_unet.safetensors`), `EulerDiscreteScheduler` with
  `timestep_spacing="trailing"`, guidance 0, steps = the file's step count. The 1-step file
  `sdxl_lightning_1step_unet_x0.safetensors` predicts x0: add `prediction_type="sample"`.
- SDXL-Turbo (Stability): its own pipeline folder (`pipeline=`), 1 step, guidance 0, trained at
  512x512 (pass `resolution=512`); its folder's scheduler (Euler ancestral, trailing) is used.
- LCM-SDXL (latent-consistency/lcm-sdxl): a UNet folder (`unet=`) with a guidance embedding
  (`time_cond_proj_dim`), `LCMScheduler`, 4 steps in the model card, guidance 8 (embedded: the
  pipeline runs one UNet call per step, no CFG batch).
- DMD2-SDXL (tianweiy/DMD2): the base pipeline with the DMD2 UNet file (`unet=`,
  `dmd2_sdxl_1step_unet_fp16.bin`), `LCMScheduler`, guidance 0, 1 step with explicit
  `timesteps=[399]` (4-step: `[999, 749, 499, 249]`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from eval.errors import UserError
from eval.io import read_safetensors_metadata
from tfd.diffusers_denoiser import FORMAT as UNET_FORMAT
from tfd.diffusers_denoiser import load_pipeline_components, torch_dtype

# Documented settings of the published checkpoints (weights paths are the user's: `pipeline` /
# `unet` must be set to local copies). Keys are PipelineCfg fields.
PUBLISHED: dict[str, dict] = {
    "sdxl-lightning-4step": {"steps": 4, "guidance": 0.0, "scheduler": "EulerDiscreteScheduler",
                             "scheduler_kwargs": {"timestep_spacing": "trailing"}},
    "sdxl-lightning-1step": {"steps": 1, "guidance": 0.0, "scheduler": "EulerDiscreteScheduler",
                             "scheduler_kwargs": {"timestep_spacing": "trailing", "prediction_type": "sample"}},
    "sdxl-turbo": {"steps": 1, "guidance": 0.0},
    "lcm-sdxl": {"steps": 4, "guidance": 8.0, "scheduler": "LCMScheduler"},
    "dmd2-sdxl-1step": {"steps": 1, "guidance": 0.0, "scheduler": "LCMScheduler", "timesteps": [399]},
    "dmd2-sdxl-4step": {"steps": 4, "guidance": 0.0, "scheduler": "LCMScheduler",
                        "timesteps": [999, 749, 499, 249]},
}


@dataclass
class PipelineCfg:
    """How one Table 2 row is sampled by diffusers' `StableDiffusionXLPipeline` (config block
    `sampler:`; errors name `sampler.<field>`).

    steps: `num_inference_steps` (ignored when `timesteps` is given). guidance:
    `guidance_scale` (diffusers runs CFG only when > 1; published few-step models use 0).
    scheduler: a diffusers scheduler class name built `from_config` of the folder's scheduler
    (None: the folder's own class), with `scheduler_kwargs` overriding config keys (e.g.
    `timestep_spacing: trailing`). timesteps: explicit timesteps (DMD2's [399]). pipeline: a whole
    published pipeline folder (SDXL-Turbo) instead of the teacher's. unet: a UNet folder, or a
    `.safetensors` / `.bin` state dict for the teacher's UNet config, replacing its UNet
    (Lightning, LCM-SDXL, DMD2, or a `tfd.diffusers_unet.v1` file). dtype: "fp32" | "bf16" for
    the UNet, text encoders and VAE (SDXL's VAE is fine in bf16; fp16 is refused). resolution:
    the generated images' side in pixels (None: the benchmark's; SDXL-Turbo: 512). published: a
    published checkpoint's row; without `pipeline` or `unet` it is not sampled and its table row
    shows the paper's numbers only.
    """

    steps: int = 50
    guidance: float = 6.0
    scheduler: Optional[str] = None
    scheduler_kwargs: dict = field(default_factory=dict)
    timesteps: Optional[list[int]] = None
    pipeline: Optional[str] = None
    unet: Optional[str] = None
    dtype: str = "fp32"
    resolution: Optional[int] = None
    published: bool = False

    def __post_init__(self):
        if int(self.steps) < 1:
            raise UserError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.timesteps is not None and len(self.timesteps) < 1:
            raise UserError("sampler.timesteps must be a non-empty list of integers (or null)")
        torch_dtype(self.dtype, "sampler.dtype")

    @property
    def nfe(self) -> int:
        """UNet evaluations per image: steps (or len(timesteps)), doubled when guidance > 1 (CFG
        batches [uncond, cond]). A UNet with a guidance embedding (LCM-SDXL's
        `time_cond_proj_dim`) does no CFG batch, so its true NFE is the step count."""
        n = len(self.timesteps) if self.timesteps else int(self.steps)
        return 2 * n if self.guidance > 1 else n


# -- building the pipeline --------------------------------------------------------------------
def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A UNet state dict from `.safetensors` or a torch pickle (`.bin` / `.pt` / `.pth`, loaded
    with `weights_only=True`); ValueError naming `sampler.unet` for another suffix."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise UserError(f"sampler.unet {path}: expected a UNet folder, .safetensors, .bin, .pt or .pth file")


def load_unet_replacement(path, base_unet_config: Path, dtype: torch.dtype, device="cpu"):
    """The UNet of `sampler.unet`: a diffusers UNet folder (with `config.json`, or a pipeline
    folder with `unet/`), or a state-dict file for the config in `base_unet_config` (the
    teacher's `unet/` folder; a `tfd.diffusers_unet.v1` file brings its own config).
    Raises FileNotFoundError / ValueError naming `sampler.unet`."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sampler.unet: {path} not found (a UNet folder or weights file)")
    if path.is_dir():
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype)
    else:
        config = None
        if path.suffix == ".safetensors":
            meta = read_safetensors_metadata(path)
            config = meta.get("unet_config") if meta.get("format") == UNET_FORMAT else None
        unet = UNet2DConditionModel.from_config(config or UNet2DConditionModel.load_config(str(base_unet_config)))
        try:
            unet.load_state_dict(_load_state_dict(path), strict=True)
        except RuntimeError as e:
            raise UserError(f"sampler.unet {path}: weights do not fit the UNet config ({str(e)[:300]})") from None
    return unet.to(device=device, dtype=dtype).requires_grad_(False).eval()


def _scheduler(base, cfg: PipelineCfg):
    """The folder's scheduler, or `cfg.scheduler` built from its config, with `scheduler_kwargs`."""
    import diffusers

    if cfg.scheduler is None:
        return type(base).from_config(base.config, **cfg.scheduler_kwargs) if cfg.scheduler_kwargs else base
    cls = getattr(diffusers, str(cfg.scheduler), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"sampler.scheduler: {cfg.scheduler!r} is not a diffusers scheduler class "
                         "(e.g. EulerDiscreteScheduler, LCMScheduler)")
    return cls.from_config(base.config, **cfg.scheduler_kwargs)


def build_pipeline(teacher_folder, cfg: PipelineCfg, device="cpu"):
    """A `StableDiffusionXLPipeline` for `cfg` on `device`: the folder `cfg.pipeline` or the
    teacher's, its UNet replaced by `cfg.unet`, its scheduler by `cfg.scheduler`; no watermark
    (the invisible watermark would alter the evaluated images), progress bar off,
    `force_zeros_for_empty_prompt` from the folder's `model_index.json` (default True).
    Raises FileNotFoundError naming `sampler.pipeline`, the teacher folder or `sampler.unet`."""
    from diffusers import StableDiffusionXLPipeline

    if cfg.pipeline is not None and not Path(cfg.pipeline).is_dir():
        raise FileNotFoundError(f"sampler.pipeline: pipeline folder {cfg.pipeline} not found")
    folder = Path(cfg.pipeline or teacher_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"teacher pipeline folder {folder} not found")
    dtype = torch_dtype(cfg.dtype, "sampler.dtype")
    unet = None
    if cfg.unet is not None:
        unet = load_unet_replacement(cfg.unet, folder / "unet", dtype, device)
    parts = load_pipeline_components(folder, device, dtype, dtype, load_unet=unet is None)
    if unet is not None:
        parts["unet"] = unet
    parts["scheduler"] = _scheduler(parts["scheduler"], cfg)
    index = folder / "model_index.json"
    zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=bool(zeros), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the sampler ------------------------------------------------------------------------------
def pipeline_sampler(teacher_folder, cfg: PipelineCfg, prompts, device="cpu", resolution: Optional[int] = None,
                     micro_batch: int = 1) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """`sampler(cond_ids int64 [B], rnd) -> images float32 [B, 3, R, R] in [-1, 1]` for
    `eval.sample.generate`, running diffusers' pipeline as configured by `cfg`.

    Per call: captions from `prompts` (`PromptTable.captions`); starting latents
    `rnd.randn((C, R/f, R/f))`, one draw per image from its own generator, which the pipeline
    multiplies by `scheduler.init_noise_sigma` itself (`prepare_latents`); the per-image
    generators `rnd.gens` also feed stochastic schedulers (LCM, Euler ancestral). R is
    `resolution` or the UNet's `sample_size` times the VAE factor (SDXL: 1024).

    The pipeline runs on `micro_batch` images at a time (default 1). Batched matrix products
    may round differently for different batch sizes (CPU and GPU kernels pick their blocking by
    shape), which would make an image depend on its batch; with a fixed micro-batch of 1 every
    image goes through the same shapes whatever the `generate` batch size or sharding, so the
    uint8 output is byte-identical. Larger micro-batches trade this for speed.
    """
    if int(micro_batch) < 1:
        raise UserError(f"micro_batch must be >= 1, got {micro_batch}")
    pipe = build_pipeline(teacher_folder, cfg, device)
    factor = int(pipe.vae_scale_factor)
    res = int(resolution or pipe.unet.config.sample_size * factor)
    if res % factor or res % 8:
        raise UserError(f"resolution {res} must be a multiple of 8 and of the VAE factor {factor}")
    shape = (int(pipe.unet.config.in_channels), res // factor, res // factor)
    steps = {"timesteps": list(cfg.timesteps)} if cfg.timesteps else {"num_inference_steps": int(cfg.steps)}
    dtype = pipe.unet.dtype

    def sampler(cond_ids: torch.Tensor, rnd) -> torch.Tensor:
        captions = prompts.captions(torch.as_tensor(cond_ids).cpu().numpy())
        z = rnd.randn(shape)
        gens = list(getattr(rnd, "gens", [None] * len(captions)))
        out = []
        for i in range(0, len(captions), int(micro_batch)):
            sl = slice(i, i + int(micro_batch))
            g = gens[sl] if all(x is not None for x in gens[sl]) else None
            with torch.no_grad():
                img = pipe(prompt=captions[sl], latents=z[sl].to(device=device, dtype=dtype), generator=g,
                           guidance_scale=float(cfg.guidance), height=res, width=res, output_type="pt",
                           **steps).images
            out.append(img.float() * 2 - 1)
        return torch.cat(out).to(cond_ids.device)

    sampler.pipeline = pipe
    sampler.resolution = res
    return sampler
