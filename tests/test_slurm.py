"""The slurm profile: the paper DAG and its resources (dry run, no SLURM needed), the message for
unfilled site paths, and the tiny digits DAG through a real one-node SLURM cluster."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import yte

from tests.helpers import ROOT
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, missing_binaries, process_state

PROFILE = ROOT / "workflow/profiles/slurm"
PAPER = yaml.safe_load((ROOT / "config.yaml").read_text())["benchmarks"]["imagenet64"]
GPU_RULES = ("distill", "sample_shard", "score", "score_text", "positives_shard", "latents", "teacher_pairs")
COCO = yaml.safe_load((ROOT / "config.yaml").read_text())["benchmarks"]["coco2014"]
RUN_TIMEOUT = 300  # s, for the real SLURM run (9 jobs in 7 waves; ~10-25 s a wave on 2 cores)


def profile() -> dict:
    with open(PROFILE / "config.v8+.yaml") as f:
        return yte.process_yaml(f, require_use_yte=True)


def make_site(d: Path, teacher_ext: str = "safetensors") -> Path:
    """Tiny stand-ins for the paper files (a small EDMPrecond, a 4-image EDM zip, mu/sigma, a dummy
    Inception file) and a site.yaml pointing at them. Returns site.yaml."""
    from PIL import Image

    from tfd.networks.convert import save_edm_safetensors
    from tfd.networks.edm import EDMPrecond

    d.mkdir(parents=True, exist_ok=True)
    teacher = d / f"teacher.{teacher_ext}"
    if teacher_ext == "safetensors":
        net = EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_channels=8, channel_mult=[1],
                         num_blocks=1, attn_resolutions=[])
        save_edm_safetensors(net, teacher)
    else:
        teacher.write_bytes(b"stand-in for edm-imagenet-64x64-cond-adm.pkl")
    labels = []
    with zipfile.ZipFile(d / "imagenet-64x64.zip", "w") as z:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(buf, format="PNG")
            name = f"00000/img{i:08d}.png"
            z.writestr(name, buf.getvalue())
            labels.append([name, i])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    np.savez(d / "imagenet-64x64.npz", mu=np.zeros(8), sigma=np.eye(8),  # features: precision/recall need them
             features=np.zeros((4, 8), np.float32))
    (d / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"stand-in")
    site = yaml.safe_load((ROOT / "workflow/site.example.yaml").read_text())
    b = site["benchmarks"]["imagenet64"]
    b["teacher"]["checkpoint"] = str(teacher)
    b["data"]["path"] = str(d / "imagenet-64x64.zip")
    b["eval"]["ref_stats"] = str(d / "imagenet-64x64.npz")
    b["eval"]["feature_extractor_weights_path"] = str(d / "weights-inception-2015-12-05-6726825d.pth")
    site["benchmarks"]["coco2014"] = make_coco_site(d / "coco")
    out = d / "site.yaml"
    out.write_text(yaml.safe_dump(site))
    return out


def make_coco_site(d: Path) -> dict:
    """Tiny stand-ins for Table 2's files (a random tiny SDXL-topology pipeline folder, a 3-image
    COCO captions json with its val2014 folder, dummy clean-fid Inception and CLIP files); returns
    the `benchmarks.coco2014` block of a site file."""
    from PIL import Image

    from tfd.t2i_tiny import build_random_pipeline_folder

    (d / "val2014").mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    for im in images:
        Image.fromarray(np.full((48, 64, 3), 40 * im["id"], np.uint8)).save(d / "val2014" / im["file_name"])
    anns = [{"id": 10 * i + j, "image_id": i, "caption": f"a photo of thing {i}, take {j}"} for i in (1, 2, 3)
            for j in (1, 2)]
    (d / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (d / "inception-2015-12-05.pt").write_bytes(b"stand-in")
    (d / "open_clip_pytorch_model.bin").write_bytes(b"stand-in")
    build_random_pipeline_folder(d / "sdxl-base")
    # the training side: a prompt list (LAION's, on a real site) and a paired image set (COCO format)
    (d / "train_prompts.txt").write_text("a photo of thing 1, take 1\na red bus\na cat on a sofa\n")
    (d / "paired").mkdir(exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(d / "paired" / "p1.jpg")
    (d / "paired.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "p1.jpg"}],
                                               "annotations": [{"id": 1, "image_id": 1, "caption": "a red bus"}]}))
    return {"teacher": {"checkpoint": str(d / "sdxl-base")},
            "positives": {"prompts_file": str(d / "train_prompts.txt"), "paired_captions_json": str(d / "paired.json"),
                          "paired_images_dir": str(d / "paired")},
            "data": {"captions_json": str(d / "captions_val2014.json"), "images_dir": str(d / "val2014")},
            "eval": {"feature_extractor_weights_path": str(d / "inception-2015-12-05.pt"),
                     "clip_checkpoint": str(d / "open_clip_pytorch_model.bin")}}


def dry_jobs(text: str) -> list[dict]:
    """The jobs of a dry run: rule, wildcards, resources (as strings), input and output (path lists)."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", text)[1:]:
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        job = {"rule": m.group(1), "wildcards": {}, "resources": {}, "input": [], "output": []}
        for key in ("wildcards", "resources"):
            line = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            if line:
                job[key] = dict(kv.split("=", 1) for kv in line.group(1).split(", "))
        for key in ("input", "output"):
            line = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            if line:
                job[key] = line.group(1).split(", ")
        jobs.append(job)
    return jobs


