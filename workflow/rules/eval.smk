# Sampling (per-image seeds, class-balanced, sharded, merged) and scoring (one JSON per metric).

rule sample_shard:
    input:
        teacher=teacher_file(),
        generator=generator_input,
    output:
        temp(f"{BENCH_DIR}/{{method}}/{{run}}/samples/shard{{k}}of{{n}}.npz"),
    params:
        spec=run_spec,
        gen=lambda wc, input: f"--generator {input.generator}" if input.generator else "",
    log:
        f"logs/{BENCH}/sample_{{method}}_{{run}}_{{k}}of{{n}}.log",
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} tfd sample --config {CONFIG_FILE} --no-progress --run {wildcards.run} --teacher {input.teacher} {params.gen} "
        "--shard {wildcards.k}/{wildcards.n} --out {output} > {log} 2>&1"


rule merge_samples:
    input:
        shard_files,
    output:
        f"{BENCH_DIR}/{{method}}/{{run}}/samples.npz",
    log:
        f"logs/{BENCH}/merge_{{method}}_{{run}}.log",
    shell:
        "OMP_NUM_THREADS={threads} tfd merge-samples --out {output} {input} > {log} 2>&1"


rule score:
    input:
        samples=f"{BENCH_DIR}/{{method}}/{{run}}/samples.npz",
        ref=ref_stats_file(),
        fweights=feature_weights_file(),
    output:
        [f"{BENCH_DIR}/{{method}}/{{run}}/metrics/{m}.json" for m in METRICS],
    params:
        outdir=lambda wc: f"{BENCH_DIR}/{wc.method}/{wc.run}/metrics",
        fweights=lambda wc, input: f"--feature-weights {input.fweights}" if input.fweights else "",
    log:
        f"logs/{BENCH}/score_{{method}}_{{run}}.log",
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} tfd score --config {CONFIG_FILE} --no-progress --samples {input.samples} --ref-stats {input.ref} "
        "{params.fweights} --out-dir {params.outdir} > {log} 2>&1"
