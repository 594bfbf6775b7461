# Figures rendered from the metric files and sample files (PNG + PDF), and the report's captions:
# `snakemake --report results/report.html` gathers every report() output below and in tables.smk.
import shlex

report: "../report/workflow.rst"

FIG = "results/figures"


def diversity_ablations():
    return [n for n, a in ABLATIONS.items() if a.diversity is not None]


def all_figures():
    return ([f"{FIG}/convergence.png", f"{FIG}/convergence.pdf"]
            + [f"{FIG}/samples_{r}.{ext}" for r in table1_runs() for ext in ("png", "pdf")]
            + [f"{FIG}/ablation_{a}.{ext}" for a in ABLATIONS for ext in ("png", "pdf")]
            + [f"{FIG}/diversity_{a}.{ext}" for a in diversity_ablations() for ext in ("png", "pdf")])


rule figure_convergence:
    input:
        "results/convergence.csv",
    output:
        png=report(f"{FIG}/convergence.png", caption="../report/convergence.rst", category="3. Figures"),
        pdf=f"{FIG}/convergence.pdf",
    params:
        thresholds=" ".join(f"{t:g}" for t in EVAL.get("fid_thresholds", [])),
        title=shlex.quote(f"Convergence on {BENCH}: FID of the convergence record vs training iterations"),
    log:
        f"logs/{BENCH}/figure_convergence.log",
    shell:
        "tfd figure convergence --csv {input} --out {FIG}/convergence --title {params.title} "
        "--thresholds {params.thresholds} > {log} 2>&1"


rule figure_samples:
    input:
        lambda wc: f"{run_dir(wc.run)}/samples.npz",
    output:
        png=report(f"{FIG}/samples_{{run}}.png", caption="../report/samples.rst", category="4. Samples",
                   labels=lambda wc: {"run": wc.run, "method": RUNS[wc.run]["method"]}),
        pdf=f"{FIG}/samples_{{run}}.pdf",
    params:
        title=lambda wc: shlex.quote(RUNS[wc.run].get("label") or wc.run),
    log:
        f"logs/{BENCH}/figure_samples_{{run}}.log",
    shell:
        "tfd figure samples --samples {input} --out {FIG}/samples_{wildcards.run} --title {params.title} > {log} 2>&1"


rule figure_ablation:
    input:
        "results/ablation_{ablation}_curves.csv",
    output:
        png=report(f"{FIG}/ablation_{{ablation}}.png", caption="../report/ablation_figure.rst", category="2. Ablations",
                   subcategory="{ablation}"),
        pdf=f"{FIG}/ablation_{{ablation}}.pdf",
    params:
        title=lambda wc: shlex.quote(ABLATIONS[wc.ablation].title or wc.ablation),
        budgets=lambda wc: " ".join(str(b) for b in ABLATIONS[wc.ablation].budgets),
    log:
        f"logs/{BENCH}/figure_ablation_{{ablation}}.log",
    shell:
        "tfd figure ablation --csv {input} --out {FIG}/ablation_{wildcards.ablation} --title {params.title} "
        "--budgets {params.budgets} > {log} 2>&1"


def diversity_samples(wildcards):
    return {label: f"{run_dir(run)}/samples.npz" for label, run in ABLATIONS[wildcards.ablation].variants}


rule figure_diversity:
    input:
        unpack(diversity_samples),
    output:
        png=report(f"{FIG}/diversity_{{ablation}}.png", caption="../report/diversity.rst", category="2. Ablations",
                   subcategory="{ablation}"),
        pdf=f"{FIG}/diversity_{{ablation}}.pdf",
    params:
        samples=lambda wc, input: " ".join(shlex.quote(f"{wc.ablation}={k}={input[k]}") for k in input.keys()),
        classes=lambda wc: " ".join(map(str, ABLATIONS[wc.ablation].diversity.classes)),
        per_class=lambda wc: ABLATIONS[wc.ablation].diversity.per_class,
    log:
        f"logs/{BENCH}/figure_diversity_{{ablation}}.log",
    shell:
        "tfd figure diversity --samples {params.samples} --classes {params.classes} --per-class {params.per_class} "
        "--out {FIG}/diversity_{wildcards.ablation} > {log} 2>&1"