@pytest.fixture
def paper_dir(tmp_path, monkeypatch):
    """A working directory for the paper benchmark: config.yaml as committed; the profile looks
    for ./site.yaml in the current directory."""
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("teacher_ext", ["safetensors", "pkl"])
def test_paper_dag_dry_run(paper_dir, teacher_ext, run_snakemake):
    make_site(paper_dir / "site", teacher_ext)
    (paper_dir / "site.yaml").write_text((paper_dir / "site/site.yaml").read_text())
    r = run_snakemake(paper_dir, "-n", "--profile", str(PROFILE), "--cores", "1000", "results/table1.csv")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    jobs = dry_jobs(out)
    counts = pd.Series([j["rule"] for j in jobs]).value_counts().to_dict()
    table1, shards = PAPER["table1"], PAPER["eval"]["shards"]
    reported = [r for r in table1 if PAPER["runs"][r]["method"] == "reported"]  # the paper's numbers only
    rows = [r for r in table1 if r not in reported]  # sampled and scored
    trained = [r for r in rows if PAPER["runs"][r]["method"] not in ("heun", "onestep")]
    pairs = {PAPER["runs"][r]["params"]["pairs_shards"] for r in trained if PAPER["runs"][r]["method"] == "dmd"}
    # the paper's Table 1: every baseline row; iCT-deep, EMD and CTM as the paper's numbers
    assert set(trained) == {"tfd", "tfd_el", "dmd2", "dmd2_nogan", "dmd", "dmd2_4step", "dpdmd", "cd_l2"}, trained
    assert reported == ["paper_ict_deep", "paper_emd", "paper_ctm"] and pairs == {10}
    assert shards == 10  # the paper protocol: 50k samples in 10 shards
    expected = {"distill": len(trained), "sample_shard": shards * len(rows), "merge_samples": len(rows),
                "score": len(rows), "table1": 1,  # no teacher training, no digits feature net, no ref_stats
                "teacher_pairs": 10, "merge_teacher_pairs": 1,  # DMD's teacher pairs (one cache)
                "prepare_data": 1}  # the dataset stage: the zip -> results/imagenet64/data/store, once
    if teacher_ext == "pkl":
        expected["convert_edm"] = 1
    assert counts == expected, counts
    assert {j["wildcards"]["run"] for j in jobs if j["rule"] == "distill"} == set(trained)
    # every training run and the table read the dataset store, never the zip (tfd prepare-data converts it once)
    store = "results/imagenet64/data/store"
    assert next(j for j in jobs if j["rule"] == "prepare_data")["output"] == [store]
    assert all(store in j["input"] for j in jobs if j["rule"] in ("distill", "table1"))
    assert f"--data-store {store}" in out and "--workers" in out
    assert {(j["wildcards"]["run"], int(j["wildcards"]["k"]), int(j["wildcards"]["n"]))
            for j in jobs if j["rule"] == "sample_shard"} == {(r, k, shards) for r in rows for k in range(shards)}
    assert not [j for j in jobs if j["wildcards"].get("run") in reported or "reported" in j["wildcards"].values()]
    assert not any(f"/{r}/" in out for r in reported)  # no output of a reported row
    assert all(p.startswith("results/imagenet64/") for p in re.findall(r"output: (\S+?),?$", out, re.M)
               if not p.startswith("results/table1"))

    # each job's resources are the profile's: default-resources, then set-resources of its rule
    prof = profile()
    assert prof["executor"] == "slurm" and prof["config"] == {"benchmark": "imagenet64", "text_benchmark": "coco2014",
                                                     "modes_benchmark": None}
    gpu_partition = prof["set-resources"]["distill"]["slurm_partition"]
    for j in jobs:
        want = {**prof["default-resources"], **prof["set-resources"].get(j["rule"], {})}
        res = j["resources"]
        for k, v in want.items():
            assert res.get(k) == str(v), (j["rule"], k, res)
        if j["rule"] in GPU_RULES:
            assert res["gpu"] == "1" and res["slurm_partition"] == gpu_partition, (j["rule"], res)
        else:
            assert "gpu" not in res and res.get("slurm_partition") != gpu_partition, (j["rule"], res)
    distill = next(j for j in jobs if j["rule"] == "distill")["resources"]
    shard = next(j for j in jobs if j["rule"] == "sample_shard")["resources"]
    assert int(distill["runtime"]) > int(shard["runtime"]) and int(distill["mem_mb"]) >= int(shard["mem_mb"])
    # threads from the profile reach the command (OMP_NUM_THREADS) and sbatch (--cpus-per-task)
    assert f"OMP_NUM_THREADS={prof['set-threads']['distill']} tfd distill" in out


