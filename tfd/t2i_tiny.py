"""Tiny offline stand-ins of Stable Diffusion XL's parts, built from configs with random weights.

Nothing here downloads anything: the CLIP BPE vocabulary comes from the file bundled with
open_clip, and every network is built from a small config with seeded random initialisation.
The parts keep SDXL's *topology and interfaces* (diffusers 0.42 `StableDiffusionXLPipeline`:
two CLIP text encoders whose penultimate hidden states are concatenated, pooled text embeddings
from encoder 2, `addition_embed_type="text_time"` micro-conditioning, the SDXL-base Euler
schedule, an `AutoencoderKL` with SDXL's scaling factor) at a size that runs on a CPU in
milliseconds. They exist so that the text-to-image path (`tfd.diffusers_denoiser`,
`tfd.pipeline_sampler`, a tiny teacher trained by the test workflow) can be tested end to end.

Sources for the real values (cited per function): the Hugging Face configs of
`stabilityai/stable-diffusion-xl-base-1.0` (`unet/`, `vae/`, `text_encoder*/`, `scheduler/`),
open_clip's `SimpleTokenizer` (vocabulary construction), and /work/shared/notes/sdxl-adapter.md
(sec. 4: what was measured with these stand-ins).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import torch

from eval.errors import UserError
from eval.io import atomic_directory

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
SDXL_VAE_SCALING_FACTOR = 0.13025


# -- tokenizers -------------------------------------------------------------------------------
def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary (49,408 tokens) and its 48,894 merges, rebuilt exactly as
    open_clip's `SimpleTokenizer.__init__` does from its bundled `bpe_simple_vocab_16e6.txt.gz`.

    Token order: 256 byte symbols, the same with `</w>`, one token per merge, then
    `<|startoftext|>` (49406) and `<|endoftext|>` (49407), the names Hugging Face's CLIP uses
    (open_clip spells them `<start_of_text>` / `<end_of_text>`; ids are identical).
    Raises FileNotFoundError when open_clip (or its vocabulary file) is not installed.
    """
    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise FileNotFoundError("open_clip is needed for its bundled CLIP BPE vocabulary "
                                "(bpe_simple_vocab_16e6.txt.gz): pip install open_clip_torch") from e
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise UserError(f"{default_bpe()}: rebuilt CLIP vocabulary has {len(tokens)} tokens, "
                         f"expected {CLIP_VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str | None = None):
    """A `transformers.CLIPTokenizer` equal to SDXL's (vocabulary 49,408, `model_max_length` 77),
    built offline from open_clip's bundled BPE file (see `_bpe_vocab_and_merges`).

    `pad_token`: None keeps CLIP's default `<|endoftext|>` (id 49407; SDXL's `tokenizer/`);
    SDXL's `tokenizer_2/` uses `"!"` (id 0). Transformers 5 needs the merges as a list of
    tuples. "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
    """
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_and_merges()
    kwargs: dict[str, Any] = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, **kwargs)


