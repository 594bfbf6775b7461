"""eval.io: the one atomic writer (regular files replaced, FIFOs/devices/stdout written in place),
the one file hasher; and the other single helpers (EDM quantisation, the FID key)."""
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.io import (
    atomic_savez,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    temp_path,
)

ROOT = Path(__file__).resolve().parents[1]


def test_regular_file_is_replaced_and_no_temp_is_left(tmp_path):
    out = tmp_path / "sub" / "a.json"
    atomic_write_json(out, {"b": np.float32(0.5), "a": np.int64(3), "c": np.arange(2)})
    assert out.read_text() == '{\n  "a": 3,\n  "b": 0.5,\n  "c": [\n    0,\n    1\n  ]\n}\n'
    inode = out.stat().st_ino
    atomic_write_text(out, "new\n")
    assert out.read_text() == "new\n" and out.stat().st_ino != inode  # a new file, renamed over the old
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.json"]
    assert temp_path(out).name == f".a.json.tmp{os.getpid()}" and temp_path(out).parent == out.parent


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(out, boom)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_dev_null_is_written_in_place():
    atomic_write_text("/dev/null", "discarded\n")
    atomic_savez("/dev/null", x=np.zeros(3))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    atomic_write_json(fifo, {"value": 1})
    reader.join(timeout=30)
    assert got == [b'{\n  "value": 1\n}\n']
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    atomic_savez(fifo, x=np.arange(3))  # a zip writer (seeks) into a pipe
    reader.join(timeout=30)
    assert np.load(io.BytesIO(got[1]))["x"].tolist() == [0, 1, 2]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("redirect", ["pipe", "file"])
def test_dev_stdout_is_written_in_place(tmp_path, redirect):
    """`--out /dev/stdout`: to a pipe, and to a regular file the shell redirected stdout to (written
    through the process's stdout, not replaced: the inode stays, and what is printed before and
    after lands before and after it)."""
    code = ("from eval.io import atomic_write_text; print('before'); "
            "atomic_write_text('/dev/stdout', 'payload\\n'); print('after')")
    cmd = [sys.executable, "-c", code]
    if redirect == "pipe":
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "before\npayload\nafter\n"
    else:
        log = tmp_path / "log"
        with open(log, "w") as f:
            inode = os.fstat(f.fileno()).st_ino
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert log.read_text() == "before\npayload\nafter\n" and log.stat().st_ino == inode


def test_savez_and_torch_save_round_trip(tmp_path):
    atomic_savez(tmp_path / "a.npz", x=np.arange(4), y=np.ones(2))
    with np.load(tmp_path / "a.npz") as z:
        assert z["x"].tolist() == [0, 1, 2, 3] and z["y"].tolist() == [1.0, 1.0]
    atomic_savez(tmp_path / "no_suffix", x=np.arange(2))  # written as given, no `.npz` appended
    assert (tmp_path / "no_suffix").is_file()
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt")["w"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "no_suffix", "s.pt"]


def test_file_sha256_matches_hashlib_and_sees_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(f, chunk=7) == file_sha256(f)
    f.write_bytes(b"abcd")
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")


def test_one_hasher_one_quantiser_one_fid_key():
    """The modules that used to carry their own copies now use the shared helpers."""
    import eval.features as F
    import eval.sample as S
    import tfd.utils as U
    from eval.metrics import fid_key, is_fid_key

    assert F.file_sha256 is U.file_sha256 and F.quantise_edm is S.quantise_edm
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0])
    assert S.quantise_edm(x).tolist() == [0, 64, 128, 255, 255, 255]
    assert torch.equal(S.dequantise_edm(S.quantise_edm(x)), S.quantise_edm(x).float() / 127.5 - 1)
    assert fid_key(["run", "fid_n", "fid_digits_n", "fid_digits", "fid"]) == "fid_digits"
    assert fid_key({"step": 0, "fid_n": 3}) is None and fid_key([], "fid") == "fid"
    assert is_fid_key("fid_clean") and not is_fid_key("fid_clean_n") and not is_fid_key("precision")


def test_safetensors_files_are_byte_reproducible(tmp_path):
    """safetensors writes its metadata map in a random order on every call; the suite's writer
    stores one sorted JSON key, so two processes writing the same contents give the same bytes."""
    import subprocess
    import sys

    code = ("import sys, torch; from eval.io import atomic_save_safetensors as s; "
            "s({'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2, dtype=torch.int64)}, sys.argv[1], "
            "{'format': 'x', 'init_kwargs': {'a': 1, 'b': [1, 2]}, 'source': 'y', 'z': 'q'})")
    outs = []
    for i in range(4):  # separate processes: the map order would differ between them
        p = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
        outs.append(p.read_bytes())
    assert len(set(outs)) == 1
    from eval.io import read_safetensors_metadata
    assert read_safetensors_metadata(tmp_path / "0.safetensors")["init_kwargs"] == {"a": 1, "b": [1, 2]}
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_safetensors_metadata(tmp_path / "bad.safetensors")


def test_every_writer_gives_the_umask_mode(tmp_path):
    """Case 11 of ../shared/cases (file modes): the one atomic writer gives every output the mode a
    plain open() would (0o666 & ~umask), weights and JSON alike (it used to be 600 vs 644)."""
    from eval.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "g.safetensors", {"format": "x"})
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_atomic_directory_keeps_the_old_folder_on_failure(tmp_path):
    from eval.io import atomic_directory

    out = tmp_path / "pipe"
    with atomic_directory(out) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    with atomic_directory(out) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask  # the mode of any new folder, not mkdtemp's 0700
