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
      threads: 1  # one thread per job, the long jobs first (common.smk: LONG_POLE_PRIORITY)
      priority: LONG_POLE_PRIORITY
      resources:
          runtime=60,
      shell:  # a teacher trained on an EDM zip reads its dataset store (the embedded benchmarks' command as it was)
          ("OMP_NUM_THREADS={threads} tfd train-teacher --config {CONFIG_FILE} --no-progress --out {output} "
           + ("--data-store {input.data_store} " if dataset_store(BENCH) else "") + "> {log} 2>&1")


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


if MODES_CFG is not None and MODES_BENCH != BENCH and MODES_CFG.teacher.kind == "train":

  rule train_teacher_modes:  # the teacher of the benchmark with known modes (results/table_modes.csv)
      output:
          f"results/{MODES_BENCH}/teacher/teacher.safetensors",
      params:
          spec=teacher_spec(MODES_BENCH),
          bench=MODES_BENCH,
      log:
          f"logs/{MODES_BENCH}/train_teacher.log",
      threads: 1
      priority: LONG_POLE_PRIORITY
      resources:
          runtime=60,
      shell:
          "OMP_NUM_THREADS={threads} tfd train-teacher --config {CONFIG_FILE} --bench {params.bench} --no-progress "
          "--out {output} > {log} 2>&1"


rule digits_feature_net:
    output:
        "results/{bench}/feature_net/digits_net.safetensors",
    log:
        "logs/{bench}/digits_feature_net.log",
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} tfd train-feature-net --no-progress --out {output} > {log} 2>&1"


# The same network trained on the shapes data, its 48 modes as the classes (a rule of its own, so that
# the digits rule, its params and command, and what depends on it stay as they were).
rule shapes_feature_net:
    output:
        "results/{bench}/feature_net/shapes_net.safetensors",
    log:
        "logs/{bench}/shapes_feature_net.log",
    params:
        data_version=SHAPES_DATA_VERSION,  # the generated data's version (eval.modes.DATA_VERSION)
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} tfd train-feature-net --no-progress --data shapes --out {output} > {log} 2>&1"


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
