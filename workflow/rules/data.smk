# The dataset stage: a class benchmark's EDM dataset zip (data.kind edm_zip, data.path) converted once
# into a memory-mapped uint8 store (tfd.datastore: images.npy, labels, per-class index, store.json with
# the sha256s), which distill, ref_stats, train_teacher and the table manifests read instead of the zip.
# The embedded benchmarks (digits, shapes) keep their data in memory and have no such job.


rule prepare_data:
    input:
        zip=prepare_data_input,
    output:
        directory("results/{bench}/data/store"),
    params:
        version=STORE_VERSION,  # the store's layout (tfd.datastore.STORE_VERSION): a new layout rebuilds it
    log:
        "logs/{bench}/prepare_data.log",
    threads: 8  # decoding processes (capped by --cores; the slurm profile sets its own)
    resources:
        runtime=120,
    shell:
        "OMP_NUM_THREADS=1 tfd prepare-data --no-progress --zip {input.zip} --out {output} --workers {threads} "
        "> {log} 2>&1"
