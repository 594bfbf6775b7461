"""The command that starts `tfd distill` with 1, N local or N x G multi-node processes.

The distill rule (workflow/rules/distill.smk) puts `distill_launch(...)` in front of
`distill --config ...`, from its Snakemake resources (`set-resources: distill:` in a profile):

- nothing set, or one process:       `tfd`
- one node, several processes:      `torchrun --standalone --nproc-per-node P -m tfd.cli --`
- `nodes: N` (N >= 1, under SLURM):  `srun ... torchrun --nnodes N --nproc-per-node P
  --rdzv-backend c10d --rdzv-endpoint <first node>:<port> --rdzv-id $SLURM_JOB_ID -m tfd.cli --`

P is one process per GPU (`gpu: G` on one node; `gres: gpu:G` per node on several: the slurm
executor plugin turns `gpu` into `sbatch --gpus`, a job total, and `gres` into `--gres`, per node),
or `nproc_per_node` CPU processes (gloo) on nodes without GPUs.

`srun` starts one `torchrun` agent per node (`--ntasks-per-node 1`); each agent starts P worker
processes and the agents meet through torch's c10d rendezvous, hosted by the agent on the job's
first node (PyTorch docs, "torchrun (Elastic Launch)"; torch.distributed.run). The first node and
the port are resolved by the shell inside the job, so the command is a pure function of the
resources and can be shown by a dry run.
"""
from __future__ import annotations

from eval.errors import UserError

# The rendezvous port when none is configured: 20000 + (job id mod 10000), below Linux's ephemeral
# range (32768-60999), so two jobs sharing a first node rarely pick the same port.
PORT_BASE = 20000
PORT_SPAN = 10000
# The job's first node, inside a SLURM job. The slurm executor plugin's job step strips
# SLURM_JOB_NODELIST from the job's environment in some code paths (it keeps SLURM_JOB_ID), so the
# node list falls back to squeue's view of the job.
FIRST_NODE = ('$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(squeue -h -j "$SLURM_JOB_ID" -o %N)}" '
              '| head -n1)')
# The distill rule's resources that decide the launch (`set-resources: distill:` in a profile).
LAUNCH_RESOURCES = ("nodes", "gpu", "gres", "nproc_per_node", "rdzv_port")
TFD_MODULE = "-m tfd.cli --"  # the `--` keeps torchrun from reading the subcommand's options


def _count(value, key: str, minimum: int) -> int | None:
    """`value` as an int >= minimum, or None when unset; UserError naming the resource otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"set-resources: distill: {key}: expected an integer >= {minimum}, found {value!r}")
    return value


def gres_gpus(gres: str | None) -> int:
    """GPUs per node in a SLURM gres request: `gpu:8` / `gpu:a100:8` -> 8, `gpu` -> 1; none or
    another gres (e.g. `tmp:100G`) -> 0. Raises UserError for a GPU count that is not an integer."""
    if not gres:
        return 0
    parts = str(gres).split(":")
    if parts[0] != "gpu":
        return 0
    if len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise UserError(f"set-resources: distill: gres: expected gpu[:type]:COUNT (GPUs per node), found {gres!r}")
    return int(parts[-1]) if parts[-1].isdigit() else 1  # `gpu` and `gpu:a100` ask for one


def procs_per_node(nodes: int | None, gpu: int | None, gres: str | None, nproc_per_node: int | None) -> int:
    """Training processes per node: one per GPU, or `nproc_per_node` CPU processes (gloo) on nodes
    without GPUs. GPUs per node: `gpu` on one node (the plugin's `sbatch --gpus`, a job total);
    `gres: gpu:G` on several (`sbatch --gres`, per node). Raises UserError for a mix that would
    allocate other GPUs than the processes expect."""
    gpu = _count(gpu, "gpu", 0) or 0
    nproc = _count(nproc_per_node, "nproc_per_node", 1)
    per_node = gres_gpus(gres)
    if gpu and per_node:
        raise UserError("set-resources: distill: give either gpu (one node) or gres: gpu:G (GPUs per node), not both "
                        "(sbatch would get --gpus and --gres); set gpu: 0 with gres")
    if gpu and (nodes or 1) > 1:
        raise UserError(f"set-resources: distill: gpu: {gpu} with nodes: {nodes}: the slurm plugin asks for gpu as the "
                        f"job's total (sbatch --gpus); on several nodes give the GPUs per node as gres: 'gpu:{gpu}' "
                        "and set gpu: 0")
    per_node = per_node or gpu
    if nproc is not None and per_node and nproc != per_node:
        raise UserError(f"set-resources: distill: nproc_per_node ({nproc}) differs from the GPUs per node "
                        f"({per_node}): "
                        "one training process per GPU; nproc_per_node is for nodes without GPUs")
    return nproc or max(per_node, 1)


def distill_launch(nodes: int | None = None, gpu: int | None = None, gres: str | None = None,
                   nproc_per_node: int | None = None, rdzv_port: int | None = None) -> str:
    """The shell words that start the `tfd` CLI for a distill job (the rule appends `distill ...`).

    nodes: SLURM nodes of the job (`set-resources: distill: nodes`); None = no srun, one node.
    gpu: GPUs of a one-node job; gres: `gpu:G`, GPUs on each node; one process per GPU.
    nproc_per_node: processes per node without GPUs (gloo).
    rdzv_port: the c10d rendezvous port on the first node (None: 20000 + job id mod 10000).
    Returns e.g. `tfd`; raises UserError for a count that is not a positive integer or a GPU request
    the slurm plugin would turn into another allocation (see `procs_per_node`).
    """
    nodes = _count(nodes, "nodes", 1)
    port = _count(rdzv_port, "rdzv_port", 1)
    procs = procs_per_node(nodes, gpu, gres, nproc_per_node)
    if nodes is None:
        return "tfd" if procs == 1 else f"torchrun --standalone --nproc-per-node {procs} {TFD_MODULE}"
    port_expr = str(port) if port is not None else f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
    # --overlap: the plugin runs the job's command inside a one-task step that holds the job's CPUs;
    # --ntasks: that step's SLURM_NTASKS=1 is inherited; --kill-on-bad-exit: one failed node ends all.
    srun = f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --overlap --kill-on-bad-exit=1"
    torchrun = (f"torchrun --nnodes {nodes} --nproc-per-node {procs} --rdzv-backend c10d "
                f'--rdzv-endpoint "{FIRST_NODE}:{port_expr}" --rdzv-id "$SLURM_JOB_ID"')
    return f"{srun} {torchrun} {TFD_MODULE}"