@pytest.mark.parametrize("case", ["no_site_file", "unfilled", "file_missing"])
def test_unfilled_site_file_fails_with_one_message(paper_dir, case, run_snakemake):
    """`snakemake --profile workflow/profiles/slurm` without a usable site.yaml stops before any
    job with one message naming the config keys and the site file, not a traceback."""
    if case == "unfilled":
        (paper_dir / "site.yaml").write_text((ROOT / "workflow/site.example.yaml").read_text())
        missing = ["teacher.checkpoint", "data.path", "eval.feature_extractor_weights_path"]
        missing_coco = ["teacher.checkpoint", "data.captions_json", "data.images_dir",
                        "eval.feature_extractor_weights_path", "eval.clip_checkpoint"]
    elif case == "file_missing":
        make_site(paper_dir / "site")
        site = yaml.safe_load((paper_dir / "site/site.yaml").read_text())
        site["benchmarks"]["imagenet64"]["data"]["path"] = str(paper_dir / "nowhere/imagenet-64x64.zip")
        (paper_dir / "site.yaml").write_text(yaml.safe_dump(site))
        missing, missing_coco = ["data.path"], []
    else:
        missing = ["teacher.checkpoint", "data.path", "eval.feature_extractor_weights_path"]
        missing_coco = ["teacher.checkpoint", "data.captions_json", "data.images_dir",
                        "eval.feature_extractor_weights_path", "eval.clip_checkpoint"]
    r = run_snakemake(paper_dir, "-n", "--profile", str(PROFILE), "results/table1.csv")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for key in missing:
        assert f"benchmarks.imagenet64.{key}" in out, (key, out[-3000:])
    for key in missing_coco:  # Table 2's paths in the same message
        assert out.count(f"benchmarks.coco2014.{key}:") == 1, (key, out[-3000:])
    if case == "file_missing":
        assert "nowhere/imagenet-64x64.zip" in out and "teacher.checkpoint" not in out, out[-3000:]
    assert "site.yaml" in out and "site.example.yaml" in out, out[-3000:]
    assert "Traceback" not in out and out.count(f"benchmarks.imagenet64.{missing[0]}") == 1, out[-3000:]
    assert not (paper_dir / "results").exists() and not (paper_dir / ".snakemake/slurm_logs").exists()


def multinode_profile(dst: Path) -> tuple[Path, dict]:
    """A copy of the slurm profile with its commented multi-node example (the lines after
    `# multi-node:` in `set-resources: distill:`) switched on; returns the folder and those resources."""
    lines = (PROFILE / "config.v8+.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# multi-node:")
    indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]  # the distill block's keys
    example = {}
    for i in range(start + 1, len(lines)):
        m = re.fullmatch(rf"({indent})# (\w+): (.+)", lines[i])
        if not m:
            break
        lines[i] = f"{m[1]}{m[2]}: {m[3]}"
        example.update(yaml.safe_load(f"{m[2]}: {m[3]}"))
    dst.mkdir()
    (dst / "config.v8+.yaml").write_text("\n".join(lines) + "\n")
    return dst, example


