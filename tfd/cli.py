"""The `tfd` command line: thin subcommands over the library (each parses, validates, calls one function)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def default_device() -> str:
    """The device a command runs on unless `--device` says otherwise: `cuda` when torch sees a
    GPU, else `cpu`. Every command that picks a device calls this."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _config_files(args) -> list[str]:
    return args.config or ["config.yaml"]


def _cfg(args):
    """(config, the benchmark this command works on). `--bench X` makes X the config's only active
    benchmark (`benchmark: X`, no `text_benchmark`): a command works on one benchmark."""
    from tfd.config import load_config
    overrides = ({"benchmark": args.bench, "text_benchmark": None, "modes_benchmark": None}
                 if getattr(args, "bench", None) else None)
    cfg = load_config(_config_files(args), overrides)
    return cfg, cfg.bench()


def _prompts(args, b):
    """The prompt table of a text benchmark (`--prompts`), None for a class benchmark."""
    from tfd.runs import conditions
    return conditions(b, args.prompts) if b.task == "text" else None


def _run(b, name: str):
    """The run block `name` of benchmark `b`; ConfigError listing the defined runs otherwise."""
    from tfd.config import ConfigError
    if name not in b.runs:
        raise ConfigError(f"run {name!r} is not defined (defined: {', '.join(sorted(b.runs))})")
    return b.runs[name]


def cmd_check_config(args):
    from tfd.config import check
    cfg, b = _cfg(args)
    check(cfg, files=True)
    for name in cfg.active:
        print(f"config OK: benchmark {name!r} ({cfg.bench(name).task}), runs {', '.join(cfg.bench(name).runs)}")


def cmd_train_teacher(args):
    from tfd.runs import load_data
    from tfd.train_teacher import train_teacher
    cfg, b = _cfg(args)
    if b.teacher.kind != "train":
        sys.exit(f"benchmark {cfg.benchmark!r} uses a pretrained teacher (teacher.kind={b.teacher.kind!r}); "
                 "nothing to train")
    x, y = load_data(b, args.data_store)
    info = train_teacher(b.teacher, x, y, b.num_classes, args.out, progress=not args.no_progress)
    print(f"teacher: {info['params']:,} parameters, {info['steps']} steps in {info['wall_s']:.0f} s -> {args.out}")


def cmd_train_feature_net(args):
    from eval.digits_net import train_digits_net
    info = train_digits_net(args.out, seed=args.seed, data=args.data)
    print(f"{args.data} feature net: held-out accuracy {info['test_acc']:.4f} -> {args.out}")


def _extractor(args, b):
    """The benchmark's feature extractor (`eval.feature_extractor`), weights from `--feature-weights`
    or `eval.feature_extractor_weights_path`, on `--device` (default: `default_device()`)."""
    from eval.features import build_extractor
    from tfd.config import ConfigError
    weights = args.feature_weights or b.eval.extractor_weights
    if weights is None:
        built = (" (the workflow builds it: rule digits_feature_net)"
                 if b.eval.feature_extractor in ("digits", "shapes") else "")
        raise ConfigError(f"the {b.eval.feature_extractor!r} feature extractor needs its weights: pass "
                          f"--feature-weights PATH or set eval.{b.eval.weights_key}{built}")
    return build_extractor(b.eval.feature_extractor, weights_path=weights, device=args.device or default_device(),
                           digits_input_size=b.resolution)  # digits: 8x8, or 32x32 digits-text averaged to 8x8


def cmd_ref_stats(args):
    import torch

    from eval.sample import quantise_edm, to_nhwc_numpy
    from eval.score import make_ref_stats
    from tfd.config import ConfigError
    from tfd.runs import load_data
    cfg, b = _cfg(args)
    if b.task == "text":  # the prompt table's real images, centre-cropped and LANCZOS-resized (DMD2's protocol)
        from eval.coco import load_real_images
        table = _prompts(args, b)
        _, images_dir = _captions_and_images(args, b)
        if not images_dir:
            raise ConfigError("a text benchmark's reference statistics need the real images: pass --images-dir or "
                              f"set benchmarks.{cfg.benchmark}.data.images_dir")
        real = load_real_images(table, images_dir, b.eval.resolution or b.resolution)
        source = f"{len(real)} images of {args.prompts} from {images_dir}"
    elif args.data_store:  # the store's uint8 images are the EDM-quantised training data, bit for bit
        from tfd.runs import open_data_store
        store = open_data_store(b, args.data_store)
        real, source = store.images, f"{cfg.benchmark} training data (dataset store {store.sha256[:12]})"
    else:
        x, _ = load_data(b)
        real, source = to_nhwc_numpy(quantise_edm(torch.as_tensor(x))), f"{cfg.benchmark} training data"
    make_ref_stats(real, args.out, _extractor(args, b), source=source)
    print(f"reference statistics of {len(real)} real images -> {args.out}")


# ----------------------------------------------------------------------------------------------
# text-to-image: data, prompt table, the embedded teacher and CLIP


