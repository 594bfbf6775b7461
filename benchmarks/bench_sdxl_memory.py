"""Parameter counts and weights + optimiser memory of distilling SDXL base 1.0 as this suite does.

Builds SDXL's UNet (diffusers `UNet2DConditionModel`), VAE (`AutoencoderKL`) and both text encoders
(transformers `CLIPTextModel` = CLIP ViT-L/14, `CLIPTextModelWithProjection` = OpenCLIP bigG/14) with
random weights on the `meta` device (no memory allocated, no download; `--materialize` builds them on
the CPU for real, about 14 GB), counts their parameters and prints, in GiB (2**30 bytes):

* teacher UNet, frozen, weights only, in `--teacher-dtype` (`teacher.precision`; default bf16);
* generator UNet, trainable: fp32 weights + fp32 grads + AdamW's two fp32 moments = 16 B/param
  (`DiffusersDenoiser.copy()` makes the trainable copy fp32; `train.precision: bf16` is autocast,
  which keeps no bf16 copy; `--bf16-copy` adds 2 B/param for trainers that do); `--ema` adds the
  trainer's fp32 EMA of the generator (4 B/param);
* fake score UNet (DMD2 only): a second trainable fp32 copy + AdamW (16 B/param; its small GAN
  head is not counted);
* VAE in `--vae-dtype` (default fp32, `load_pipeline_components`' default), text encoders in
  `--encoders-dtype` (default bf16: the suite loads them in the teacher's dtype);
* totals for TFD (teacher + generator + VAE + encoders) and DMD2 (TFD + fake score).

Activation memory (forward + backward of the generator and the teacher/fake-score passes) is NOT
included: it depends on batch size, resolution and gradient checkpointing and must be measured on
a GPU. Last line: the numbers as JSON.

Config values: the `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` config.json files of
stabilityai/stable-diffusion-xl-base-1.0 on the Hugging Face Hub (architecture keys only);
`--config-json PATH` reads a local diffusers `unet/config.json` instead of the built-in UNet dict.

    python benchmarks/bench_sdxl_memory.py [--config-json unet/config.json] [--materialize]
        [--teacher-dtype bf16|fp32] [--vae-dtype fp32|bf16] [--encoders-dtype bf16|fp32] [--ema] [--bf16-copy]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
BYTES = {"fp32": 4, "bf16": 2}
GIB = 2 ** 30


def count_params(unet_cfg: dict, device: str) -> dict[str, int]:
    """Parameter counts {unet, vae, text_encoder, text_encoder_2} of models built on `device`
    ("meta": nothing allocated; "cpu": random fp32 weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        models = {"unet": UNet2DConditionModel.from_config(unet_cfg),
                  "vae": AutoencoderKL.from_config(SDXL_VAE),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def memory_table(n: dict[str, int], teacher="bf16", vae="fp32", encoders="bf16", ema=False,
                 bf16_copy=False) -> dict[str, float]:
    """GiB per component and the TFD / DMD2 totals (weights, grads, AdamW state; no activations)."""
    train_b = 16 + (4 if ema else 0) + (2 if bf16_copy else 0)  # fp32 w + grad + 2 AdamW moments (+EMA, +bf16)
    rows = {"teacher UNet (frozen)": n["unet"] * BYTES[teacher],
            "generator UNet (trainable)": n["unet"] * train_b,
            "fake score UNet (DMD2, trainable)": n["unet"] * 16,
            "VAE": n["vae"] * BYTES[vae],
            "text encoders (CLIP-L + bigG)": (n["text_encoder"] + n["text_encoder_2"]) * BYTES[encoders]}
    rows = {k: v / GIB for k, v in rows.items()}
    rows["total TFD"] = sum(v for k, v in rows.items() if "fake score" not in k)
    rows["total DMD2"] = rows["total TFD"] + rows["fake score UNet (DMD2, trainable)"]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-json", default=None, help="a local diffusers unet/config.json (default: built-in SDXL)")
    p.add_argument("--materialize", action="store_true", help="build on the CPU for real (~14 GB RAM) instead of meta")
    p.add_argument("--teacher-dtype", choices=BYTES, default="bf16")
    p.add_argument("--vae-dtype", choices=BYTES, default="fp32")
    p.add_argument("--encoders-dtype", choices=BYTES, default="bf16")
    p.add_argument("--ema", action="store_true", help="count the trainer's fp32 EMA of the generator")
    p.add_argument("--bf16-copy", action="store_true", help="count a bf16 working copy of the generator")
    a = p.parse_args(argv)
    unet_cfg = SDXL_UNET
    if a.config_json:
        with open(a.config_json) as f:
            unet_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    t0 = time.perf_counter()
    n = count_params(unet_cfg, "cpu" if a.materialize else "meta")
    build_s = time.perf_counter() - t0
    rows = memory_table(n, a.teacher_dtype, a.vae_dtype, a.encoders_dtype, a.ema, a.bf16_copy)
    gen = "fp32 w+grad+AdamW" + (" +EMA" if a.ema else "") + (" +bf16 copy" if a.bf16_copy else "")
    dtypes = {"teacher UNet (frozen)": f"{a.teacher_dtype} weights", "generator UNet (trainable)": gen,
              "fake score UNet (DMD2, trainable)": "fp32 w+grad+AdamW", "VAE": a.vae_dtype,
              "text encoders (CLIP-L + bigG)": a.encoders_dtype}
    print(f"built on {'cpu' if a.materialize else 'meta'} in {build_s:.1f} s; UNet config: "
          f"{a.config_json or 'built-in SDXL base 1.0'}")
    for k, v in n.items():
        print(f"  {k:<15} {v:>14,d} params ({v / 1e9:.3f}e9)")
    print(f"\n{'component':<36}{'stored as':<28}{'GiB':>8}")
    for k, v in rows.items():
        if k == "total TFD":
            print("-" * 72)
        print(f"{k:<36}{dtypes.get(k, ''):<28}{v:>8.2f}")
    print("\nactivation memory is NOT included: measure one generator forward+backward on a GPU "
          "(batch, resolution, gradient checkpointing)")
    print(json.dumps({"params": n, "gib": {k: round(v, 3) for k, v in rows.items()},
                      "settings": vars(a), "activations_included": False}))


if __name__ == "__main__":
    main()
