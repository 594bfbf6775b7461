# Sampling (per-image seeds and conditions, sharded, merged) and scoring (one JSON per metric), for
# every active benchmark: results/<bench>/<method>/<run>/. A text benchmark's rows read its prompt
# table (image i <-> prompt i % len <-> seed base + i) and its CLIP model.

rule sample_shard:
    input:
        unpack(sample_inputs),
    output:
        temp("results/{bench}/{method}/{run}/samples/shard{k}of{n}.npz"),
    params:
        spec=run_spec,
        reads=sample_spec,
        flags=input_flags,
    log:
        "logs/{bench}/sample_{method}_{run}_{k}of{n}.log",
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} tfd sample --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress "
        "--run {wildcards.run} --teacher {input.teacher} {params.flags} "
        "--shard {wildcards.k}/{wildcards.n} --out {output} > {log} 2>&1"


rule merge_samples:
    input:
        shard_files,
    output:
        "results/{bench}/{method}/{run}/samples.npz",
    log:
        "logs/{bench}/merge_{method}_{run}.log",
    shell:
        "OMP_NUM_THREADS={threads} tfd merge-samples --config {CONFIG_FILE} --bench {wildcards.bench} "
        "--out {output} {input} > {log} 2>&1"


# One score rule per active benchmark (its metric files are its outputs): `score` for Table 1's
# benchmark, `score_text` for Table 2's, `score_modes` for the benchmark with known modes (the slurm
# profile sets their resources by these names).
_scored = set()
for _bench, _name in ((BENCH, "score"), (TEXT_BENCH, "score_text"), (MODES_BENCH, "score_modes")):
    if _bench is None or _bench in _scored:
        continue
    _scored.add(_bench)

    rule:
        name:
            _name
        input:
            unpack(score_inputs),
        output:
            [f"results/{{bench}}/{{method}}/{{run}}/metrics/{m}.json" for m in BENCHES[_bench].eval.metrics],
        wildcard_constraints:
            bench=re.escape(_bench),
        params:
            spec=score_spec,
            outdir=lambda wc: f"results/{wc.bench}/{wc.method}/{wc.run}/metrics",
            flags=input_flags,
        log:
            "logs/{bench}/score_{method}_{run}.log",
        resources:
            gpu=1,
        shell:
            "OMP_NUM_THREADS={threads} tfd score --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress "
            "--samples {input.samples} {params.flags} --out-dir {params.outdir} > {log} 2>&1"
