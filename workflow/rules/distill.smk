# Distillation runs: one job per run; resumes from its checkpoint when rerun (preemption, time limit).


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
                                                        ("prompts", "prompts"))
                                        if k in input.keys() and input[k]),
        # more than one GPU (set-resources distill:gpu=N): one process per GPU with torchrun (DDP)
        launch=lambda wc, resources: (f"torchrun --standalone --nproc-per-node {resources.gpu} -m tfd.cli --"
                                      if int(resources.get("gpu", 0)) > 1 else "tfd"),
    log:
        "logs/{bench}/distill_{method}_{run}.log",
    threads: 1
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} distill --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress --run {wildcards.run} "
        "--teacher {input.teacher} --out-dir {params.outdir} {params.conv} > {log} 2>&1"