def _text_bench(args):
    """(config, benchmark) of a command that only applies to a text benchmark (default: the config's
    `text_benchmark`); ConfigError otherwise."""
    from tfd.config import ConfigError, load_config
    if getattr(args, "bench", None) is None:
        args.bench = load_config(_config_files(args)).text_benchmark
    cfg, b = _cfg(args)
    if b.task != "text":
        raise ConfigError(f"`tfd {args.cmd}` applies to a text-to-image benchmark; {cfg.benchmark!r} is "
                          f"class-conditional (pass --bench, e.g. --bench {cfg.text_benchmark or 'digits_text'})")
    return cfg, b


def cmd_text_data(args):
    from eval.digits_text import write_digits_coco
    from tfd.config import ConfigError
    cfg, b = _text_bench(args)
    if b.data.kind != "digits_text":
        raise ConfigError(f"benchmarks.{cfg.benchmark}.data.kind is {b.data.kind!r}: only the embedded "
                          "'digits_text' data is written by the suite (COCO comes from your site paths)")
    info = write_digits_coco(args.out_dir, size=b.resolution)
    print(json.dumps(info["counts"]))
    print(f"digits-text data ({info['counts']['images']} images) -> {args.out_dir}")


def _captions_and_images(args, b):
    """(captions json, images folder) from --data-dir (the embedded folder), the flags, or the config."""
    from pathlib import Path
    if getattr(args, "data_dir", None):
        return Path(args.data_dir) / "captions.json", Path(args.data_dir) / "images"
    return (getattr(args, "captions_json", None) or b.data.captions_json,
            getattr(args, "images_dir", None) or b.data.images_dir)


def cmd_prompts(args):
    from eval.coco import build_coco_prompts
    from eval.conditions import load_prompt_table
    from tfd.config import ConfigError
    cfg, b = _text_bench(args)
    captions, images = _captions_and_images(args, b)
    given = args.prompts_file or b.prompts.file
    if given:  # DMD2's all_prompts.pkl, a .txt of captions, or a prompt table: taken as given, in order
        table = load_prompt_table(given)
    elif not captions:
        raise ConfigError(f"no captions: set benchmarks.{cfg.benchmark}.data.captions_json (COCO-2014 "
                          "captions_val2014.json) or prompts.file, or pass --captions-json / --data-dir")
    else:
        table = build_coco_prompts(captions, b.prompts.num_prompts, seed=b.prompts.seed, images_dir=images)
    table.save_jsonl(args.out)
    print(f"prompt table: {table.describe()} -> {args.out}")


def _positives_cfg(b, args):
    """The positives settings: the benchmark's block, or run `--run`'s (with its overrides);
    ConfigError for a run that is not defined or does not train."""
    from tfd.config import ConfigError
    if not getattr(args, "run", None):
        return b.positives
    if not _run(b, args.run).trains:
        raise ConfigError(f"run {args.run!r} is a sampler row: only training runs have positives settings")
    return b.positives_for(args.run)


def _paired_set(args, b):
    """(captions json, images folder) of the paired image set, or (None, None): --data-dir (the
    embedded data), positives.paired_*, or for the embedded benchmark its data."""
    from pathlib import Path
    p = _positives_cfg(b, args)
    if p.paired_captions_json:
        return p.paired_captions_json, p.paired_images_dir
    if getattr(args, "data_dir", None):
        return Path(args.data_dir) / "captions.json", Path(args.data_dir) / "images"
    return None, None


def cmd_train_prompts(args):
    from eval.conditions import load_prompt_table
    from tfd.config import ConfigError
    from tfd.positives import train_prompts
    cfg, b = _text_bench(args)
    p = _positives_cfg(b, args)
    if p.prompts_file:
        table = load_prompt_table(p.prompts_file)
    else:
        captions, _ = _captions_and_images(args, b)
        if b.data.kind == "digits_text" and not getattr(args, "data_dir", None):
            raise ConfigError("pass --data-dir (the embedded data folder of rule text_data, e.g. "
                              f"results/{cfg.benchmark}/data): its captions are the training prompts")
        if not captions:
            raise ConfigError(f"benchmarks.{cfg.benchmark}.positives.prompts_file: required (a training prompt list, "
                              "e.g. LAION prompts) when the benchmark has no captions to draw from")
        table = train_prompts(captions, p.num_prompts, p.prompts_seed)
    table.save_jsonl(args.out)
    print(f"training prompts: {table.describe()} -> {args.out}")


def cmd_latents(args):
    from tfd.config import ConfigError
    from tfd.positives import encode_paired_latents
    cfg, b = _text_bench(args)
    captions, images = _paired_set(args, b)
    if not captions:
        raise ConfigError(f"benchmarks.{cfg.benchmark}.positives: no paired image set (set paired_captions_json and "
                          "paired_images_dir, or pass --data-dir)")
    p = _positives_cfg(b, args)
    info = encode_paired_latents(args.teacher, captions, images, args.out, resolution=b.resolution,
                                 fraction=p.paired_fraction, seed=p.prompts_seed,
                                 device=default_device(), progress=not args.no_progress)
    print(json.dumps(info))


