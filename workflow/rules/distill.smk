# Distillation runs: one job per run; resumes from its checkpoint when rerun (preemption, time limit).


# Teacher noise/image pairs of DMD runs (tfd.pairs): the teacher's Heun ODE output from sigma_max z for
# per-pair seeded noise, sharded (params.pairs_shards jobs) and merged into one cache per distinct
# setting, results/<bench>/pairs/<key>/pairs.safetensors, which every run with those settings reads.
rule teacher_pairs:
    input:
        teacher=bench_teacher,
    output:
        temp("results/{bench}/pairs/{pkey}/shard{k}of{n}.safetensors"),
    params:
        spec=pairs_spec,
        run=lambda wc: pairs_run(wc.bench, wc.pkey),
    log:
        "logs/{bench}/teacher_pairs_{pkey}_{k}of{n}.log",
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} tfd teacher-pairs --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress "
        "--run {params.run} --teacher {input.teacher} --shard {wildcards.k}/{wildcards.n} --out {output} > {log} 2>&1"


rule merge_teacher_pairs:
    input:
        pairs_shards,
    output:
        "results/{bench}/pairs/{pkey}/pairs.safetensors",
    log:
        "logs/{bench}/merge_teacher_pairs_{pkey}.log",
    shell:
        "OMP_NUM_THREADS={threads} tfd merge-pairs --out {output} {input} > {log} 2>&1"



rule distill:
    input:
        unpack(convergence_inputs),
        unpack(distill_inputs),
        teacher=bench_teacher,
    output:
        generator="results/{bench}/{method}/{run}/generator.safetensors",
        info="results/{bench}/{method}/{run}/train.json",
    params:
        spec=run_spec,
        reads=distill_spec,
        outdir=lambda wc: run_dir(wc.run, wc.bench),
        conv=lambda wc, input: " ".join(f"--{flag} {input[k]}"
                                        for k, flag in (("ref", "ref-stats"), ("fweights", "feature-weights"),
                                                        ("positives", "positives"), ("train_prompts", "train-prompts"),
                                                        ("prompts", "prompts"), ("pairs", "pairs"),
                                                        ("data_store", "data-store"))
                                        if k in input.keys() and input[k]),
        # how `tfd` starts (tfd/launch.py): one process; `gpu: N`: torchrun --standalone, N processes (DDP);
        # `nodes: N`: srun + torchrun on each node, c10d rendezvous on the job's first node
        launch=lambda wc, resources: distill_launch(**{k: resources.get(k) for k in LAUNCH_RESOURCES}),
    log:
        "logs/{bench}/distill_{method}_{run}.log",
    threads: 1
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} distill --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress --run {wildcards.run} "
        "--teacher {input.teacher} --out-dir {params.outdir} {params.conv} > {log} 2>&1"
