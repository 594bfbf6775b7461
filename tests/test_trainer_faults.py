"""The shared trainer under the faults of cluster jobs: killed jobs, damaged checkpoints, two jobs on one
run folder, a full disk, and the modes of the files it writes.

Tiny TFD runs on digits (tests/helpers.make_method), a few steps each; subprocesses where the fault
needs one (SIGKILL of a lock holder, RLIMIT_FSIZE)."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from eval.errors import BadFile, RunBusy, UserError
from tfd.trainer import TrainCfg, Trainer, checksum_path
from tfd.utils import RunLock

from tests.helpers import ROOT, make_method


def cfg(**kw):
    base = dict(steps=9, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=2, ema_halflife_steps=2.0)
    return TrainCfg(**{**base, **kw})


def steps_of(path: Path) -> list:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def killed_at(trainer: Trainer, step: int) -> None:
    """`trainer.fit()` killed (KeyboardInterrupt, as a time limit would) when it reaches `step`."""
    orig = trainer.train_one_step

    def boom():
        if trainer.step == step:
            raise KeyboardInterrupt("killed (time limit)")
        return orig()

    trainer.train_one_step = boom
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def run_script(code: str, *args, **kw) -> subprocess.Popen:
    """`code` in a fresh Python (this checkout importable, one thread), started in the background."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights (generator, EMA) of an uninterrupted 9-step run (checkpoints at 3, 6, 9)."""
    t = Trainer(make_method(), cfg(), tmp_path_factory.mktemp("ref"), progress=False)
    t.fit()
    return t.nets["generator"].state_dict(), t.ema.state_dict()


def assert_bit_equal(trainer: Trainer, ref) -> None:
    for mine, theirs in zip((trainer.nets["generator"].state_dict(), trainer.ema.state_dict()), ref):
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            assert torch.equal(mine[k], v), k


# -- resume: each step once in the logs ------------------------------------------------------------

def test_resume_logs_each_step_once(tmp_path):
    """/work/shared/cases/resume_duplicates.py: killed at step 5 (after the step-3 checkpoint and the
    step-4 record), with a torn last line, then resumed: every step once in both logs."""
    def eval_fn(net, step):  # stands in for the FID of the convergence record
        return {"fid_digits": float(sum(p.detach().double().sum() for p in net.parameters()))}

    c = cfg(steps=7, checkpoint_every=3, log_every=1, eval_every=2)
    killed_at(Trainer(make_method(), c, tmp_path, eval_fn=eval_fn, progress=False), 5)
    with (tmp_path / "stats.jsonl").open("a") as f:
        f.write('{"step": 5, "loss/gen')  # killed mid-write
    Trainer(make_method(), c, tmp_path, eval_fn=eval_fn, progress=False).fit()
    assert steps_of(tmp_path / "convergence.jsonl") == [0, 2, 4, 6, 7]
    assert steps_of(tmp_path / "stats.jsonl") == [1, 2, 3, 4, 5, 6, 7]


# -- damaged checkpoints ---------------------------------------------------------------------------

def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _flip(p: Path) -> None:  # one bit in the middle (tensor data): torch.load still reads it
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _legacy_truncate(p: Path) -> None:  # a checkpoint of before checksums, truncated: torch.load fails
    checksum_path(p).unlink()
    checksum_path(p.with_name("training-state.prev.pt")).unlink()
    _truncate(p)


def _drop_key(p: Path) -> None:  # reads back whole, matches its checksum, lacks the optimisers
    from tfd.trainer import _save_checkpoint_file
    s = torch.load(p, weights_only=False)
    del s["opts"]
    _save_checkpoint_file(s, p)


@pytest.mark.parametrize("damage, problem", [(_truncate, "checksum mismatch"), (_flip, "checksum mismatch"),
                                             (_legacy_truncate, "unreadable"), (_drop_key, "missing keys")],
                         ids=["truncated", "bit-flip", "truncated-no-checksum", "missing-key"])
