"""GPU cost of the paper protocol's jobs: training iterations, sampling and Inception features.

Two models with random weights (no download), built from this repository's own code and config.yaml:

* `imagenet64`: EDM's ImageNet-64 ADM teacher (`tfd.networks.edm.imagenet64_adm_kwargs`, 295.9M
  parameters), the `imagenet64` runs `tfd` and `dmd2` (their `params` and `train` blocks);
* `coco2014`: SDXL base's UNet (diffusers `UNet2DConditionModel` from `bench_sdxl_memory.SDXL_UNET`,
  or `--sdxl-config` a local `unet/config.json`), VAE and both CLIP text encoders, the `coco2014`
  runs `tfd` and `dmd2`; random latents stand in for the positives cache.

Per model it measures, with `tfd.trainer.Trainer.train_one_step` (method step under the trainer's
autocast, backward, clipping, AdamW, the run's add-ons; DMD2 over whole `dfake_gen_update_ratio` cycles,
so one generator update per ratio fake-score updates): seconds per iteration, FLOPs per iteration
(`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention, forward and backward,
gradient-checkpointing recomputation included), achieved TFLOP/s and MFU against the device's bf16 dense
peak (`PEAK_BF16_TFLOPS`, NVIDIA datasheets; an unknown device, or the CPU, gives MFU null unless
`--peak-tflops` is given); the one-step generator's and the teacher's Heun sampler's images/s
(`eval.sample.generate`, decoded and quantised as a sample job does), and Inception feature images/s
(`eval.features.TorchFidelityInception`, fp32; random weights unless `--inception-weights`).
Peak memory: `torch.cuda.max_memory_allocated` per job on a GPU; on the CPU the process's peak RSS so
far (`resource.getrusage`, cumulative over the jobs run before).

    python benchmarks/bench_gpu.py --device cuda --dtype bf16 --out results/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --dtype fp32 --tiny --out /tmp/bench.json   # CI smoke test

`--tiny`: same code paths at tiny shapes (8x8 EDM UNet, 10 classes; SDXL topology at width 32 on 8x8
latents; small batches): runs in seconds on a CPU; its numbers are not the paper's (`"tiny": true`).
`--count-only`: only the forward GFLOPs per image of both models at the paper's shapes, counted on the
`meta` device (seconds on any machine).
`--batch N`: training batch per rank (`batch_per_rank`; TFD `groups_per_rank = max(1, N // n_gen)`)
and sampling/Inception batch; default: the config's.

Output (`--out`, JSON, written atomically; read by `tfd plan`, schema `SCHEMA`):

    {"schema": "tfd.bench_gpu/1", "device": str, "device_type": "cuda" | "cpu", "dtype": "bf16" | "fp32",
     "torch": str, "tiny": bool, "peak_bf16_tflops": float | null, "memory": "cuda_max_allocated" | "cpu_max_rss",
     "jobs": {"<bench>/<kind>": {...}, "inception": {...}}}

    train jobs (`<bench>/<run>`: `--runs`, default tfd and dmd2): kind "train", bench, run, method, params (count of the
      teacher), batch (per rank), seconds_per_iter, flops_per_iter, tflops_per_s, mfu (null: peak
      unknown), peak_memory_mb, iters (timed); a job that raised has kind, bench, run, method and `error`
      (the exception's type and first line) instead of numbers
    sample jobs (`<bench>/onestep`: one generator call per image; `<bench>/heun`: the teacher's Heun
      sampler, cost per network evaluation): kind "sample", bench, nfe, batch, seconds_per_image,
      seconds_per_image_per_nfe, images_per_s, peak_memory_mb
    `inception`: kind "features", batch, resolution, seconds_per_image, images_per_s, weights
      ("random" or the file), peak_memory_mb
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sdxl_memory, run as a script or imported
from bench_sdxl_memory import CLIP_BIGG, CLIP_L, SDXL_UNET, SDXL_VAE  # noqa: E402

SCHEMA = "tfd.bench_gpu/1"
# bf16 dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets (H100/H200 SXM, H100 PCIe, A100, L40S);
# matched as substrings of torch.cuda.get_device_name(), first match wins (PCIe before the SXM name).
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.5), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05))
# --tiny: params overrides per method (TFD's layers exist in the tiny 8x8 UNet); others: batch_per_rank 2-4
TINY = {"imagenet64": {"tfd": {"layers": ["enc:2", "bottleneck", "dec:6"], "groups_per_rank": 2, "n_gen": 2,
                               "n_pos": 2, "n_anchor": 2, "pool": 2}},
        "coco2014": {"tfd": {"groups_per_rank": 1, "n_gen": 2, "n_pos": 2, "n_anchor": 2, "pool": 1}}}
TINY_BATCH = {"imagenet64": 4, "coco2014": 2}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The bf16 dense peak (TFLOP/s) of a GPU named `device_name` (`PEAK_BF16_TFLOPS`); None if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """MiB: `torch.cuda.max_memory_allocated` since the last reset on a GPU; else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def seconds_per_call(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Mean wall seconds of `fn()` over `reps` calls after `warmup` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def count_flops(fn) -> int:
    """FLOPs of one `fn()` call counted by `torch.utils.flop_counter.FlopCounterMode`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- models ------------------------------------------------------------------------------------
def edm_teacher(tiny: bool, device: torch.device):
    """A frozen `EDMDenoiser` with random weights: the ImageNet-64 ADM teacher, or (`tiny`) an 8x8,
    3-channel, 10-class net of the same family. EDM's own fp16 cast (`use_fp16`) is off: precision comes
    from the trainer's autocast (`--dtype`), as `train.precision` does."""
    from tfd.denoiser import EDMDenoiser
    from tfd.networks.edm import EDMPrecond, digits_unet_kwargs, imagenet64_adm_kwargs
    kw = (digits_unet_kwargs(img_channels=3, model_channels=16) if tiny else imagenet64_adm_kwargs())
    with torch.device(device):
        return EDMDenoiser(EDMPrecond(**{**kw, "use_fp16": False}))


def sdxl_teacher(tiny: bool, device: torch.device, dtype: torch.dtype, unet_config: dict | None = None):
    """A frozen `DiffusersDenoiser` with random weights: SDXL base's UNet, VAE and text encoders
    (encoders and UNet in `dtype`, VAE fp32), or (`tiny`) `tfd.t2i_tiny`'s SDXL-topology stand-ins."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tfd import t2i_tiny
    from tfd.diffusers_denoiser import DiffusersDenoiser
    with torch.device(device):
        if tiny:
            te1, te2 = t2i_tiny.tiny_text_encoders()
            unet = UNet2DConditionModel.from_config(t2i_tiny.tiny_unet_config(8))
            vae = AutoencoderKL.from_config(t2i_tiny.tiny_vae_config())
        else:
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
            unet = UNet2DConditionModel.from_config(unet_config or SDXL_UNET)
            vae = AutoencoderKL.from_config(SDXL_VAE)
    sched = EulerDiscreteScheduler.from_config(t2i_tiny.sdxl_scheduler_config())
    if dtype != torch.float32:  # the frozen teacher and encoders in `teacher.precision` (the generator copy is fp32)
        unet, te1, te2 = unet.to(dtype), te1.to(dtype), te2.to(dtype)
    return DiffusersDenoiser(unet, vae, te1, te2, t2i_tiny.clip_tokenizer(),
                             t2i_tiny.clip_tokenizer(pad_token="!"), sched)


def synthetic_data(teacher, num_conditions: int, device: torch.device):
    """(condition sampler, conditions) of random data: 2 images per class (`ClassBalancedSampler`), or
    for SDXL 16 prompts x 4 random latents (`PositivesSampler`) with the prompt table bound."""
    from eval.conditions import ClassConditions, PromptTable
    from tfd.data import ClassBalancedSampler
    from tfd.positives import PositivesSampler
    gen = torch.Generator().manual_seed(0)
    if num_conditions:
        x = torch.randn(2 * num_conditions, *teacher.sample_shape, generator=gen).clamp(-1, 1)
        y = torch.arange(2 * num_conditions) % num_conditions
        return ClassBalancedSampler(x.to(device), y.to(device), gen, num_conditions), ClassConditions(num_conditions)
    table = PromptTable(tuple(range(16)), tuple(f"a photo of object number {i}" for i in range(16)))
    teacher.bind_prompts(table)
    lat = torch.randn(16, 4, *teacher.sample_shape, generator=gen)
    return PositivesSampler(lat, torch.arange(16), gen, device), table


def forward_gflops_meta(unet_config: dict | None = None) -> dict[str, float]:
    """GFLOPs of one forward pass per image at the paper's shapes, counted on the `meta` device (no
    memory, no device needed): the ImageNet-64 teacher (3x64x64, class label) and SDXL's UNet (4x128x128
    latents, 77x2048 text embeddings). Device-independent: a check on the GPU run's FLOPs per iteration."""
    from diffusers import UNet2DConditionModel

    from tfd.networks.edm import EDMPrecond, imagenet64_adm_kwargs
    with torch.device("meta"):
        edm = EDMPrecond(**{**imagenet64_adm_kwargs(), "use_fp16": False})
        unet = UNet2DConditionModel.from_config(unet_config or SDXL_UNET)
        f_edm = count_flops(lambda: edm(torch.randn(1, 3, 64, 64), torch.ones(1), torch.zeros(1, 1000)))
        f_unet = count_flops(lambda: unet(torch.randn(1, 4, 128, 128), torch.tensor([500.0]),
                                          encoder_hidden_states=torch.randn(1, 77, 2048),
                                          added_cond_kwargs={"text_embeds": torch.randn(1, 1280),
                                                             "time_ids": torch.randn(1, 6)}))
    return {"imagenet64_edm_forward": f_edm / 1e9, "sdxl_unet_forward": f_unet / 1e9}