def test_multinode_example_dry_run(paper_dir, run_snakemake):
    """The profile's commented multi-node example, switched on: each distill job of Table 1 asks
    SLURM for the nodes and the GPUs on each (sbatch --nodes/--gres, no job-total --gpus) and
    launches srun with one torchrun per node in a c10d rendezvous; the other GPU jobs keep gpu: 1."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    make_site(paper_dir / "site")
    (paper_dir / "site.yaml").write_text((paper_dir / "site/site.yaml").read_text())
    prof_dir, example = multinode_profile(paper_dir / "multinode")
    assert example["nodes"] > 1 and example["gres"].startswith("gpu:") and example["gpu"] == 0, example
    nodes, per_node = example["nodes"], int(example["gres"].split(":")[-1])
    r = run_snakemake(paper_dir, "-n", "--profile", str(prof_dir), "--cores", "1000", "results/table1.csv")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    jobs = dry_jobs(out)
    distill = [j for j in jobs if j["rule"] == "distill"]
    assert distill and all(j["resources"]["nodes"] == str(nodes) and j["resources"]["gres"] == example["gres"]
                           and j["resources"]["gpu"] == "0" for j in distill), distill
    assert all(j["resources"]["gpu"] == "1" for j in jobs if j["rule"] in GPU_RULES and j["rule"] != "distill")
    launch = (f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --overlap --kill-on-bad-exit=1 "
              f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d --rdzv-endpoint ")
    lines = [line.strip() for line in out.splitlines() if launch in line]
    assert len(lines) == len(distill), out[-3000:]
    assert all('--rdzv-id "$SLURM_JOB_ID" -m tfd.cli -- distill --config' in line for line in lines), lines[0]
    print("\n" + lines[0])
    # what the slurm plugin submits for such a job: nodes and GPUs per node, no job-total --gpus
    res = {k: int(v) if v.isdigit() else v for k, v in distill[0]["resources"].items()}
    job = SimpleNamespace(resources=SimpleNamespace(**res, get=res.get), threads=8)
    call = get_submit_command(job, {"run_uuid": "x", "slurm_logfile": "x.log", "comment_str": "rule_distill",
                                    "account": "", "partition": "-p gpu", "workdir": str(paper_dir)})
    call += set_gres_string(job)
    assert f"--nodes={nodes}" in call and f"--gres={example['gres']}" in call and "--gpus=" not in call, call


def test_text_to_image_dag_dry_run(paper_dir, run_snakemake):
    """Table 2 on the cluster (coco2014): prompt table, reference statistics of the prompts' real
    images, 20 sample shards per sampled row, scoring and the table, each job with its resources;
    the trained rows (TFD, DMD2) with their training prompts, paired latents, 50 positives shards
    and one merge shared by both runs; a published row whose weights are not given is listed with
    the paper's numbers, not sampled."""
    make_site(paper_dir / "site")
    (paper_dir / "site.yaml").write_text((paper_dir / "site/site.yaml").read_text())
    r = run_snakemake(paper_dir, "-n", "--profile", str(PROFILE), "--cores", "1000", "results/table2.csv")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    jobs = dry_jobs(out)
    counts = pd.Series([j["rule"] for j in jobs]).value_counts().to_dict()
    scored = [r for r in COCO["table2"] if not COCO["runs"][r].get("sampler", {}).get("published")]
    shards = COCO["eval"]["shards"]
    assert scored == ["sdxl_cfg6", "sdxl_cfg8", "dmd2", "tfd"] and shards == 20
    pos_shards = COCO["positives"]["shards"]
    assert counts == {"prompts": 1, "ref_stats": 1, "sample_shard": shards * len(scored),
                      "merge_samples": len(scored), "score_text": len(scored), "table2": 1,
                      "train_prompts": 1, "latents": 1, "positives_shard": pos_shards, "merge_positives": 1,
                      "distill": 2}, counts
    prof = profile()
    gpu_partition = prof["set-resources"]["distill"]["slurm_partition"]
    for j in jobs:
        want = {**prof["default-resources"], **prof["set-resources"].get(j["rule"], {})}
        for k, v in want.items():
            assert j["resources"].get(k) == str(v), (j["rule"], k, j["resources"])
        assert (j["resources"].get("gpu") == "1") == (j["rule"] in GPU_RULES), j
        if j["rule"] in GPU_RULES:
            assert j["resources"]["slurm_partition"] == gpu_partition, j
    assert all(p.startswith("results/coco2014/") for p in re.findall(r"output: (\S+?),?$", out, re.M)
               if not p.startswith("results/table2"))
    print("\n" + "\n".join(f"{j['rule']:14s} {j['wildcards']} {j['resources']}" for j in jobs
                           if j["rule"] != "sample_shard" or j["wildcards"].get("k") == "0"))