def test_damaged_checkpoint_set_aside_previous_resumed(tmp_path, uninterrupted, capsys, damage, problem):
    """The latest checkpoint (step 6) damaged: set aside as `.corrupt` (an older `.corrupt` kept), the
    run resumes from `.prev` (step 3) and ends bit-equal to the uninterrupted run."""
    killed_at(Trainer(make_method(), cfg(), tmp_path, progress=False), 8)
    ckpt = tmp_path / "ckpt"
    assert torch.load(ckpt / "training-state.pt", weights_only=False)["step"] == 6
    assert torch.load(ckpt / "training-state.prev.pt", weights_only=False)["step"] == 3
    (ckpt / "training-state.pt.corrupt").write_text("an older damaged checkpoint")
    damage(ckpt / "training-state.pt")
    capsys.readouterr()
    t = Trainer(make_method(), cfg(), tmp_path, progress=False)
    t.fit()
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "training-state.pt" in warnings[0] and problem in warnings[0], out.err
    assert "resumed from" in out.out and "training-state.prev.pt at step 3" in out.out
    assert (ckpt / "training-state.pt.corrupt").read_text() == "an older damaged checkpoint"
    assert (ckpt / "training-state.pt.corrupt.1").is_file()
    assert t.step == 9 and steps_of(tmp_path / "stats.jsonl") == [2, 4, 6, 8, 9]
    assert_bit_equal(t, uninterrupted)


def test_no_good_checkpoint_starts_from_scratch(tmp_path, uninterrupted, capsys):
    killed_at(Trainer(make_method(), cfg(), tmp_path, progress=False), 8)
    _truncate(tmp_path / "ckpt" / "training-state.pt")
    _flip(tmp_path / "ckpt" / "training-state.prev.pt")
    t = Trainer(make_method(), cfg(), tmp_path, progress=False)
    t.fit()
    err = capsys.readouterr().err
    assert "starting from scratch" in err and err.count("damaged checkpoint") == 2
    assert {p.name for p in (tmp_path / "ckpt").glob("*.corrupt")} == {"training-state.pt.corrupt",
                                                                       "training-state.prev.pt.corrupt"}
    assert_bit_equal(t, uninterrupted)


def test_other_world_size_is_a_user_error_naming_the_fix(tmp_path):
    """A checkpoint (here one of before checksums: no `.sha256`) of a 2-process run resumed by one
    process: a one-line UserError saying what to do; the lock is released."""
    Trainer(make_method(), cfg(steps=3), tmp_path, progress=False).fit()
    p = tmp_path / "ckpt" / "training-state.pt"
    s = torch.load(p, weights_only=False)
    s["world_size"] = 2
    torch.save(s, p)
    checksum_path(p).unlink()
    with pytest.raises(UserError, match=r"2 process.*--nproc_per_node 2.*--no-resume") as e:
        Trainer(make_method(), cfg(steps=4), tmp_path, progress=False).fit()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "train.lock.holder").exists()
    RunLock(tmp_path).acquire().release()


# -- one trainer per run folder --------------------------------------------------------------------

HOLDER = """
    import sys, time
    from pathlib import Path
    from tests.helpers import make_method
    from tfd.trainer import TrainCfg, Trainer
    run = Path(sys.argv[1])
    t = Trainer(make_method(), TrainCfg(steps=3, lr=1e-3, checkpoint_every=1), run, progress=False)
    step = t.train_one_step
    def stuck():  # holds the run folder, mid-run, until killed
        if t.step == 1:
            (run / "ready").touch()
            time.sleep(600)
        return step()
    t.train_one_step = stuck
    t.fit()
"""


def test_second_trainer_refused_then_folder_free_after_sigkill(tmp_path):
    holder = run_script(HOLDER, tmp_path)
    try:
        t0 = time.time()
        while not (tmp_path / "ready").exists():
            assert holder.poll() is None, holder.communicate()
            assert time.time() - t0 < 120, "holder did not start"
            time.sleep(0.1)
        with pytest.raises(RunBusy, match=rf"pid {holder.pid}\b") as e:
            Trainer(make_method(), cfg(steps=3), tmp_path, progress=False).fit()
        assert "host " in str(e.value) and "started " in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    t = Trainer(make_method(), cfg(steps=3), tmp_path, progress=False)
    t.fit()  # the dead holder's lock does not block; its step-1 checkpoint is resumed
    assert t.step == 3 and json.loads((tmp_path / "train.json").read_text())["iters"] == 3
    assert not (tmp_path / "train.lock.holder").exists()


