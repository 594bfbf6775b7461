# Figures rendered from the metric files and sample files (PNG + PDF), and the report's captions:
# `snakemake --report results/report.html` gathers every report() output below and in tables.smk.
import shlex

report: "../report/workflow.rst"

rule figure_convergence:
    input:
        "results/convergence.csv",
    output:
        png=report(f"{FIGURES_DIR}/convergence.png", caption="../report/convergence.rst", category="3. Figures"),
        pdf=f"{FIGURES_DIR}/convergence.pdf",
    params:
        thresholds=" ".join(f"{t:g}" for t in EVAL_CFG.fid_thresholds),
        out=out_stem,
        title=shlex.quote(f"Convergence on {BENCH}: FID of the convergence record vs training iterations"),
    log:
        f"logs/{BENCH}/figure_convergence.log",
    shell:
        "tfd figure convergence --csv {input} --out {params.out} --title {params.title} "
        "--thresholds {params.thresholds} > {log} 2>&1"


rule figure_samples:
    input:
        lambda wc: f"{run_dir(sample_run(wc.run))}/samples.npz",
    output:
        png=report(f"{FIGURES_DIR}/samples_{{run}}.png", caption="../report/samples.rst", category="4. Samples",
                   labels=lambda wc: {"run": wc.run, "method": RUNS[wc.run].method}),
        pdf=f"{FIGURES_DIR}/samples_{{run}}.pdf",
    params:
        title=lambda wc: shlex.quote(RUNS[wc.run].label or wc.run),
        out=out_stem,
    log:
        f"logs/{BENCH}/figure_samples_{{run}}.log",
    shell:
        "tfd figure samples --samples {input} --out {params.out} --title {params.title} > {log} 2>&1"


rule figure_ablation:
    input:
        "results/ablation_{ablation}_curves.csv",
    output:
        png=report(f"{FIGURES_DIR}/ablation_{{ablation}}.png", caption="../report/ablation_figure.rst", category="2. Ablations",
                   subcategory="{ablation}"),
        pdf=f"{FIGURES_DIR}/ablation_{{ablation}}.pdf",
    params:
        title=lambda wc: shlex.quote(ABLATIONS[wc.ablation].title or wc.ablation),
        budgets=lambda wc: " ".join(str(b) for b in ABLATIONS[wc.ablation].budgets),
        out=out_stem,
    log:
        "logs/figure_ablation_{ablation}.log",
    shell:
        "tfd figure ablation --csv {input} --out {params.out} --title {params.title} "
        "--budgets {params.budgets} > {log} 2>&1"


rule figure_diversity:
    input:
        unpack(diversity_samples),
    output:
        png=report(f"{FIGURES_DIR}/diversity_{{ablation}}.png", caption="../report/diversity.rst", category="2. Ablations",
                   subcategory="{ablation}"),
        pdf=f"{FIGURES_DIR}/diversity_{{ablation}}.pdf",
    params:
        samples=lambda wc, input: " ".join(shlex.quote(f"{wc.ablation}={k}={input[k]}") for k in input.keys()),
        labels=lambda wc: " ".join(label for label, _ in ABLATIONS[wc.ablation].variants),  # `samples`: not recorded
        classes=lambda wc: " ".join(map(str, ABLATIONS[wc.ablation].diversity.classes)),
        per_class=lambda wc: ABLATIONS[wc.ablation].diversity.per_class,
        out=out_stem,
    log:
        f"logs/{BENCH}/figure_diversity_{{ablation}}.log",
    shell:
        "tfd figure diversity --samples {params.samples} --classes {params.classes} --per-class {params.per_class} "
        "--out {params.out} > {log} 2>&1"


if MODES_CFG is not None:

  rule figure_modes:
      input:
          unpack(modes_samples),
      output:
          png=report(f"{FIGURES_DIR}/modes_{MODES_BENCH}.png", caption="../report/modes.rst", category="3. Figures"),
          pdf=f"{FIGURES_DIR}/modes_{MODES_BENCH}.pdf",
      params:
          samples=lambda wc, input: " ".join(shlex.quote(f"{MODES_CFG.runs[k].label or k}={input[k]}")
                                             for k in input.keys()),
          title=shlex.quote(f"{MODES_BENCH}: sample mass per sub-mode vs the true frequency"),
          out=out_stem,
      log:
          f"logs/{MODES_BENCH}/figure_modes.log",
      shell:
          "tfd figure modes --samples {params.samples} --title {params.title} --out {params.out} > {log} 2>&1"
