# `snakemake --cores 2 publish`: the tables, manifests and figures the README shows, copied from the
# git-ignored results/ to the committed docs/results/ (same names and layout), so the README's
# numbers always come from one command. Not part of `rule all`: publishing is asked for by name.
# docs/results/ is replaced as a whole (nothing stale stays), so keep nothing else in it.
# Paths are relative to the working directory: a run elsewhere (--directory, the tests) publishes there.
import os
import shutil

PUBLISH_DIR = "docs/results"
TABLE_FILES = (".csv", ".md", ".html", ".manifest.json", "_replicas.csv")  # _replicas: tfd.tables.write_replicas


def published_files():
    """What `publish` copies: the default DAG's tables (+ manifests, per-replica values, curves) and
    PNG figures, and what `snakemake extended` makes (the methods table, the `in_all: false` sweeps)
    once built, or when `extended` is a target of the same command (`snakemake extended publish`):
    a built one is an input, so publish reruns what changed."""
    targets = getattr(getattr(workflow, "dag_settings", None), "targets", None) or ()
    extended = "extended" in targets
    return (
        [f"results/table1{x}" for x in TABLE_FILES]
        + ["results/convergence.csv"]
        + ([f"results/table2{x}" for x in TABLE_FILES] if TEXT_BENCH else [])
        + ([f"results/table_modes{x}" for x in TABLE_FILES] if MODES_BENCH else [])
        + [f"results/ablation_{a}{x}" for a in ALL_ABLATIONS for x in (*TABLE_FILES, "_curves.csv")]
        + [f for f in all_figures() if f.endswith(".png")]  # the README shows the PNGs (the PDFs stay in results/)
        + ([f"results/table_methods{x}" for x in TABLE_FILES]
           if BENCH_CFG.table_methods and (extended or os.path.exists("results/table_methods.csv")) else [])
        + [f for a in EXTENDED_ABLATIONS if extended or os.path.exists(f"results/ablation_{a}.csv")
           for f in [*(f"results/ablation_{a}{x}" for x in (*TABLE_FILES, "_curves.csv")),
                     *(f for f in ablation_figures([a]) if f.endswith(".png"))]]
    )


localrules:
    publish,


rule publish:
    input:
        published_inputs,
    log:
        "logs/publish.log",
    run:
        keep = {*input, "results/figures"}  # what copytree takes from results/ (it walks into results/figures only)
        shutil.rmtree(PUBLISH_DIR, ignore_errors=True)  # a mirror: nothing stale stays
        shutil.copytree("results", PUBLISH_DIR, ignore=lambda d, names: [n for n in names if f"{d}/{n}" not in keep])
        shell("ls -lR {PUBLISH_DIR} > {log}")
