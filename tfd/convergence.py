"""The convergence record of a distillation run: FID of the live generator every `train.eval_every`
iterations, on a fixed sample set, scored in memory (training-side code over the `eval` library)."""
from __future__ import annotations

import os

import numpy as np
import torch

from eval.features import build_extractor
from eval.fid import check_provenance, check_ref_stats
from eval.metrics import fid, metric_names
from eval.sample import StackedRandom, check_finite_images


def convergence_eval_fn(b, feature_weights_path: str | os.PathLike | None, ref_stats_path: str | os.PathLike,
                        method_cls, params, *, num: int | None = None, batch_size: int | None = None,
                        device: str | torch.device | None = None, prompts=None):
    """The trainer's `eval_fn(generator, step) -> {fid name: value, "<fid name>_n": n}` for
    convergence curves.

    `b` is the benchmark config (`tfd.config.BenchmarkCfg`); the extractor is
    `b.eval.feature_extractor` with weights `feature_weights_path` (default
    `b.eval.feature_extractor_weights_path`), built on `device` (the trainer's device; default
    cpu), and checked against the reference statistics `ref_stats_path` here, before training
    (FileNotFoundError / ProvenanceMismatch). Each call samples `num` (default
    `b.eval.convergence_samples`) images from the live generator in batches of `batch_size`
    (default `b.eval.batch_size`) with the method's own evaluation sampler
    (`method_cls.sampler_for`), conditions `conditions[i % len]` of the benchmark's condition list
    and per-image seeds `b.eval.base_seed + i` (the same images every call), and scores them in
    memory (`eval.metrics.fid`). `generator` is the live `Denoiser`; its train/eval mode is
    restored afterwards. A text benchmark passes its evaluation prompt table `prompts`, bound to
    the generator while it samples (`DiffusersDenoiser.prompts_bound`; training prompts after)."""
    import contextlib

    from tfd.runs import conditions

    ext = build_extractor(b.eval.feature_extractor,
                          weights_path=feature_weights_path or b.eval.extractor_weights,
                          device=device if device is not None else "cpu",
                          digits_input_size=b.resolution)  # digits-text: 32x32 area-averaged to 8x8
    ref = check_ref_stats(ref_stats_path, [], dim=getattr(ext, "dim", None))
    check_provenance(ext.provenance, ref["provenance"], str(ref_stats_path))
    name = metric_names(ext)["fid"]
    n = int(num or b.eval.convergence_samples)
    bs = int(batch_size or b.eval.batch_size)
    conds = conditions(b, prompts)

    def eval_fn(generator: torch.nn.Module, step: int) -> dict:
        was_training = generator.training
        generator.eval()
        device = next(generator.parameters()).device
        sampler = method_cls.sampler_for(generator, params)
        feats = []
        bound = generator.prompts_bound(conds) if b.task == "text" else contextlib.nullcontext()
        try:
            with torch.no_grad(), bound:
                for s0 in range(0, n, bs):
                    idx = np.arange(s0, min(n, s0 + bs))
                    c = torch.as_tensor(conds.for_samples(idx), device=device)
                    x = sampler(c, StackedRandom(b.eval.base_seed + idx, device=device))
                    check_finite_images(x, f"the generator at step {step} (convergence record)",
                                        first_seed=int(b.eval.base_seed + idx[0]))
                    feats.append(ext.features_in_memory(x))
        finally:
            generator.train(was_training)
        return {name: fid(np.concatenate(feats), ref)[0], f"{name}_n": n}

    return eval_fn
