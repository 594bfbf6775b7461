# Tables from metric files, each with a provenance manifest beside it.


rule table1:
    input:
        run_outputs(table1_runs()),
        teacher=teacher_file(),
        ref_stats=ref_stats_file(),
        feature_weights=feature_weights_file(),
        **dataset_input(BENCH),  # data.kind edm_zip: the dataset store (its sha256 goes in the manifest)
    output:
        csv="results/table1.csv",
        md="results/table1.md",
        html=report("results/table1.html", caption="../report/table1.rst", category="1. Tables"),
        conv="results/convergence.csv",
        replicas="results/table1_replicas.csv",  # tfd.tables.replicas_path: per-replica values (header only: none)
        manifest="results/table1.manifest.json",
    params:
        spec=table_spec(BENCH, table1_runs()),
        inputs=manifest_inputs,
    log:
        f"logs/{BENCH}/table1.log",
    shell:
        "OMP_NUM_THREADS={threads} tfd table --config {CONFIG_FILE} --no-progress --out {output.csv} --convergence {output.conv} "
        "--manifest {output.manifest} {params.inputs} > {log} 2>&1"


rule ablation_table:
    input:
        unpack(ablation_inputs),
    output:
        csv="results/ablation_{ablation}.csv",
        md="results/ablation_{ablation}.md",
        html=report("results/ablation_{ablation}.html", caption="../report/ablation_table.rst", category="2. Ablations",
                    subcategory="{ablation}"),
        curves="results/ablation_{ablation}_curves.csv",
        replicas="results/ablation_{ablation}_replicas.csv",
        manifest="results/ablation_{ablation}.manifest.json",
    params:
        spec=ablation_spec,
        inputs=manifest_inputs,
        bench=lambda wc: ABLATION_BENCH[wc.ablation],
    log:
        "logs/ablation_{ablation}.log",
    shell:
        "OMP_NUM_THREADS={threads} tfd ablation --config {CONFIG_FILE} --bench {params.bench} --no-progress "
        "--name {wildcards.ablation} --out {output.csv} "
        "--curves {output.curves} --manifest {output.manifest} {params.inputs} > {log} 2>&1"


if MODES_CFG is not None:

  rule table_modes:  # the benchmark with known modes: `tfd table --bench <modes_benchmark>`, its table1 rows
      input:
          run_outputs(modes_rows(), MODES_BENCH),
          teacher=teacher_file(MODES_BENCH),
          ref_stats=ref_stats_file(MODES_BENCH),
          feature_weights=feature_weights_file(MODES_BENCH),
      output:
          csv="results/table_modes.csv",
          md="results/table_modes.md",
          html=report("results/table_modes.html", caption="../report/table_modes.rst", category="1. Tables"),
          replicas="results/table_modes_replicas.csv",
          manifest="results/table_modes.manifest.json",
      params:
          spec=table_spec(MODES_BENCH, modes_rows()),
          inputs=manifest_inputs,
          bench=MODES_BENCH,
      log:
          f"logs/{MODES_BENCH}/table_modes.log",
      shell:
          "OMP_NUM_THREADS={threads} tfd table --config {CONFIG_FILE} --bench {params.bench} --no-progress "
          "--out {output.csv} --manifest {output.manifest} {params.inputs} > {log} 2>&1"


if BENCH_CFG.table_methods:

  localrules:
      methods,

  rule methods:  # `snakemake --cores 2 methods`: the methods table, outside `all` (the default DAG's budget)
      input:
          "results/table_methods.csv",
          "results/table_methods.html",

  rule table_methods:  # every method beside its parent: `tfd table --table table_methods`
      input:
          run_outputs(scored_rows(BENCH_CFG.table_methods)),
          teacher=teacher_file(),
          ref_stats=ref_stats_file(),
          feature_weights=feature_weights_file(),
          **dataset_input(BENCH),
      output:
          csv="results/table_methods.csv",
          md="results/table_methods.md",
          html=report("results/table_methods.html", caption="../report/table_methods.rst", category="1. Tables"),
          replicas="results/table_methods_replicas.csv",
          manifest="results/table_methods.manifest.json",
      params:
          spec=table_spec(BENCH, BENCH_CFG.table_methods),
          inputs=manifest_inputs,
      log:
          f"logs/{BENCH}/table_methods.log",
      shell:
          "OMP_NUM_THREADS={threads} tfd table --table table_methods --config {CONFIG_FILE} --no-progress "
          "--out {output.csv} --manifest {output.manifest} {params.inputs} > {log} 2>&1"
