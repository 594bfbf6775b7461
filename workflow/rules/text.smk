# The text-to-image benchmark of Table 2 (`text_benchmark`): its data and prompt table, the teacher
# (a local SDXL pipeline folder, or the embedded tiny one trained here with its VAE), the CLIP model
# of clip_score (the site's ViT-g-14, or a tiny one trained here), and results/table2.csv. Sampling
# and scoring are the shared rules of eval.smk.

if TEXT_CFG is not None:
    TB = TEXT_BENCH
    TDATA = text_data(TB)  # the embedded data folder: {"data": ...}

    if TEXT_CFG.data.kind == "digits_text":

        rule text_data:
            output:
                directory(f"results/{TB}/data"),
            log:
                f"logs/{TB}/text_data.log",
            shell:
                f"tfd text-data --config {{CONFIG_FILE}} --bench {TB} --out-dir {{output}} > {{log}} 2>&1"

    rule prompts:
        input:
            **prompts_inputs(TB),
        output:
            f"results/{TB}/prompts.jsonl",
        params:
            spec=json.dumps(dataclasses.asdict(TEXT_CFG.prompts), sort_keys=True),
            flags=input_flags,
        log:
            f"logs/{TB}/prompts.log",
        shell:
            f"tfd prompts --config {{CONFIG_FILE}} --bench {TB} {{params.flags}} --out {{output}} > {{log}} 2>&1"

    if TEXT_CFG.teacher.kind == "train_t2i":

        rule train_vae:
            input:
                TDATA["data"],
            output:
                directory(f"results/{TB}/teacher/vae"),
            params:
                spec=json.dumps(dataclasses.asdict(TEXT_CFG.teacher.vae), sort_keys=True),
            log:
                f"logs/{TB}/train_vae.log",
            threads: 2
            shell:
                f"OMP_NUM_THREADS={{threads}} tfd train-vae --config {{CONFIG_FILE}} --bench {TB} --no-progress "
                f"--data-dir {{input}} --out {{output}} > {{log}} 2>&1"

        rule train_t2i_teacher:
            input:
                data=TDATA["data"],
                vae=f"results/{TB}/teacher/vae",
            output:
                directory(f"results/{TB}/teacher/pipeline"),
            params:
                spec=teacher_spec(TB),
            log:
                f"logs/{TB}/train_t2i_teacher.log",
            threads: 2
            resources:
                runtime=60,
            shell:
                f"OMP_NUM_THREADS={{threads}} tfd train-t2i-teacher --config {{CONFIG_FILE}} --bench {TB} --no-progress "
                f"--data-dir {{input.data}} --vae {{input.vae}} --out {{output}} > {{log}} 2>&1"

    if "clip" in clip_files(TB) and TEXT_CFG.data.kind == "digits_text" and not TEXT_CFG.eval.clip_checkpoint:

        rule train_clip:
            input:
                TDATA["data"],
            output:
                clip=clip_files(TB)["clip"],
                clip_config=clip_files(TB)["clip_config"],
            params:
                spec=json.dumps(dataclasses.asdict(TEXT_CFG.eval.clip_train), sort_keys=True),
                outdir=lambda wc, output: str(Path(output.clip).parent),
            log:
                f"logs/{TB}/train_clip.log",
            threads: 2
            shell:
                f"OMP_NUM_THREADS={{threads}} tfd train-clip --config {{CONFIG_FILE}} --bench {TB} --no-progress "
                f"--data-dir {{input}} --out-dir {{params.outdir}} > {{log}} 2>&1"

    rule table2:
        input:
            run_outputs(table2_runs(), TB),
            teacher=teacher_file(TB),
            ref_stats=ref_stats_file(TB),
            feature_weights=feature_weights_file(TB),
            prompts=prompts_file(TB),
            clip_checkpoint=clip_files(TB).get("clip", []),
        output:
            csv="results/table2.csv",
            md="results/table2.md",
            html=report("results/table2.html", caption="../report/table2.rst", category="1. Tables"),
            manifest="results/table2.manifest.json",
        params:
            inputs=manifest_inputs,
        log:
            f"logs/{TB}/table2.log",
        shell:
            f"OMP_NUM_THREADS={{threads}} tfd table --table table2 --config {{CONFIG_FILE}} --bench {TB} --no-progress "
            f"--out {{output.csv}} --manifest {{output.manifest}} {{params.inputs}} > {{log}} 2>&1"