# -- jobs --------------------------------------------------------------------------------------
def random_pairs(teacher, n: int = 64) -> dict:
    """DMD's teacher pairs `{index, noise, target, cond}` (`tfd.pairs.load_pairs`' tensors) with random values."""
    shape = teacher.sample_shape
    return {"index": torch.arange(n), "noise": torch.randn(n, *shape), "target": torch.randn(n, *shape),
            "cond": torch.randint(max(getattr(teacher, "num_conditions", 1), 1), (n,))}


def update_cycle(params) -> int:
    """Iterations of one whole update cycle (every network stepped in its proportion): DMD2 / DMD
    `dfake_gen_update_ratio`, DP-DMD `fake_updates_per_student + 1`, else 1."""
    if hasattr(params, "fake_updates_per_student"):
        return int(params.fake_updates_per_student) + 1
    return int(getattr(params, "dfake_gen_update_ratio", 1))


def bench_train(run, teacher, data, device, dtype: str, iters: int, peak: float | None, params: dict) -> dict:
    """One training job: `run` (a config `RunCfg`) with `params` overrides, timed over >= `iters`
    iterations (whole update cycles, `update_cycle`), generator-loss add-ons included. Returns the
    train job record (module docstring)."""
    from tfd.addons import build_addons
    from tfd.methods import get_method
    from tfd.trainer import Trainer
    torch.manual_seed(0)
    p = dataclasses.replace(run.params, **params)
    cls = get_method(run.method)
    kw = {"pairs": random_pairs(teacher)} if getattr(cls, "needs_pairs", False) else {}
    method = cls(teacher, data, p, device=device, **kw)
    method.addons = build_addons(run.addons, teacher.sample_shape, device)  # as tfd.runs.build_method
    cfg = dataclasses.replace(run.train, precision=dtype, ema_halflife_steps=0.0)
    cycle = update_cycle(p)
    n = max(1, -(-iters // cycle)) * cycle
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, cfg, tmp, device=device, progress=False)

        def run_cycle():
            for _ in range(cycle):
                trainer.train_one_step()
        _reset_peak(device)
        flops = count_flops(run_cycle) // cycle  # also the warm-up (allocator, cuDNN autotuning)
        s = seconds_per_call(run_cycle, device, reps=n // cycle, warmup=0) / cycle
    tflops = flops / s / 1e12
    batch = ({"batch_per_rank": p.batch_per_rank} if hasattr(p, "batch_per_rank") else
             {k: getattr(p, k) for k in ("groups_per_rank", "n_gen", "n_pos", "n_anchor")})
    return {"kind": "train", "method": run.method, "params": sum(x.numel() for x in teacher.parameters()),
            "batch": batch, "seconds_per_iter": s, "flops_per_iter": flops, "tflops_per_s": tflops,
            "mfu": tflops / peak if peak else None, "peak_memory_mb": peak_memory_mb(device), "iters": n}


def bench_sampler(sampler, conditions, nfe: int, device, dtype: str, batch: int, batches: int) -> dict:
    """Images/s of `sampler(cond, rnd)` through `eval.sample.generate` (`batches` batches of `batch`,
    after one warm-up batch) under `dtype` autocast; `nfe` network evaluations per image."""
    from eval.sample import generate
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run(n):
        with amp:
            generate(sampler, n, conditions, batch_size=batch, device=device, progress=False)
    _reset_peak(device)
    run(batch)
    s = seconds_per_call(lambda: run(batch * batches), device, reps=1, warmup=0) / (batch * batches)
    return {"kind": "sample", "nfe": nfe, "batch": batch, "seconds_per_image": s,
            "seconds_per_image_per_nfe": s / nfe, "images_per_s": 1 / s, "peak_memory_mb": peak_memory_mb(device)}


def random_inception_file(path: Path) -> Path:
    """Write a torch-fidelity `inception-v3-compat` state_dict with random weights to `path` (the
    network built from an empty state file, its `load_state_dict` skipped): no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *a, **k):
            if state_dict:
                return super().load_state_dict(state_dict, *a, **k)

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    torch.save(_Random("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return path


def bench_inception(device, weights: str | None, batch: int, resolution: int, batches: int) -> dict:
    """Images/s of the repo's Inception extractor (`TorchFidelityInception`, fp32) on random uint8
    `resolution`^2 RGB images, `batches` batches of `batch` after one warm-up batch."""
    from eval.features import TorchFidelityInception
    with tempfile.TemporaryDirectory() as tmp:
        path = weights or random_inception_file(Path(tmp) / "random-inception.pth")
        ext = TorchFidelityInception(path, device=device)
        u8 = torch.randint(0, 256, (batch * batches, 3, resolution, resolution), dtype=torch.uint8)
        _reset_peak(device)
        ext.features(u8[:batch], batch)
        s = seconds_per_call(lambda: ext.features(u8, batch), device, reps=1, warmup=0) / len(u8)
    return {"kind": "features", "batch": batch, "resolution": resolution, "seconds_per_image": s,
            "images_per_s": 1 / s, "weights": weights or "random", "peak_memory_mb": peak_memory_mb(device)}


def bench_model(bench: str, b, a, device, peak) -> dict[str, dict]:
    """The train and sample jobs of benchmark `bench` (config block `b`): {"<bench>/<kind>": record}."""
    from tfd.sampling import HeunCfg, heun_sampler
    tdtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if b.task == "text":
        unet_cfg = json.loads(Path(a.sdxl_config).read_text()) if a.sdxl_config else None
        teacher = sdxl_teacher(a.tiny, device, tdtype, unet_cfg and {k: v for k, v in unet_cfg.items()
                                                                       if not k.startswith("_")})
    else:
        teacher = edm_teacher(a.tiny, device)
    data, conditions = synthetic_data(teacher, 10 if a.tiny and b.num_classes else b.num_classes, device)
    out = {}
    for name in [r for r in a.runs.split(",") if r]:
        if name not in b.runs or not b.runs[name].trains:
            print(f"{bench}/{name}: skipped, not a training run of {bench} "
                  f"(its training runs: {', '.join(n for n, r in b.runs.items() if r.trains)})", flush=True)
            continue
        run = b.runs[name]
        over = {}
        if a.tiny:
            over = dict(TINY[bench].get(run.method) or {"batch_per_rank": TINY_BATCH[bench]})
            if getattr(run.params, "regression_batch_per_rank", None):
                over["regression_batch_per_rank"] = TINY_BATCH[bench]
        if a.batch:
            over.update({"groups_per_rank": max(1, a.batch // over.get("n_gen", run.params.n_gen))}
                        if hasattr(run.params, "groups_per_rank") else {"batch_per_rank": a.batch})
        try:
            rec = bench_train(run, teacher, data, device, a.dtype, a.iters, peak, over)
        except Exception as e:  # recorded, not hidden: `tfd plan` reports the job as not measured, with this
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out[f"{bench}/{name}"] = {"bench": bench, "run": name, "kind": "train", "method": run.method, "error": msg}
            print(f"{bench}/{name}: FAILED {msg}", flush=True)
            continue
        out[f"{bench}/{name}"] = {"bench": bench, "run": name, **rec}
        print(f"{bench}/{name}: {rec['seconds_per_iter']:.4f} s/iter, {rec['flops_per_iter'] / 1e12:.4f} TFLOP/iter, "
              f"{rec['tflops_per_s']:.3f} TFLOP/s, MFU {rec['mfu'] if rec['mfu'] is None else round(rec['mfu'], 4)}, "
              f"peak {rec['peak_memory_mb']:.0f} MiB", flush=True)
    batch = a.batch or (4 if a.tiny else b.eval.batch_size)
    gen = teacher.copy().eval()
    samplers = {"onestep": (b.runs["tfd"].method, 1), "heun": (None, 2 * a.heun_steps - 1)}
    for kind, (method, nfe) in samplers.items():
        from tfd.methods import get_method
        sampler = (get_method(method).sampler_for(gen, b.runs["tfd"].params) if method else
                   heun_sampler(teacher, HeunCfg(steps=a.heun_steps)))
        rec = bench_sampler(sampler, conditions, nfe, device, a.dtype, batch, a.sample_batches)
        out[f"{bench}/{kind}"] = {"bench": bench, **rec}
        print(f"{bench}/{kind}: {rec['images_per_s']:.2f} images/s (nfe {nfe}), "
              f"{rec['seconds_per_image_per_nfe'] * 1e3:.3f} ms per image per NFE", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test; not the paper's numbers)")
    ap.add_argument("--batch", type=int, default=None, help="training batch per rank and sampling batch")
    ap.add_argument("--models", default="imagenet64,coco2014", help="benchmarks to run, comma-separated")
    ap.add_argument("--runs", default="tfd,dmd2", help="training runs of each benchmark to time (config run names; "
                    "e.g. tfd,dmd2,dmd2_nogan,dmd,cd_l2,dpdmd on imagenet64)")
    ap.add_argument("--iters", type=int, default=10, help="timed training iterations (whole DMD2 cycles)")
    ap.add_argument("--heun-steps", type=int, default=4, help="Heun steps of the teacher-sampler timing")
    ap.add_argument("--sample-batches", type=int, default=2, help="timed batches of sampling and Inception")
    ap.add_argument("--sdxl-config", default=None, help="a local diffusers SDXL unet/config.json")
    ap.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (default: random)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of an unlisted device")
    ap.add_argument("--out", default=None, help="JSON results file (read by `tfd plan --costs`)")
    ap.add_argument("--count-only", action="store_true",
                    help="print the per-image forward GFLOPs at the paper's shapes (meta device) and exit")
    a = ap.parse_args(argv)
    if a.count_only:
        res = forward_gflops_meta()
        print(json.dumps(res))
        return res
    from eval.io import atomic_write_text
    from tfd.config import load_config
    device = torch.device(a.device)
    a.dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = load_config(a.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or (peak_bf16_tflops(name) if device.type == "cuda" else None)
    res = {"schema": SCHEMA, "device": name, "device_type": device.type, "dtype": a.dtype,
           "torch": torch.__version__, "tiny": a.tiny, "peak_bf16_tflops": peak,
           "memory": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss", "jobs": {}}
    for bench in [m for m in a.models.split(",") if m]:
        res["jobs"].update(bench_model(bench, cfg.bench(bench), a, device, peak))
    res["jobs"]["inception"] = rec = bench_inception(device, a.inception_weights, a.batch or (2 if a.tiny else 64),
                                                     16 if a.tiny else 64, a.sample_batches)
    print(f"inception: {rec['images_per_s']:.2f} images/s ({rec['weights']} weights)", flush=True)
    if a.out:
        atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
