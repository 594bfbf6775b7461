"""The distill job's launch command (tfd/launch.py): which launcher for which resources, the errors
for GPU requests the slurm plugin would allocate differently, and the multi-node line run by bash
with stand-ins for scontrol/squeue/srun/torchrun (the first node and the port it resolves)."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from eval.errors import UserError
from tfd.launch import distill_launch, gres_gpus, procs_per_node

TAIL = "-m tfd.cli --"


@pytest.mark.parametrize("kw, want", [
    ({}, "tfd"),
    ({"gpu": 1}, "tfd"),
    ({"gpu": 0}, "tfd"),
    ({"gpu": 4}, f"torchrun --standalone --nproc-per-node 4 {TAIL}"),
    ({"gpu": 0, "nproc_per_node": 2}, f"torchrun --standalone --nproc-per-node 2 {TAIL}"),
    ({"gpu": 0, "gres": "gpu:a100:2"}, f"torchrun --standalone --nproc-per-node 2 {TAIL}"),
])
def test_one_node_without_srun(kw, want):
    assert distill_launch(**kw) == want


@pytest.mark.parametrize("kw, nodes, procs", [
    ({"nodes": 1, "gpu": 0, "nproc_per_node": 2}, 1, 2),  # the CPU form (gloo), as in the SLURM test
    ({"nodes": 1, "gpu": 1}, 1, 1),
    ({"nodes": 1, "gpu": 8}, 1, 8),
    ({"nodes": 4, "gpu": 0, "gres": "gpu:8"}, 4, 8),
    ({"nodes": 2, "gpu": 0, "gres": "gpu:h100:4"}, 2, 4),
    ({"nodes": 3, "gpu": None, "nproc_per_node": 5}, 3, 5),
])
def test_nodes_launch_srun_and_c10d_rendezvous(kw, nodes, procs):
    words = shlex.split(distill_launch(**kw))
    torchrun = words.index("torchrun")
    srun, tr = words[:torchrun], words[torchrun:]
    assert srun[0] == "srun" and _opt(srun, "--nodes") == _opt(srun, "--ntasks") == str(nodes)
    assert _opt(srun, "--ntasks-per-node") == "1" and "--overlap" in srun
    assert _opt(tr, "--nnodes") == str(nodes) and _opt(tr, "--nproc-per-node") == str(procs)
    assert _opt(tr, "--rdzv-backend") == "c10d" and _opt(tr, "--rdzv-id") == "$SLURM_JOB_ID"
    assert "--standalone" not in tr and " ".join(tr).endswith(TAIL)


def _opt(words, name):
    return words[words.index(name) + 1]


def test_gres_gpus():
    assert [gres_gpus(g) for g in (None, "", "gpu", "gpu:8", "gpu:a100:4", "gpu:a100", "tmp:100G")] == \
        [0, 0, 1, 8, 4, 1, 0]
    with pytest.raises(UserError, match="gres"):
        gres_gpus("gpu:a100:many")


@pytest.mark.parametrize("kw, match", [
    ({"nodes": 2, "gpu": 8}, "gres: 'gpu:8'"),          # --gpus=8 would be 8 for the whole job
    ({"gpu": 2, "gres": "gpu:2"}, "not both"),
    ({"nodes": 1, "gpu": 2, "nproc_per_node": 3}, "nproc_per_node"),
    ({"nodes": 0}, "nodes: expected an integer >= 1"),
    ({"nodes": 2.0, "gpu": 0}, "nodes"),
    ({"gpu": -1}, "gpu"),
    ({"nodes": 1, "rdzv_port": 0}, "rdzv_port"),
])
def test_bad_resources_name_the_key(kw, match):
    with pytest.raises(UserError, match=match):
        distill_launch(**kw)


def test_procs_per_node_one_per_gpu():
    assert procs_per_node(None, 3, None, None) == 3 and procs_per_node(2, 0, "gpu:4", 4) == 4
    assert procs_per_node(None, None, None, None) == 1


def _stand_ins(d: Path) -> Path:
    """Executables that print what they were given; scontrol expands node[3-4] as SLURM does."""
    bin_ = d / "bin"
    bin_.mkdir()
    scripts = {
        "scontrol": 'test "$1 $2" = "show hostnames" || exit 2\ncase "$3" in "node[3-4]") printf "node3\\nnode4\\n";; '
                    '*) echo "$3";; esac',
        "squeue": 'echo "node[3-4]"',
        "srun": 'echo "srun $*"; while [ "$1" != torchrun ]; do shift; done; exec "$@"',  # once, not per node
        "torchrun": 'echo "torchrun $*"',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    return bin_


@pytest.mark.parametrize("nodelist", ["node[3-4]", None])  # None: the plugin's step dropped it; squeue
def test_bash_resolves_first_node_and_port(tmp_path, nodelist):
    bin_ = _stand_ins(tmp_path)
    env = {"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123456"}
    if nodelist:
        env["SLURM_JOB_NODELIST"] = nodelist
    cmd = distill_launch(nodes=2, gpu=0, gres="gpu:8") + " distill --run tfd"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, check=True).stdout
    torchrun = shlex.split(out.splitlines()[-1])
    assert _opt(torchrun, "--rdzv-endpoint") == f"node3:{20000 + 123456 % 10000}"
    assert _opt(torchrun, "--rdzv-id") == "123456" and torchrun[-4:] == ["--", "distill", "--run", "tfd"]
    fixed = distill_launch(nodes=2, gpu=0, gres="gpu:8", rdzv_port=29400)
    out = subprocess.run(["bash", "-c", fixed], capture_output=True, text=True, env=env, check=True).stdout
    assert _opt(shlex.split(out.splitlines()[-1]), "--rdzv-endpoint") == "node3:29400"
