"""fid_digits in memory vs through PNG files and torch-fidelity: time and agreement.

Samples: N "digit-like" images = real digits (drawn with replacement) plus Gaussian noise, as a
float [-1, 1] NCHW tensor, i.e. what a one-step generator hands the evaluator.

(a) in memory: EDM quantisation + digits-net features straight from the tensor, Frechet distance
    to precomputed reference statistics (what training-time evaluation does);
(b) files: quantise, write one PNG per sample to a temporary folder, then torch-fidelity's own
    `calculate_metrics(input1=<samples folder>, input2=<real folder>, feature_extractor='digits-net')`;
(c) the same folders through clean-fid's `compute_fid` with the digits net as custom extractor.

Usage: python benchmarks/bench_fid_inmemory.py [--net PATH] [--n 3000] [--noise 0.2] [--threads 1]
Without --net (or if the file is missing) the digits net is trained to a temporary file first.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default=None, help="digits net .safetensors (trained to a temp file if absent)")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-cleanfid", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_fid_") as d:
        return _run(args, Path(d))


def _run(args, tmp: Path) -> int:
    import torch_fidelity
    from PIL import Image

    from eval.digits_net import train_digits_net
    from eval.features import TORCH_FIDELITY_DIGITS, get_extractor, quantise_edm
    from eval.fid import feature_stats, frechet_distance
    from eval.score import make_ref_stats
    from tfd.data import digits_arrays

    net = Path(args.net) if args.net else tmp / "digits_net.safetensors"
    if not net.is_file():
        t = time.time()
        info = train_digits_net(net, seed=0)
        print(f"trained digits net -> {net}: held-out acc {info['test_acc']:.4f} in {time.time() - t:.1f} s")
    ext = get_extractor("digits", {"digits_weights_path": str(net)})

    # real reference: all 1,797 digits, quantised like samples
    xr = torch.from_numpy(digits_arrays("all")[0])
    real_u8 = quantise_edm(xr).permute(0, 2, 3, 1).numpy()
    t = time.time()
    ref = make_ref_stats(real_u8, tmp / "ref.npz", ext, source="digits_arrays('all')")
    t_ref = time.time() - t
    # samples
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(len(xr), (args.n,), generator=g)
    x = (xr[idx] + args.noise * torch.randn((args.n, *xr.shape[1:]), generator=g)).clamp(-1, 1)

    # (a) in memory
    t = time.time()
    feats = ext.features_in_memory(x)
    fid_a = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])
    t_a = time.time() - t

    # (b) PNGs + torch-fidelity
    real_dir, fake_dir = tmp / "real", tmp / "fake"
    real_dir.mkdir()
    fake_dir.mkdir()
    for i, im in enumerate(real_u8):
        Image.fromarray(im[..., 0]).save(real_dir / f"{i:06d}.png")
    t = time.time()
    u8 = quantise_edm(x).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(u8):
        Image.fromarray(im[..., 0]).save(fake_dir / f"{i:06d}.png")
    t_write = time.time() - t
    t = time.time()
    fid_b = torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), fid=True, feature_extractor=TORCH_FIDELITY_DIGITS,
        feature_layer_fid="penultimate", feature_extractor_weights_path=str(net), cuda=False,
        save_cpu_ram=True, cache=False, verbose=False, batch_size=500)["frechet_inception_distance"]
    t_b = time.time() - t

    print(f"N={args.n} samples (noise {args.noise}), reference N={len(real_u8)}; torch threads "
          f"{torch.get_num_threads()}; ref stats built once in {t_ref:.2f} s")
    print(f"(a) in memory             : fid_digits = {fid_a:.10f}   {t_a:7.2f} s")
    print(f"(b) PNGs + torch-fidelity : fid_digits = {fid_b:.10f}   {t_write + t_b:7.2f} s "
          f"(write {t_write:.2f} s + torch-fidelity {t_b:.2f} s, incl. re-reading the {len(real_u8)} real PNGs)")
    rel = abs(fid_a - fid_b) / abs(fid_b)
    print(f"    relative difference (a) vs (b): {rel:.2e}   speed-up {(t_write + t_b) / t_a:.1f}x")
    ok = rel < 1e-6
    if not args.no_cleanfid:
        from cleanfid import fid as cfid

        t = time.time()
        fid_c = cfid.compute_fid(str(fake_dir), str(real_dir), mode="legacy_tensorflow",
                                 custom_feat_extractor=ext.cleanfid_fn(), device=torch.device("cpu"),
                                 num_workers=0, batch_size=500, verbose=False)
        t_c = time.time() - t
        rel_c = abs(fid_a - fid_c) / abs(fid_c)
        print(f"(c) PNGs + clean-fid      : fid_digits = {fid_c:.10f}   {t_c:7.2f} s (rel. diff to (a) {rel_c:.2e})")
        ok = ok and rel_c < 1e-6
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
