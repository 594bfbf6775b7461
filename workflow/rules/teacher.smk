# The teachers (train the embedded one, or convert EDM's checkpoint), the domain feature network
# and the FID reference statistics. The text-to-image teacher, its data and CLIP: text.smk.

if BENCH_CFG.teacher.kind == "train":

  rule train_teacher:
      input:
          unpack(lambda wc: dataset_input(BENCH)),
      output:
          f"{BENCH_DIR}/teacher/teacher.safetensors",
      params:
          spec=teacher_spec(BENCH),
      log:
          f"logs/{BENCH}/train_teacher.log",
      threads: 2  # runs alone early in the DAG: 0.12 s/step with 2 threads vs 0.15 s with 1 (idle machine)
      resources:
          runtime=60,
      shell:
          "OMP_NUM_THREADS={threads} tfd train-teacher --config {CONFIG_FILE} --no-progress --out {output} > {log} 2>&1"


elif str(BENCH_CFG.teacher.checkpoint or "").endswith(".pkl"):

  rule convert_edm:
      input:
          BENCH_CFG.teacher.checkpoint,
      output:
          f"{BENCH_DIR}/teacher/teacher.safetensors",
      log:
          f"logs/{BENCH}/convert_edm.log",
      resources:
          mem_mb=8000,
      shell:
          "tfd convert-edm {input} {output} > {log} 2>&1"


rule digits_feature_net:
    output:
        "results/{bench}/feature_net/digits_net.safetensors",
    log:
        "logs/{bench}/digits_feature_net.log",
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} tfd train-feature-net --no-progress --out {output} > {log} 2>&1"


rule ref_stats:
    input:
        unpack(ref_stats_inputs),
    output:
        "results/{bench}/ref_stats.npz",
    log:
        "logs/{bench}/ref_stats.log",
    params:
        spec=ref_stats_spec,
        flags=input_flags,
    shell:
        "OMP_NUM_THREADS={threads} tfd ref-stats --config {CONFIG_FILE} --bench {wildcards.bench} --no-progress "
        "{params.flags} --out {output} > {log} 2>&1"