def cmd_positives(args):
    from eval.conditions import load_prompt_table
    from eval.sample import parse_shard
    from tfd.positives import positives_shard
    cfg, b = _text_bench(args)
    counts = positives_shard(args.teacher, load_prompt_table(args.train_prompts), _positives_cfg(b, args),
                             parse_shard(args.shard), args.out, paired_latents=args.latents,
                             device=default_device(), progress=not args.no_progress)
    print(json.dumps(counts))


def cmd_merge_positives(args):
    from tfd.positives import merge_positives
    counts = merge_positives(args.parts, args.out)
    print(json.dumps(counts))
    print(f"merged {len(args.parts)} positives shards -> {args.out}")


def _text_arrays(args):
    from eval.digits_text import digits_text_arrays
    return digits_text_arrays(args.data_dir)


def cmd_train_vae(args):
    from tfd.t2i_tiny import tiny_vae_config
    from tfd.train_t2i import train_vae
    cfg, b = _text_bench(args)
    images, _, _ = _text_arrays(args)
    v = b.teacher.vae
    arch = {**tiny_vae_config(sample_size=b.resolution), **v.arch_overrides}
    info = train_vae(images, args.out, vae_config=arch, steps=v.steps, batch_size=v.batch_size,
                     lr=v.lr, kl_weight=v.kl_weight, seed=v.seed, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))}))


def cmd_train_t2i_teacher(args):
    from tfd.train_t2i import train_t2i_teacher
    cfg, b = _text_bench(args)
    images, captions, _ = _text_arrays(args)
    t = b.teacher
    info = train_t2i_teacher(images, captions, args.vae, args.out, unet_config_overrides=t.arch_overrides,
                             steps=t.train.steps, batch_size=t.train.batch_size, lr=t.train.lr,
                             warmup_steps=t.train.warmup_steps, caption_dropout=t.caption_dropout,
                             ema_halflife_steps=t.train.ema_halflife_steps, seed=t.train.seed,
                             progress=not args.no_progress)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))}))


def cmd_train_clip(args):
    from eval.tiny_clip import train_tiny_clip
    cfg, b = _text_bench(args)
    images, captions, labels = _text_arrays(args)
    c = b.eval.clip_train
    info = train_tiny_clip(images, captions, args.out_dir, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
                           seed=c.seed, progress=not args.no_progress, name=b.eval.clip_model, labels=labels,
                           clip_resize=b.eval.clip_resize)
    print(json.dumps(info.get("checks", {}), default=str))


def cmd_distill(args):
    import dataclasses

    from tfd import dist
    from tfd.config import ConfigError
    from tfd.runs import build_method
    from tfd.trainer import Trainer
    cfg, b = _cfg(args)
    dist.init()
    run = _run(b, args.run)
    if not run.trains:
        raise ConfigError(f"run {args.run!r} is a sampler row ({run.method}): nothing to distill")
    tcfg = run.train if args.steps is None else dataclasses.replace(run.train, steps=args.steps)
    device = default_device()
    data_sha256 = None
    if args.data_store:  # checked first; its identity (tfd.datastore.store_sha256) goes in train.json
        from tfd.runs import open_data_store
        data_sha256 = open_data_store(b, args.data_store).sha256
    if b.task == "text":  # the teacher speaks the training prompts; the convergence record the eval prompts
        from eval.conditions import load_prompt_table
        from tfd.positives import check_positives_prompts
        from tfd.runs import load_teacher
        if not (args.train_prompts and args.positives):
            raise ConfigError(f"run {args.run!r} of the text benchmark {cfg.benchmark!r} needs --train-prompts and "
                              "--positives (rules train_prompts and merge_positives make them)")
        from tfd.positives import positives_key
        train_table = load_prompt_table(args.train_prompts)
        meta = check_positives_prompts(args.positives, train_table)
        want = positives_key(b.positives_for(args.run))
        if meta.get("key") != want:
            raise ConfigError(f"positives cache {args.positives} was made with other positives settings (key "
                              f"{meta.get('key')}) than run {args.run!r} has now (key {want}): rebuild it "
                              f"(rules positives_shard + merge_positives)")
        teacher = load_teacher(b, args.teacher, device, prompts=train_table)
    else:
        from tfd.runs import load_teacher
        teacher = load_teacher(b, args.teacher, device)
    from tfd.utils import path_sha256
    method = build_method(b, args.run, teacher, device=device, seed=tcfg.seed, positives=args.positives,
                          pairs=args.pairs, teacher_sha256=path_sha256(args.teacher) if args.pairs else None,
                          data_store=args.data_store)
    eval_fn = None
    if tcfg.eval_every and args.ref_stats:
        from tfd.convergence import convergence_eval_fn
        eval_fn = convergence_eval_fn(b, args.feature_weights, args.ref_stats, type(method), method.params,
                                      device=device, prompts=_prompts(args, b))
    from tfd.utils import path_sha256
    inputs = {k: path_sha256(v) for k, v in (("teacher", args.teacher), ("positives", args.positives),
                                              ("train_prompts", args.train_prompts), ("pairs", args.pairs))
              if v}
    if data_sha256:
        inputs["data"] = data_sha256
    if eval_fn is not None:  # the convergence record's inputs shape convergence.jsonl
        inputs.update({k: path_sha256(v) for k, v in (("ref_stats", args.ref_stats), ("prompts", args.prompts),
                                                      ("feature_weights", args.feature_weights)) if v})
    info = Trainer(method, tcfg, args.out_dir, device=device, eval_fn=eval_fn, progress=not args.no_progress,
                   inputs=inputs).fit(resume=not args.no_resume)
    dist.print0(f"{args.run}: {info['iters']} iterations in {info['train_wall_s']:.0f} s -> {info['generator']}")


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a SLURM allocation; else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cmd_prepare_data(args):
    import signal

    from tfd.datastore import build_store

    def stop(signum, frame):  # SIGTERM (scancel, a killed Snakemake job): unwind, so nothing half-written stays
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        meta = build_store(args.zip, args.out, workers=args.workers, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, old)
    shape = "x".join(map(str, meta["arrays"]["images"]["shape"]))
    print(f"dataset store: {meta['count']} images ({shape} uint8) in {meta['num_classes']} classes, "
          f"sha256 {meta['sha256'][:12]} -> {args.out}")


