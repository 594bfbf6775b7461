# One-step diffusion distillation benchmark: teacher -> distillation runs -> samples -> scores -> tables.
# `snakemake --cores 2 results/table1.csv` runs the embedded `digits` benchmark on a CPU; `snakemake --cores 2 all publish`
# also copies its tables and figures to docs/results/; `--configfile .test/config.yaml` runs the tiny test DAG.
from snakemake.utils import min_version, validate

min_version("9.0")

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # every job's OpenMP threads sleep when idle (README: CPU threads)

from tfd.config import ConfigError, read_yaml

try:  # a YAML error named with its file, line and column (Snakemake's loader says neither)
    if os.path.isfile("config.yaml"):
        read_yaml("config.yaml")
except ConfigError as e:
    raise WorkflowError(str(e)) from None

configfile: "config.yaml"

validate(config, "workflow/schemas/config.schema.yaml")

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/text.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/publish.smk"


rule all:
    input:
        "results/table1.csv",
        "results/table1.html",
        [f"results/table2.{ext}" for ext in ("csv", "html")] if TEXT_BENCH else [],
        [f"results/table_modes.{ext}" for ext in ("csv", "html")] if MODES_BENCH else [],
        [f"results/ablation_{a}.{ext}" for a in ALL_ABLATIONS for ext in ("csv", "html")],
        all_figures(),


# `snakemake --cores 2 extended`: what the default DAG leaves out to keep within its time budget (README,
# "Time budget"): the methods table and the sweeps with `in_all: false`. Its results are published when built.
localrules:
    extended,


rule extended:
    input:
        rules.methods.input if BENCH_CFG.table_methods else [],
        ablation_outputs(EXTENDED_ABLATIONS),
