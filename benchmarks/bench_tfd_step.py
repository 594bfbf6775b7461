"""Share of a digits TFD step spent in the two losses vs in the networks (generator + teacher).

Usage: python benchmarks/bench_tfd_step.py [--teacher results/digits/teacher/teacher.safetensors]
Prints the mean time of a full step (generator forward, teacher features with and without grad,
losses, backward) and of the losses alone (forward + backward on the same pooled features).
Without --teacher it uses a randomly initialised digits teacher (same architecture and cost).
"""
from __future__ import annotations

import argparse
import time

import torch

from tfd.config import load_config
from tfd.denoiser import EDMDenoiser, load_denoiser
from tfd.losses import anchor_margin_loss, drifting_loss
from tfd.methods import input_sigma
from tfd.networks.edm import EDMPrecond, digits_unet_kwargs
from tfd.runs import build_method


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--run", default="tfd")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    cfg = load_config(args.config)
    b = cfg.bench()
    if args.teacher:
        teacher = load_denoiser(args.teacher)
    else:
        teacher = EDMDenoiser(EDMPrecond(**digits_unet_kwargs(**b.teacher.arch_overrides)))
    m = build_method(b, args.run, teacher)
    p = m.params
    opt = torch.optim.AdamW(m.generator.parameters(), lr=1e-6)

    def full_step():
        out = m.train_step(m.make_batch(), 0)
        opt.zero_grad()
        out.losses["generator"].backward()

    # pooled features of one batch, for the losses alone
    batch = m.make_batch()
    G, Ng, Nr = p.groups_per_rank, p.n_gen, p.n_pos + p.n_anchor
    s = input_sigma(p, m.generator)
    with torch.no_grad():
        x = m.generator.denoise(batch["z"].flatten(0, 1) * s, s, batch["cond"].repeat_interleave(Ng))
        gf = m.teacher_features(x, batch["xi_gen"].flatten(0, 1), batch["sigma_f"].repeat_interleave(Ng),
                                batch["cond"].repeat_interleave(Ng))
        rf = m.teacher_features(batch["ref"].flatten(0, 1), batch["xi_ref"].flatten(0, 1),
                                batch["sigma_f"].repeat_interleave(Nr), batch["cond"].repeat_interleave(Nr))

    def losses_only():
        for name in p.layers:
            g = gf[name].reshape(G, Ng, -1).clone().requires_grad_(True)
            r = rf[name].reshape(G, Nr, -1)
            loss = drifting_loss(g, r[:, :p.n_pos], p.radii, p.normalization)
            loss = loss + p.lambda_anchor * anchor_margin_loss(g, r[:, p.n_pos:], p.anchor_alpha, p.anchor_temperature)
            loss.backward()

    def timeit(fn):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        return (time.perf_counter() - t0) / args.reps

    t_full, t_loss = timeit(full_step), timeit(losses_only)
    dims = {k: v.shape[1] for k, v in gf.items()}
    print(f"torch threads {torch.get_num_threads()}; G={G} Ng={Ng} Np={p.n_pos} Na={p.n_anchor}; feature dims {dims}")
    print(f"full TFD step (fwd+bwd): {t_full * 1e3:8.2f} ms")
    print(f"losses alone (fwd+bwd):  {t_loss * 1e3:8.2f} ms  = {100 * t_loss / t_full:.1f}% of the step")
    print(f"networks (generator + teacher fwd/bwd, rest): {100 * (1 - t_loss / t_full):.1f}%")


if __name__ == "__main__":
    main()