def cmd_teacher_pairs(args):
    from eval.sample import parse_shard
    from tfd.config import ConfigError
    from tfd.methods import get_method
    from tfd.pairs import make_pairs_shard, pairs_settings
    from tfd.runs import conditions, load_teacher
    from tfd.utils import path_sha256
    cfg, b = _cfg(args)
    run = _run(b, args.run)
    if not (run.trains and getattr(get_method(run.method), "needs_pairs", False)):
        raise ConfigError(f"run {args.run!r} ({run.method}) trains on no teacher pairs (method 'dmd' does)")
    if b.task == "text":
        raise ConfigError(f"teacher pairs are made for class benchmarks; {cfg.benchmark!r} is a text benchmark")
    device = default_device()
    meta = make_pairs_shard(load_teacher(b, args.teacher, device), pairs_settings(run.params), len(conditions(b)),
                            parse_shard(args.shard), args.out, teacher_path=args.teacher,
                            teacher_sha256=path_sha256(args.teacher), batch_size=args.batch_size or b.eval.batch_size,
                            device=device, progress=not args.no_progress)
    print(f"teacher pairs {meta['rows'][0]}..{meta['rows'][1] - 1} ({meta['settings']}, key {meta['key']}) "
          f"-> {args.out}")


def cmd_merge_pairs(args):
    from tfd.pairs import merge_pairs
    meta = merge_pairs(args.parts, args.out)
    print(f"merged {len(args.parts)} teacher pairs shards ({meta['settings']['num']} pairs) -> {args.out}")


def cmd_sample(args):
    from pathlib import Path

    import numpy as np

    from eval.sample import generate, parse_shard, save_npz
    from tfd.runs import build_sampler, conditions
    cfg, b = _cfg(args)
    shard = parse_shard(args.shard)
    device = default_device()
    prompts = _prompts(args, b)
    sampler = build_sampler(b, args.run, args.teacher, args.generator, device=device, prompts=prompts)
    n = args.num if args.num is not None else b.eval.num_samples
    t0 = time.time()
    arrays = generate(sampler, n, conditions(b, prompts), base_seed=b.eval.base_seed,
                      batch_size=args.batch_size or b.eval.batch_size, shard=shard, device=device,
                      progress=not args.no_progress)
    from tfd.utils import path_sha256
    made_by = args.generator or args.teacher  # what the images come from: a merge refuses shards of two
    arrays["source"] = np.array(f"{cfg.benchmark}/{args.run} {Path(made_by).name} sha256:{path_sha256(made_by)[:16]}")
    save_npz(args.out, arrays)
    dt = time.time() - t0
    print(f"{len(arrays['arr_0'])} samples ({args.run}, shard {shard[0]}/{shard[1]}) "
          f"in {dt:.1f} s ({len(arrays['arr_0']) / max(dt, 1e-9):.2f} images/s, batch "
          f"{args.batch_size or b.eval.batch_size}, {device}) -> {args.out}")


def cmd_merge_samples(args):
    from eval.sample import merge_npz
    from tfd.runs import sample_spec
    cfg, b = _cfg(args)
    m = merge_npz(args.parts, args.out, spec=sample_spec(b, args.num))
    print(f"merged {len(args.parts)} shards, {len(m['arr_0'])} samples -> {args.out}")