# ----------------------------------------------------------------------------------------------
# A real one-node SLURM cluster (root + Debian's slurm packages; .ci/install-slurm.sh in CI).

@pytest.fixture
def slurm_cluster(tmp_path_factory):
    if missing_binaries():
        pytest.skip(f"SLURM not installed ({', '.join(missing_binaries())} missing; .ci/install-slurm.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("a test SLURM cluster needs root (it writes /etc/slurm and starts slurmctld/slurmd/munged)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        pids = list(cluster.pids().values())
        cluster.stop()
        alive = [p for p in pids + cluster.job_processes() if Path(f"/proc/{p}").exists() and process_state(p) != "Z"]
        assert not alive, f"processes of the test cluster still running: {alive}"


def _mb(text: str) -> int:
    """scontrol's memory (e.g. 125G, 8000M) in MB."""
    return round(float(text[:-1]) * {"M": 1, "G": 1024, "T": 1024 ** 2}[text[-1]])


def _through_slurm(snakemake: list, ci, target: str, env: dict, slurm_cluster):
    """Run `snakemake` (its command up to the working directory) with the slurm profile and the test's
    overlay profile `ci` on `target`; fails the test, with the cluster's logs, after RUN_TIMEOUT s."""
    try:
        return subprocess.run([*snakemake, "--profile", str(PROFILE), "--profile", str(ci), "--cores", "8", target],
                              capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        pytest.fail(f"snakemake through SLURM did not finish in {RUN_TIMEOUT} s:\n{out[-4000:]}\n"
                    f"{slurm_cluster.logs()}")


@pytest.mark.slow
def test_tiny_dag_through_slurm(tmp_path, slurm_cluster, monkeypatch, tiny_config):
    cfg = tiny_config
    d = cfg["benchmarks"]["digits"]
    d["table1"] = ["tfd"]  # one trained row: 9 jobs in 7 waves (sampler rows add jobs, not waves)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    # CI overlay on the user's slurm profile: each key replaces the profile's key of that name.
    # Partitions: the profile's GPU partition (`gpu`) exists on the test cluster and CPU jobs use
    # its default partition; resources (mem, runtime, gpu) are the profile's, unchanged.
    ci = tmp_path / "ci-profile"
    ci.mkdir()
    (ci / "config.v8+.yaml").write_text(yaml.safe_dump({
        "config": {"benchmark": "digits"},            # not the paper benchmark
        "configfile": str(tmp_path / "config.yaml"),  # instead of ./site.yaml
        "slurm-status-command": "squeue",             # no slurmdbd, so no sacct (MinJobAge=600)
        "slurm-init-seconds-before-status-checks": 2,
        "latency-wait": 5,
        "retries": 0,
        "keep-going": False,
        "set-threads": {r: 1 for r in ("distill", "sample_shard", "score", "ref_stats")},  # 2 real cores
    }))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.time()
    r = _through_slurm([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                        str(tmp_path)], ci, "results/table1.csv", env, slurm_cluster)
    out = r.stdout + r.stderr
    wall = time.time() - t0
    assert r.returncode == 0, out[-6000:] + "\n" + slurm_cluster.logs()
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    n_jobs = int(re.search(r"^total\s+(\d+)", out, re.M).group(1))
    assert n_jobs >= 9 and len(submitted) == n_jobs, (n_jobs, submitted, out[-3000:])
    assert "SLURM run ID" in out  # the slurm executor, not the local one
    # the jobs ran through sbatch on the right partitions, with the profile's resources
    show = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    jobs = {}
    for line in show.splitlines():
        f = {k: (re.search(rf"\b{k}=(\S+)", line) or [None, None])[1]
             for k in ("JobId", "Partition", "TimeLimit", "TresPerJob", "Comment", "MinMemoryNode", "JobState")}
        jobs.setdefault(f["Comment"].removeprefix("rule_").split("_wildcards_")[0], []).append(f)
    assert sorted(f["JobId"] for fs in jobs.values() for f in fs) == sorted(submitted), show
    assert {f["JobState"] for fs in jobs.values() for f in fs} == {"COMPLETED"}, show
    prof = profile()
    for rule, fs in jobs.items():
        want = {**prof["default-resources"], **prof["set-resources"].get(rule, {})}
        for f in fs:
            assert f["Partition"] == want.get("slurm_partition", "debug"), (rule, f)  # debug: the default
            assert _mb(f["MinMemoryNode"]) == want["mem_mb"], (rule, f)
            assert ("gpu:1" in (f["TresPerJob"] or "")) == (rule in GPU_RULES), (rule, f)
    assert jobs["distill"][0]["TimeLimit"] == "2-00:00:00", jobs["distill"]
    df = pd.read_csv(tmp_path / "results/table1.csv")
    assert list(df["run"]) == ["tfd"]
    assert df["fid_digits"].notna().all()
    print(f"\n{n_jobs} SLURM jobs in {wall:.0f} s")


@pytest.mark.slow
def test_distill_srun_torchrun_rendezvous_through_slurm(tmp_path, slurm_cluster, monkeypatch, tiny_config):
    """A distill job with `nodes: 1` and 2 CPU processes (gloo) goes through sbatch, srun and
    torchrun's c10d rendezvous on the real one-node SLURM, and gives the same generator, tensor for
    tensor, as the same job run again locally through `torchrun --standalone` with 2 processes."""
    import torch
    from safetensors.torch import load_file

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    gen = Path("results/digits/tfd/tfd/generator.safetensors")
    prof = profile()
    resources = {**prof["set-resources"], "distill": {**prof["set-resources"]["distill"],  # set-resources is
                                                      "nodes": 1, "gpu": 0, "nproc_per_node": 2}}  # replaced whole
    ci = tmp_path / "ci-profile"
    ci.mkdir()
    (ci / "config.v8+.yaml").write_text(yaml.safe_dump({
        "config": {"benchmark": "digits"}, "configfile": str(tmp_path / "config.yaml"),
        "slurm-status-command": "squeue", "slurm-init-seconds-before-status-checks": 2, "latency-wait": 5,
        "retries": 0, "keep-going": False, "set-resources": resources,
        "set-threads": {r: 1 for r in ("distill", "ref_stats")},
    }))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path)]
    t0 = time.time()
    r = _through_slurm(snakemake, ci, str(gen), env, slurm_cluster)
    out = r.stdout + r.stderr
    log = tmp_path / "logs/digits/distill_tfd_tfd.log"
    assert r.returncode == 0, out[-6000:] + "\n" + (log.read_text()[-3000:] if log.exists() else "") + \
        slurm_cluster.logs()
    wall = time.time() - t0
    assert "SLURM run ID" in out and "srun --nodes 1 --ntasks 1 --ntasks-per-node 1" in out, out[-3000:]
    assert "torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d" in out, out[-3000:]
    show = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    job = next(line for line in show.splitlines() if "Comment=rule_distill" in line)
    job_id = re.search(r"\bJobId=(\d+)", job)[1]
    assert "JobState=COMPLETED" in job and "NumNodes=1" in job, job
    # the job's steps: the plugin's one-task step (0) and the srun of the launch (1), on the node
    slurmd = (slurm_cluster.dir / "slurmd.log").read_text()
    assert re.search(rf"launch task StepId={job_id}\.1 ", slurmd), slurmd[-3000:]
    info = json.loads((tmp_path / gen).with_name("train.json").read_text())
    assert info["world_size"] == 2, info
    via_slurm = load_file(tmp_path / gen)

    # the same job locally, torchrun --standalone (no `nodes`): only distill runs again
    shutil.rmtree((tmp_path / gen).parent)
    r = subprocess.run([*snakemake, str(gen), "--cores", "2", "--config", "benchmark=digits", "--allowed-rules",
                        "distill", "-p", "--set-resources", "distill:gpu=0", "distill:nproc_per_node=2"],
                       capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:] + (log.read_text()[-3000:] if log.exists() else "")
    # the printed command (-p) is torchrun --standalone; "srun" may still appear in the reason for the
    # rerun (the `launch` param changed), so only the command lines are checked
    commands = [line for line in out.splitlines() if "-m tfd.cli -- distill" in line]
    assert commands and all("torchrun --standalone --nproc-per-node 2" in c and "srun" not in c for c in commands), \
        out[-3000:]
    standalone = load_file(tmp_path / gen)
    assert json.loads((tmp_path / gen).with_name("train.json").read_text())["world_size"] == 2
    assert via_slurm.keys() == standalone.keys() and len(via_slurm) > 0
    for k, v in via_slurm.items():
        assert v.dtype == standalone[k].dtype and torch.equal(v, standalone[k]), k
    print(f"\ndistill through sbatch + srun + torchrun (c10d): {wall:.0f} s for the SLURM part, "
          f"{len(via_slurm)} generator tensors equal to torchrun --standalone")

