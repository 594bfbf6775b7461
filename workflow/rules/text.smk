import shlex

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
            params:
                spec=_spec({"resolution": TEXT_CFG.resolution}),
            log:
                f"logs/{TB}/text_data.log",
            priority: LONG_POLE_PRIORITY  # the head of the text chain (text_data -> VAE -> teacher -> positives)
            shell:
                f"tfd text-data --config {{CONFIG_FILE}} --bench {TB} --out-dir {{output}} > {{log}} 2>&1"

    rule prompts:
        input:
            **prompts_inputs(TB),
        output:
            f"results/{TB}/prompts.jsonl",
        params:
            spec=prompts_spec(TB),
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
                spec=_spec({**dataclasses.asdict(TEXT_CFG.teacher.vae), "resolution": TEXT_CFG.resolution}),
            log:
                f"logs/{TB}/train_vae.log",
            threads: 1
            priority: LONG_POLE_PRIORITY  # the text benchmark's serial chain: start it first
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
            threads: 1
            priority: LONG_POLE_PRIORITY  # the text benchmark's serial chain: start it first
            resources:
                runtime=60,
            shell:
                f"OMP_NUM_THREADS={{threads}} tfd train-t2i-teacher --config {{CONFIG_FILE}} --bench {TB} --no-progress "
                f"--data-dir {{input.data}} --vae {{input.vae}} --out {{output}} > {{log}} 2>&1"

    # Teacher positive generation (tfd.positives; TFD paper Sec. 4.2): training prompts, the paired
    # image set encoded once, sharded positives and their merge, each cached by the settings that
    # shape it, so every run and sweep with the same positives settings shares one cache.
    rule train_prompts:
        input:
            unpack(train_prompts_inputs),
        output:
            f"results/{TB}/train_prompts/{{pkey}}.jsonl",
        params:
            run=lambda wc, output: positives_run(TB, "train_prompts", output[0]),
            flags=lambda wc, input: f"--data-dir {input.data}" if "data" in input.keys() else
                  (f"--captions-json {input.captions}" if "captions" in input.keys() else ""),
        log:
            f"logs/{TB}/train_prompts_{{pkey}}.log",
        shell:
            f"tfd train-prompts --config {{CONFIG_FILE}} --bench {TB} --run {{params.run}} {{params.flags}} "
            f"--out {{output}} > {{log}} 2>&1"

    rule latents:
        input:
            unpack(latents_inputs),
        output:
            f"results/{TB}/latents/{{lkey}}.safetensors",
        params:
            spec=_spec({"resolution": TEXT_CFG.resolution}),
            run=lambda wc, output: positives_run(TB, "latents", output[0]),
            flags=lambda wc, input: f"--data-dir {input.data}" if "data" in input.keys() else "",
        log:
            f"logs/{TB}/latents_{{lkey}}.log",
        threads: 1
        priority: LONG_POLE_PRIORITY  # the text benchmark's serial chain: start it first
        resources:
            gpu=1,
        shell:
            f"OMP_NUM_THREADS={{threads}} tfd latents --config {{CONFIG_FILE}} --bench {TB} --no-progress "
            f"--run {{params.run}} --teacher {{input.teacher}} {{params.flags}} --out {{output}} > {{log}} 2>&1"

    rule positives_shard:
        input:
            unpack(positives_shard_inputs),
        output:
            temp(f"results/{TB}/positives/{{key}}/shard{{k}}of{{n}}.safetensors"),
        params:
            run=lambda wc, output: positives_run(TB, "positives", output[0]),
            latents=lambda wc, input: f"--latents {input.latents}" if "latents" in input.keys() else "",
        log:
            f"logs/{TB}/positives_{{key}}_{{k}}of{{n}}.log",
        threads: 1
        priority: LONG_POLE_PRIORITY  # the text benchmark's serial chain: start it first
        resources:
            gpu=1,
        shell:
            f"OMP_NUM_THREADS={{threads}} tfd positives --config {{CONFIG_FILE}} --bench {TB} --no-progress "
            f"--run {{params.run}} --teacher {{input.teacher}} --train-prompts {{input.train_prompts}} "
            f"{{params.latents}} --shard {{wildcards.k}}/{{wildcards.n}} --out {{output}} > {{log}} 2>&1"

    rule merge_positives:
        input:
            positives_shards,
        output:
            f"results/{TB}/positives/{{key}}/positives.safetensors",
        log:
            f"logs/{TB}/merge_positives_{{key}}.log",
        shell:
            "tfd merge-positives --out {output} {input} > {log} 2>&1"

    if "clip" in clip_files(TB) and TEXT_CFG.data.kind == "digits_text" and not TEXT_CFG.eval.clip_checkpoint:

        rule train_clip:
            input:
                TDATA["data"],
            output:
                clip=clip_files(TB)["clip"],
                clip_config=clip_files(TB)["clip_config"],
            params:
                spec=_spec({**dataclasses.asdict(TEXT_CFG.eval.clip_train),
                            "clip_resize": TEXT_CFG.eval.clip_resize}),
                outdir=lambda wc, output: str(Path(output.clip).parent),
            log:
                f"logs/{TB}/train_clip.log",
            threads: 1
            shell:
                f"OMP_NUM_THREADS={{threads}} tfd train-clip --config {{CONFIG_FILE}} --bench {TB} --no-progress "
                f"--data-dir {{input}} --out-dir {{params.outdir}} > {{log}} 2>&1"

    rule figure_prompts:
        input:
            unpack(lambda wc: {r: f"{run_dir(sample_run(r, TB), TB)}/samples.npz" for r in table2_runs()}),
            prompts=prompts_file(TB),
        output:
            png=report(f"{FIGURES_DIR}/table2_prompts.png", caption="../report/prompts.rst", category="3. Figures"),
            pdf=f"{FIGURES_DIR}/table2_prompts.pdf",
        params:
            samples=lambda wc, input: " ".join(shlex.quote(f"{TEXT_CFG.runs[r].label or r}={input[r]}")
                                               for r in table2_runs()),
            labels=_spec([TEXT_CFG.runs[r].label or r for r in table2_runs()]),  # `samples`: not recorded
            out=out_stem,
            title=shlex.quote(f"{TB}: one sample per prompt and method (the paper's Figure 1)"),
        log:
            f"logs/{TB}/figure_prompts.log",
        shell:
            "tfd figure prompts --samples {params.samples} --prompts {input.prompts} --rows 6 "
            "--out {params.out} --title {params.title} > {log} 2>&1"

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
            replicas="results/table2_replicas.csv",
            manifest="results/table2.manifest.json",
        params:
            spec=text_table_spec(TB, table2_runs()),
            inputs=manifest_inputs,
        log:
            f"logs/{TB}/table2.log",
        shell:
            f"OMP_NUM_THREADS={{threads}} tfd table --table table2 --config {{CONFIG_FILE}} --bench {TB} --no-progress "
            f"--out {{output.csv}} --manifest {{output.manifest}} {{params.inputs}} > {{log}} 2>&1"