def cmd_score(args):
    from eval.score import score_samples
    from tfd.runs import sample_spec
    cfg, b = _cfg(args)
    extractor = _extractor(args, b)  # also the classifier of class_acc (digits)
    if args.batch_size or b.eval.score_batch_size:
        extractor.batch_size = args.batch_size or b.eval.score_batch_size
    t0 = time.time()
    clip = {"bootstrap": b.eval.bootstrap, "diversity_per_condition": b.eval.diversity_per_condition,
            "clip_model": b.eval.clip_model, "clip_resize": b.eval.clip_resize,
            "clip_checkpoint": args.clip_checkpoint or b.eval.clip_checkpoint,
            "clip_model_config": args.clip_model_config or b.eval.clip_model_config}
    res = score_samples(args.samples, args.out_dir, args.metrics or b.eval.metrics, extractor=extractor,
                        ref_stats_path=args.ref_stats, device=extractor.device, config=clip,
                        prompts=_prompts(args, b), resolution=b.eval.resolution, spec=sample_spec(b, args.num))
    dt = time.time() - t0
    n = args.num if args.num is not None else b.eval.num_samples
    print(f"scored {n} samples in {dt:.1f} s ({n / max(dt, 1e-9):.2f} images/s incl. reading and metrics, "
          f"feature batch {getattr(extractor, 'batch_size', None)}, {extractor.device})", file=sys.stderr)
    print(json.dumps({k: (v["value"] if isinstance(v, dict) else v) for k, v in res.items()}))


def _manifest_inputs(args) -> dict:
    return {k: v for k, v in (("teacher", args.teacher), ("ref_stats", args.ref_stats),
                              ("feature_weights", args.feature_weights), ("prompts", getattr(args, "prompts", None)),
                              ("clip_checkpoint", getattr(args, "clip_checkpoint", None)),
                              ("data_store", getattr(args, "data_store", None))) if v}


def cmd_table(args):
    from tfd.tables import write_convergence, write_manifest, write_table
    cfg, b = _cfg(args)
    df = write_table(cfg, args.results_dir, args.out, table=args.table, ref_stats=args.ref_stats)
    if args.convergence:
        write_convergence(cfg, args.results_dir, args.convergence)
    if args.manifest:
        write_manifest(cfg, args.results_dir, [m for r in df["run"] for m in b.row_runs(r)], args.manifest,
                       table=args.out,
                       config_file=_config_files(args)[-1], extra_files=_manifest_inputs(args))
    print(df.to_string(index=False))


def cmd_ablation(args):
    from tfd.tables import write_ablation, write_manifest
    cfg, b = _cfg(args)
    df = write_ablation(cfg, args.results_dir, args.name, args.out, args.curves)
    if args.manifest:
        write_manifest(cfg, args.results_dir, list(dict.fromkeys(m for r in df["run"] for m in b.row_runs(r))),
                       args.manifest, table=args.out,
                       config_file=_config_files(args)[-1], extra_files=_manifest_inputs(args))
    print(df.to_string(index=False))


def cmd_plan(args):
    from pathlib import Path

    from tfd.config import load_config
    from tfd.plan import format_plan, jobs_from_config, jobs_from_dry_run, load_costs, make_plan, parse_dry_run
    cfg = load_config(_config_files(args))
    costs = load_costs(args.costs) if args.costs else None
    if args.jobs:
        text = Path(args.jobs).read_text() if args.jobs != "-" else sys.stdin.read()
        jobs, other = jobs_from_dry_run(cfg, parse_dry_run(text, args.jobs), args.distill_gpus)
        jobs = [j for j in jobs if not args.bench or j.bench == args.bench]
        source = f"the dry run {args.jobs} ({len(jobs)} jobs priced, {other} other jobs not costed)"
    else:
        benches = [args.bench] if args.bench else [cfg.benchmark] + ([cfg.text_benchmark] if cfg.text_benchmark else [])
        jobs = jobs_from_config(cfg, benches, args.distill_gpus)
        source = f"the tables and sweeps of {', '.join(benches)}"
    print(format_plan(make_plan(jobs, costs, args.gpus), costs, source))


