# `snakemake --cores 2 publish`: the tables, manifests and figures the README shows, copied from the
# git-ignored results/ to the committed docs/results/ (same names and layout), so the README's
# numbers always come from one command. Not part of `rule all`: publishing is asked for by name.
# docs/results/ is replaced as a whole (nothing stale stays), so keep nothing else in it.
# Paths are relative to the working directory: a run elsewhere (--directory, the tests) publishes there.
import shutil

PUBLISH_DIR = "docs/results"


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