def test_lock_released_on_exception_and_not_reentrant(tmp_path):
    t = Trainer(make_method(), cfg(steps=3), tmp_path, progress=False)

    def fails():
        with pytest.raises(RunBusy):  # held by this very fit(): a second trainer in-process is refused too
            RunLock(tmp_path).acquire()
        raise RuntimeError("boom")

    t.train_one_step = fails
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    assert not (tmp_path / "train.lock.holder").exists()
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.holder_path.read_text())["pid"] == os.getpid()


def test_unwritable_run_folder_is_refused_before_training(tmp_path):
    (tmp_path / "run").write_text("a file in the way")
    with pytest.raises(BadFile, match="run folder is not writable"):
        Trainer(make_method(), cfg(steps=3), tmp_path / "run", progress=False).fit()


# -- disk full while checkpointing -----------------------------------------------------------------

DISK_FULL = """
    import resource, sys
    from pathlib import Path
    from tests.helpers import make_method
    from tfd.trainer import TrainCfg, Trainer
    run = Path(sys.argv[1])
    t = Trainer(make_method(), TrainCfg(steps=6, lr=1e-3, checkpoint_every=3), run, progress=False)
    save = t.save_checkpoint
    def save_on_full_disk():
        if t.step == 6:  # the file-size limit: half a checkpoint (Python ignores SIGXFSZ: EFBIG)
            size = (run / "ckpt" / "training-state.pt").stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        save()
    t.save_checkpoint = save_on_full_disk
    try:
        t.fit()
    except OSError as e:
        print("errno", e.errno, e.filename)
        sys.exit(3)
"""


def test_disk_full_during_checkpoint_keeps_previous(tmp_path):
    p = run_script(DISK_FULL, tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, (out, err)
    assert out.split()[:2] == ["errno", str(errno.EFBIG)] and "training-state.pt" in out
    leftovers = [f.name for f in tmp_path.rglob("*") if ".tmp" in f.name]
    assert leftovers == []
    assert not (tmp_path / "train.lock.holder").exists()
    prev = tmp_path / "ckpt" / "training-state.prev.pt"
    assert torch.load(prev, weights_only=False)["step"] == 3
    t = Trainer(make_method(), TrainCfg(steps=6, lr=1e-3, checkpoint_every=3), tmp_path, progress=False)
    assert t.try_resume() and t.step == 3


# -- file modes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_output_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        Trainer(make_method(), cfg(steps=3, log_every=1), tmp_path, eval_fn=lambda net, step: {"fid": 1.0},
                progress=False).fit()
        Trainer(make_method(), cfg(steps=5, log_every=1, eval_every=2), tmp_path,
                eval_fn=lambda net, step: {"fid": 1.0}, progress=False).fit()  # resumed: logs rewritten
    finally:
        os.umask(old)
    files = ["generator.safetensors", "train.json", "stats.jsonl", "convergence.jsonl", "train.lock",
             "ckpt/training-state.pt", "ckpt/training-state.pt.sha256", "ckpt/training-state.prev.pt",
             "ckpt/training-state.prev.pt.sha256"]
    modes = {f: oct(stat.S_IMODE((tmp_path / f).stat().st_mode)) for f in files}
    assert modes == {f: oct(0o666 & ~umask) for f in files}
    assert oct(stat.S_IMODE((tmp_path / "ckpt").stat().st_mode)) == oct(0o777 & ~umask)


# -- DDP: one sharded checkpoint for all ranks (torch.distributed.checkpoint) ---------------------

def _ddp_worker(rank, port, run):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run = Path(run)
        c = cfg(steps=7, log_every=7)
        killed_at(Trainer(make_method(), c, run, progress=False), 6)  # checkpoints at 3 and 6
        tdist.barrier()
        if rank == 1:  # one bit of rank 1's shard of the latest: every rank must step back to 3
            _flip(run / "ckpt" / "training-state.dcp" / "__1_0.distcp")
        tdist.barrier()
        t = Trainer(make_method(), c, run, progress=False)
        assert t.try_resume() and t.step == 3
        torch.save(t.step, run / f"resumed{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_ddp_ranks_resume_the_same_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"resumed{r}.pt") for r in (0, 1)] == [3, 3]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "training-state.dcp.corrupt" / "__1_0.distcp").is_file()  # set aside, not deleted
    assert json.loads((ckpt / "training-state.prev.dcp" / "trainer.json").read_text())["step"] == 3