def cmd_convert_edm(args):
    from tfd.networks.convert import convert_edm_pickle
    info = convert_edm_pickle(args.pkl, args.out)
    print(f"converted {args.pkl} -> {args.out}")
    if info:
        print(json.dumps(info, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfd", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of every error (default: one line for errors the user can fix: "
                        "config, missing/foreign/damaged files, data, non-finite loss, permission, disk full)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help, config=True):
        s = sub.add_parser(name, help=help, description=help.replace("%%", "%"))
        if config:
            s.add_argument("--config", action="append", default=None,
                           help="config file (default: config.yaml); give it twice to merge an overlay over it, "
                                "as snakemake --configfile does: --config config.yaml --config .test/config.yaml")
            s.add_argument("--bench", default=None, help="benchmark to use (default: config's `benchmark`; "
                   "text-to-image commands: its `text_benchmark`)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.set_defaults(fn=fn)
        return s

    add("check-config", cmd_check_config, "validate config.yaml and exit")
    s = add("train-teacher", cmd_train_teacher, "train the embedded teacher with the EDM loss")
    s.add_argument("--out", required=True, help="output safetensors (EDM format)")
    s.add_argument("--data-store", default=None, metavar="DIR",
                   help="data.kind edm_zip: read the images from the dataset store (tfd prepare-data)")
    s = add("train-feature-net", cmd_train_feature_net,
            "train the domain feature network (fid_digits; --data shapes: fid_shapes)", config=False)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", default="digits", choices=["digits", "shapes"],
                   help="training data: the digits (10 classes) or the shapes benchmark (its 48 modes as classes)")
    s = add("ref-stats", cmd_ref_stats, "reference feature statistics of the benchmark's real data")
    s.add_argument("--out", required=True)
    s.add_argument("--feature-weights", default=None, metavar="PATH",
                   help="weights of the eval.feature_extractor network (digits: from train-feature-net)")
    s.add_argument("--device", default=None,
                   help="where the feature extractor runs (default: cuda if available, else cpu)")
    s.add_argument("--prompts", default=None,
                   help="text benchmarks: the prompt table whose real images are the reference")
    s.add_argument("--images-dir", default=None,
                   help="text benchmarks: folder of the real images (default: data.images_dir)")
    s.add_argument("--data-dir", default=None, help="text benchmarks: the embedded data folder (its images/)")
    s.add_argument("--data-store", default=None, metavar="DIR",
                   help="data.kind edm_zip: the dataset store (tfd prepare-data) instead of decoding the zip")
    s = add("text-data", cmd_text_data, "write the embedded digits-text data (COCO captions json + PNGs)")
    s.add_argument("--out-dir", required=True)
    s = add("prompts", cmd_prompts, "build a text benchmark's prompt table (pycocotools subset, or prompts.file)")
    s.add_argument("--out", required=True, help="prompt table (.jsonl)")
    s.add_argument("--data-dir", default=None, help="the embedded data folder (captions.json + images/)")
    s.add_argument("--captions-json", default=None, help="COCO captions json (default: data.captions_json)")
    s.add_argument("--images-dir", default=None, help="check that every prompt's image is in this folder")
    s.add_argument("--prompts-file", default=None, help="take this prompt file as given (default: prompts.file)")
    s = add("train-prompts", cmd_train_prompts,
            "build a text benchmark's training prompt table (positives.prompts_file, or distinct captions drawn)")
    s.add_argument("--out", required=True, help="prompt table (.jsonl)")
    s.add_argument("--data-dir", default=None, help="the embedded data folder (captions.json + images/)")
    s.add_argument("--captions-json", default=None, help="COCO captions json (default: data.captions_json)")
    s.add_argument("--run", default=None, help="use this run's positives settings (its overrides)")
    s = add("latents", cmd_latents, "encode the paired image set once with the teacher's VAE (positives)")
    s.add_argument("--run", default=None, help="use this run's positives settings (its overrides)")
    s.add_argument("--teacher", required=True, help="the teacher's diffusers pipeline folder (its VAE)")
    s.add_argument("--data-dir", default=None, help="the embedded data folder (the default paired set)")
    s.add_argument("--out", required=True, help="latents safetensors")
    s = add("positives", cmd_positives,
            "make one shard of the positives cache (real latents, teacher samples for the rest)")
    s.add_argument("--teacher", required=True, help="the teacher's diffusers pipeline folder")
    s.add_argument("--train-prompts", required=True, help="the training prompt table (tfd train-prompts)")
    s.add_argument("--latents", default=None, help="the paired latents (tfd latents); omit: all from the teacher")
    s.add_argument("--run", default=None, help="use this run's positives settings (its overrides)")
    s.add_argument("--shard", default=None,
                   help="k/n: shard k of n (zero-based) of the prompt rows (default: all rows, 0/1)")
    s.add_argument("--out", required=True, help="the shard's safetensors (joined by tfd merge-positives)")
    s = add("merge-positives", cmd_merge_positives, "join positives shards into the cache", config=False)
    s.add_argument("--out", required=True, help="the positives cache (safetensors)")
    s.add_argument("parts", nargs="+", help="every shard file of one cache (any order)")
    s = add("train-vae", cmd_train_vae, "train the embedded text benchmark's tiny AutoencoderKL")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--out", required=True, help="output folder (diffusers AutoencoderKL)")
    s = add("train-t2i-teacher", cmd_train_t2i_teacher,
            "train the embedded tiny SDXL-topology teacher -> a StableDiffusionXLPipeline folder")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--vae", required=True, help="the trained VAE folder (tfd train-vae)")
    s.add_argument("--out", required=True, help="output pipeline folder")
    s = add("train-clip", cmd_train_clip, "train the embedded text benchmark's tiny open_clip model (clip_score)")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--out-dir", required=True)
    s = add("distill", cmd_distill, "train one distillation run (resumes from its checkpoint by default)")
    s.add_argument("--run", required=True, help="run name under benchmarks.<bench>.runs")
    s.add_argument("--teacher", required=True,
                   help="the teacher: EDM-format safetensors, or a diffusers pipeline folder (text benchmarks)")
    s.add_argument("--out-dir", required=True,
                   help="the run's folder: generator.safetensors, ckpt/, stats.jsonl, train.json")
    s.add_argument("--steps", type=int, default=None, help="override train.steps")
    s.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    s.add_argument("--feature-weights", default=None, metavar="PATH",
                   help="feature extractor weights, for the convergence record (train.eval_every)")
    s.add_argument("--ref-stats", default=None, help="for the convergence record (train.eval_every)")
    s.add_argument("--prompts", default=None, help="text benchmarks: the evaluation prompt table (convergence record)")
    s.add_argument("--train-prompts", default=None,
                   help="text benchmarks: the training prompt table (rule train_prompts)")
    s.add_argument("--positives", default=None, help="text benchmarks: the positives cache (rule merge_positives)")
    s.add_argument("--pairs", default=None,
                   help="method dmd: the teacher pairs cache (rules teacher_pairs + merge_teacher_pairs)")
    s.add_argument("--data-store", default=None, metavar="DIR",
                   help="data.kind edm_zip: the dataset store (tfd prepare-data); the sampler reads only the rows "
                        "it draws (default: the whole zip decoded into memory as float32)")
    s = add("teacher-pairs", cmd_teacher_pairs, "make one shard of a DMD run's teacher noise/ODE-output pairs")
    s.add_argument("--run", required=True, help="the run (method dmd) whose pair settings (params.pairs_*) to use")
    s.add_argument("--teacher", required=True, help="the teacher: EDM-format safetensors")
    s.add_argument("--shard", default=None, help="k/n: shard k of n (zero-based) of the pairs (default: all, 0/1)")
    s.add_argument("--batch-size", type=int, default=None, help="pairs per teacher call (default: eval.batch_size)")
    s.add_argument("--out", required=True, help="the shard's safetensors (joined by tfd merge-pairs)")
    s = add("merge-pairs", cmd_merge_pairs, "join teacher pairs shards into the pairs cache", config=False)
    s.add_argument("--out", required=True, help="the pairs cache (safetensors)")
    s.add_argument("parts", nargs="+", help="every shard file of one cache (any order)")
    s = add("prepare-data", cmd_prepare_data, "convert an EDM dataset zip once into a memory-mapped uint8 "
            "dataset store (images.npy, labels, per-class index, store.json), with parallel workers", config=False)
    s.add_argument("--zip", required=True, help="EDM dataset zip (dataset_tool.py: PNGs + dataset.json labels)")
    s.add_argument("--out", required=True, help="the store folder (written atomically; replaced if it exists)")
    s.add_argument("--workers", type=int, default=_usable_cpus(),
                   help="decoding processes (default: the CPUs this process may use)")
    s = add("sample", cmd_sample, "generate samples of a run: image i has seed base+i and condition i %% len")
    s.add_argument("--run", required=True, help="run name under benchmarks.<bench>.runs")
    s.add_argument("--teacher", required=True,
                   help="the teacher: EDM-format safetensors, or a diffusers pipeline folder (text benchmarks)")
    s.add_argument("--generator", default=None, help="exported generator (distillation runs); omit for teacher rows")
    s.add_argument("--out", required=True, help="npz (arr_0 uint8 NHWC, arr_1 condition ids, seeds)")
    s.add_argument("--shard", default=None, help="k/n: write shard k of n (zero-based)")
    s.add_argument("--num", type=int, default=None, help="number of samples (default: eval.num_samples)")
    s.add_argument("--batch-size", type=int, default=None, help="images per sampler call (default: eval.batch_size)")
    s.add_argument("--prompts", default=None, help="text benchmarks: the prompt table (results/<bench>/prompts.jsonl)")
    s = add("merge-samples", cmd_merge_samples, "join shard npz files in seed order; the result must be the "
            "protocol's complete set (eval.num_samples images, seeds from eval.base_seed)")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, default=None,
                   help="number of samples the merged set must hold (default: eval.num_samples)")
    s.add_argument("parts", nargs="+")
    s = add("score", cmd_score, "compute metrics of a sample file, one JSON per metric")
    s.add_argument("--samples", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--ref-stats", required=True)
    s.add_argument("--feature-weights", default=None, metavar="PATH",
                   help="weights of the eval.feature_extractor network (digits: also the class_acc classifier)")
    s.add_argument("--metrics", nargs="*", default=None)
    s.add_argument("--num", type=int, default=None,
                   help="number of samples the file must hold (default: eval.num_samples; the table refuses rows "
                        "scored on another count)")
    s.add_argument("--device", default=None,
                   help="where the feature extractor and CLIP run (default: cuda if available, else cpu)")
    s.add_argument("--prompts", default=None, help="text benchmarks: the prompt table the samples were drawn with")
    s.add_argument("--batch-size", type=int, default=None,
                   help="images per feature-network call (default: eval.score_batch_size, else the extractor's own)")
    s.add_argument("--clip-checkpoint", default=None,
                   help="clip_score: open_clip checkpoint (default: eval.clip_checkpoint)")
    s.add_argument("--clip-model-config", default=None,
                   help="clip_score: open_clip model-config JSON of a custom architecture "
                        "(default: eval.clip_model_config)")
    s = add("table", cmd_table, "render results/table1.csv (or table2.csv) from the metric files; with --bench "
            "shapes, results/table_modes.csv (the table1 rows of that benchmark)")
    s.add_argument("--table", default="table1", choices=["table1", "table2", "table_methods"],
                   help="which table: table1 (class benchmark rows), table2 (text benchmark rows) or "
                        "table_methods (a class benchmark's methods table)")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--convergence", default=None, help="also write the runs' convergence records to this csv")
    s.add_argument("--out", required=True)
    s2 = add("ablation", cmd_ablation, "render results/ablation_<name>.csv (best FID within each update budget)")
    s2.add_argument("--name", required=True, help="ablation name under benchmarks.<bench>.ablations")
    s2.add_argument("--results-dir", default="results")
    s2.add_argument("--out", required=True)
    s2.add_argument("--curves", default=None, help="also write the variants' convergence records to this csv")
    for t in (s, s2):
        t.add_argument("--manifest", default=None, help="write the table's provenance manifest (json) here")
        t.add_argument("--teacher", default=None, help="(manifest) teacher weights the runs used")
        t.add_argument("--ref-stats", default=None, help="(manifest) reference statistics")
        t.add_argument("--feature-weights", default=None, metavar="PATH", help="(manifest) feature extractor weights")
        t.add_argument("--prompts", default=None, help="(manifest) the prompt table of a text benchmark")
        t.add_argument("--clip-checkpoint", default=None, help="(manifest) the CLIP model of clip_score")
        t.add_argument("--data-store", default=None, metavar="DIR",
                       help="(manifest) the dataset store the runs trained on (its recorded sha256)")
    s = add("plan", cmd_plan, "GPU-hours per job kind and in total, and the wall time on --gpus GPUs, of the tables "
            "and sweeps of the benchmark(s) (or of a Snakemake dry run's jobs), from the unit costs measured by "
            "benchmarks/bench_gpu.py; without them it says what is not measured")
    s.add_argument("--costs", default=None, help="the JSON of benchmarks/bench_gpu.py --out (default: none)")
    s.add_argument("--jobs", default=None, help="the saved output of `snakemake -n TARGETS` ('-': stdin); "
                   "default: every table row and sweep of the config's benchmark and text benchmark")
    s.add_argument("--gpus", type=int, default=8, help="GPUs for the wall-time estimate (default 8)")
    s.add_argument("--distill-gpus", type=int, default=1,
                   help="GPUs (torchrun ranks) per distill job, as set-resources distill: gpu (default 1)")
    from tfd.figures import add_figure_parser
    add_figure_parser(sub)
    from tfd.networks.convert import CONVERT_HELP
    s = sub.add_parser("convert-edm", help="convert an EDM .pkl to safetensors", description=CONVERT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("pkl")
    s.add_argument("out")
    s.set_defaults(fn=cmd_convert_edm)
    return p


# commands whose `--out` is a folder (a diffusers save_pretrained folder); every other `--out` is a file
FOLDER_OUTPUTS = ("train-vae", "train-t2i-teacher", "prepare-data")


def _check_outputs_writable(args) -> None:
    """Before any work: the folder of every output a command names (`--out`, `--out-dir`) can be
    written (`eval.io.ensure_writable_dir`), so a long job does not fail at its last step."""
    from pathlib import Path

    from eval.errors import BadFile
    from eval.io import ensure_writable_dir
    for attr, is_dir in (("out", args.cmd in FOLDER_OUTPUTS), ("out_dir", True)):
        value = getattr(args, attr, None)
        if not value or str(value).startswith(("/dev/", "/proc/self/fd/")):
            continue
        flag = f"--{attr.replace('_', '-')}"
        if not is_dir and Path(value).is_dir():
            raise BadFile(value, f"{flag} names a folder", expected="a file path (the folder it goes in is created)")
        if is_dir and Path(value).exists() and not Path(value).is_dir():
            raise BadFile(value, f"{flag} names a file", expected="a folder (created when missing)")
        target = Path(value)
        folder = target if is_dir and target.is_dir() else target.parent  # a new output folder is not made here
        try:
            ensure_writable_dir(folder, f"output folder of {flag}")
        except BadFile as e:  # name the output asked for, and the folder in the way
            raise BadFile(value, f"{flag}: its folder {folder} is not writable", found=e.found) from None


def main(argv=None):
    """Entry point: run the subcommand; an error the user can fix (`eval.errors.is_user_error`) is one
    line `tfd <cmd>: error: ...` and exit status 1, unless `--debug`; any other error is a bug and
    keeps its traceback."""
    args = build_parser().parse_args(argv)
    import warnings

    from eval.errors import is_user_error, one_line
    shown = warnings.showwarning
    if not args.debug:  # a warning is one line too, `tfd <cmd>: warning: ...` (--debug: Python's own form)
        def one_line_warning(message, category, filename, lineno, file=None, line=None):
            print(f"tfd {args.cmd}: warning: {one_line(Exception(str(message)))}", file=sys.stderr)
        warnings.showwarning = one_line_warning
    try:
        _check_outputs_writable(args)
        args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"tfd {args.cmd}: interrupted; outputs are written atomically, so rerun the same command "
              "(distill resumes from its last checkpoint)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        sys.exit(f"tfd {args.cmd}: error: {one_line(e)}")
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    main()