# -- text encoders ----------------------------------------------------------------------------
def _clip_text_config(hidden: int, projection_dim: int, hidden_act: str):
    """A small `CLIPTextConfig` with CLIP's vocabulary and context length, 3 layers.

    `eos_token_id=2` as in both SDXL text-encoder configs: transformers then pools at the
    argmax token id, i.e. at `<|endoftext|>` (49407, the largest id).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=3, num_attention_heads=max(1, hidden // 16),
                          max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection_dim,
                          hidden_act=hidden_act, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_text_encoders(seed: int = 0, hidden: tuple[int, int] = (32, 64)):
    """SDXL's two text encoders at a tiny width, seeded random init (global RNG untouched).

    Returns `(CLIPTextModel(hidden[0]), CLIPTextModelWithProjection(hidden[1], projection
    hidden[1]))`, both in eval mode, float32, 3 layers, vocabulary 49,408. SDXL: 768 (ViT-L,
    quick_gelu) and 1280 (OpenCLIP bigG, gelu, projection 1280), 12 and 32 layers.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    h1, h2 = (int(h) for h in hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(_clip_text_config(h1, h1, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(_clip_text_config(h2, h2, "gelu"))
    return te1.eval(), te2.eval()


# -- UNet, VAE, scheduler configs -------------------------------------------------------------
def tiny_unet_config(sample_size: int = 8, in_channels: int = 4,
                     block_out_channels: tuple[int, ...] = (32, 64, 128),
                     text_hidden: tuple[int, int] = (32, 64), projection_dim: int | None = None,
                     addition_time_embed_dim: int = 8, layers_per_block: int = 2,
                     transformer_layers_per_block: tuple[int, ...] = (1, 1, 2),
                     norm_num_groups: int = 8) -> dict:
    """A `UNet2DConditionModel` config with SDXL base's topology at a tiny width.

    SDXL base (`unet/config.json`): blocks (320, 640, 1280); down (DownBlock2D,
    CrossAttnDownBlock2D x2); up (CrossAttnUpBlock2D x2, UpBlock2D); UNetMidBlock2DCrossAttn;
    transformer layers (1, 2, 10); heads 5/10/20 of 64 channels; linear projections;
    `addition_embed_type="text_time"`, `addition_time_embed_dim` 256,
    `projection_class_embeddings_input_dim` 2816 = 1280 + 6*256; `cross_attention_dim` 2048 =
    768 + 1280. Here: heads of 16 channels, `cross_attention_dim = sum(text_hidden)`,
    `projection_class_embeddings_input_dim = projection_dim + 6 * addition_time_embed_dim`
    (`projection_dim` defaults to `text_hidden[1]`, the pooled width of encoder 2).
    Widths must be multiples of `norm_num_groups` (ValueError otherwise).
    """
    blocks = tuple(int(c) for c in block_out_channels)
    if len(blocks) != 3 or len(transformer_layers_per_block) != 3:
        raise UserError("tiny_unet_config: SDXL's topology has 3 blocks; got block_out_channels="
                         f"{blocks}, transformer_layers_per_block={tuple(transformer_layers_per_block)}")
    if any(c % norm_num_groups or c < 16 for c in blocks):
        raise UserError(f"tiny_unet_config: block_out_channels {blocks} must be >= 16 and multiples of "
                         f"norm_num_groups={norm_num_groups}")
    proj = int(projection_dim if projection_dim is not None else text_hidden[1])
    return {
        "sample_size": int(sample_size), "in_channels": int(in_channels), "out_channels": int(in_channels),
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(blocks), "layers_per_block": int(layers_per_block),
        "transformer_layers_per_block": [int(n) for n in transformer_layers_per_block],
        "attention_head_dim": [max(1, c // 16) for c in blocks], "use_linear_projection": True,
        "norm_num_groups": int(norm_num_groups), "cross_attention_dim": int(sum(text_hidden)),
        "addition_embed_type": "text_time", "addition_time_embed_dim": int(addition_time_embed_dim),
        "projection_class_embeddings_input_dim": proj + 6 * int(addition_time_embed_dim),
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
        "upcast_attention": False,
    }


def tiny_vae_config(in_channels: int = 3, block_out_channels: tuple[int, ...] = (16, 32, 32),
                    latent_channels: int = 4, sample_size: int = 32, norm_num_groups: int = 8) -> dict:
    """An `AutoencoderKL` config like SDXL's VAE (`vae/config.json`: blocks (128, 256, 512, 512),
    8x downsampling, 4 latent channels, `scaling_factor` 0.13025, `force_upcast` true) at a tiny
    width: downsampling factor `2 ** (len(block_out_channels) - 1)` (default 4: 32x32 pixels ->
    8x8x4 latents). `sample_size` is the pixel size (informational in diffusers).
    """
    blocks = [int(c) for c in block_out_channels]
    return {
        "in_channels": int(in_channels), "out_channels": int(in_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "block_out_channels": blocks, "layers_per_block": 1, "act_fn": "silu",
        "latent_channels": int(latent_channels), "norm_num_groups": int(norm_num_groups),
        "sample_size": int(sample_size), "scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True,
    }


def sdxl_scheduler_config() -> dict:
    """SDXL base's `scheduler/scheduler_config.json`: EulerDiscreteScheduler, scaled-linear betas
    0.00085..0.012 over 1000 steps, epsilon prediction, "leading" spacing with `steps_offset` 1.
    This schedule gives sigma = sqrt((1-abar)/abar) in 0.029168..14.6146 (sdxl-adapter note sec. 1).
    """
    return {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
        "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
        "interpolation_type": "linear", "use_karras_sigmas": False, "clip_sample": False,
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    }


# -- pipeline folders -------------------------------------------------------------------------
def save_pipeline_folder(out_dir: str | Path, *, unet, vae, text_encoder, text_encoder_2, tokenizer,
                         tokenizer_2, scheduler) -> Path:
    """Write a diffusers `StableDiffusionXLPipeline` folder (safetensors weights,
    `force_zeros_for_empty_prompt=True` as SDXL base) to `out_dir`, atomically, with the folder's
    checksum manifest (`eval.io.MANIFEST`, verified by `tfd.diffusers_denoiser.load_pipeline_components`).

    The pipeline is saved into a temporary sibling folder and renamed into place, so a crash
    leaves no half-written `out_dir`; an existing `out_dir` is replaced (moved aside, then
    deleted after the rename). Returns `out_dir` as a Path.
    """
    from diffusers import StableDiffusionXLPipeline

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)
    with atomic_directory(out, manifest=True) as tmp:  # + its checksum manifest, verified by the loader
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def build_random_pipeline_folder(out_dir: str | Path, seed: int = 0, sample_size: int = 8,
                                 unet_channels: tuple[int, ...] = (32, 64, 128),
                                 vae_channels: tuple[int, ...] = (16, 32, 32),
                                 text_hidden: tuple[int, int] = (32, 64), layers_per_block: int = 2,
                                 addition_time_embed_dim: int = 8) -> Path:
    """A whole tiny SDXL pipeline folder with seeded random weights (for tests).

    `sample_size`: latent size of the UNet; the VAE's pixel size is `sample_size * 2 **
    (len(vae_channels) - 1)` (defaults: 8x8x4 latents <-> 32x32x3 pixels). The width keywords
    shrink or grow the parts (`unet_channels` -> `tiny_unet_config(block_out_channels=)`,
    `vae_channels` -> `tiny_vae_config(block_out_channels=)`, `text_hidden` -> both encoders).
    The global torch RNG is left untouched. Returns the folder (written by `save_pipeline_folder`).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    te1, te2 = tiny_text_encoders(seed, text_hidden)
    factor = 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel.from_config(tiny_unet_config(
            sample_size, block_out_channels=unet_channels, text_hidden=text_hidden,
            layers_per_block=layers_per_block, addition_time_embed_dim=addition_time_embed_dim))
        vae = AutoencoderKL.from_config(tiny_vae_config(block_out_channels=vae_channels,
                                                        sample_size=sample_size * factor))
    scheduler = EulerDiscreteScheduler.from_config(sdxl_scheduler_config())
    return save_pipeline_folder(out_dir, unet=unet.eval(), vae=vae.eval(), text_encoder=te1, text_encoder_2=te2,
                                tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                                scheduler=scheduler)
