"""The dataset stage (tfd.datastore): the store equals load_edm_zip, the store sampler draws exactly what
the in-memory sampler draws, bad zips are named and leave nothing behind, the store's record is checked."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.bench_datastore import make_edm_zip
from eval.errors import BadFile, UserError
from eval.sample import quantise_edm
from tfd.data import ClassBalancedSampler, StoreSampler, dequantise_table, dequantise_u8, load_edm_zip
from tfd.datastore import build_store, check_store_fits, open_store


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path, members: dict, labels: dict | None):
    """A zip of `members` {name: bytes} and dataset.json of `labels` {name: class} (None: no dataset.json)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[n, c] for n, c in labels.items()]}))
    return path


def _only_zip_left(folder):
    """The folder holds the zip and nothing else: no store, no temporary folder."""
    return sorted(p.name for p in folder.iterdir()) == ["data.zip"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 5-class store of 43 RGB 8x8 images (class sizes 9,9,9,8,8) and its zip; built with 2 workers
    and chunks of 5 images, so rows are written by several processes, out of order."""
    d = tmp_path_factory.mktemp("store")
    zpath = make_edm_zip(d / "data.zip", 43, size=8, num_classes=5, seed=1)
    meta = build_store(zpath, d / "store", workers=2, progress=False, chunk_images=5)
    return zpath, d / "store", meta


def test_dequantise_table_is_numpy_true_division():
    """All 256 values, as load_edm_zip computes them (float32 true division), and independent of the layout."""
    v = np.arange(256, dtype=np.uint8)
    want = np.array([np.float32(i) / np.float32(127.5) - np.float32(1) for i in range(256)], np.float32)
    assert np.array_equal(dequantise_table().numpy(), want)
    u8 = torch.from_numpy(np.stack([v.reshape(16, 16)] * 3, -1))[None]  # [1, 16, 16, 3]
    x = dequantise_u8(u8)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(quantise_edm(x), u8.permute(0, 3, 1, 2))  # and back to the same uint8


def test_store_round_trip_equals_load_edm_zip(store):
    zpath, folder, meta = store
    x, y = load_edm_zip(zpath)
    s = open_store(folder, verify=True)
    assert s.images.shape == (43, 8, 8, 3) and s.images.dtype == np.uint8 and isinstance(s.images, np.memmap)
    assert np.array_equal(s.labels, y) and s.labels.dtype == np.int64
    assert torch.equal(dequantise_u8(torch.from_numpy(np.array(s.images))), torch.from_numpy(x))  # bit-identical
    assert meta["count_per_class"] == [9, 9, 9, 8, 8] and s.num_classes == 5
    for c in range(5):
        assert np.array_equal(s.rows_of_class(c), np.flatnonzero(y == c))
    assert meta["source"]["bytes"] == zpath.stat().st_size and len(meta["source"]["sha256"]) == 64
    assert s.sha256 == meta["sha256"] and len(s.sha256) == 64
    assert json.loads((folder / "store.json").read_text())["arrays"]["images"]["shape"] == [43, 8, 8, 3]


def test_rebuild_is_identical_with_one_worker(store, tmp_path):
    zpath, folder, meta = store
    again = build_store(zpath, tmp_path / "store1", workers=1, progress=False)
    assert again["sha256"] == meta["sha256"] and again["arrays"] == meta["arrays"]


def test_grayscale_zip_round_trip(tmp_path):
    zpath = make_edm_zip(tmp_path / "gray.zip", 7, size=4, num_classes=2, channels=1)
    build_store(zpath, tmp_path / "store", progress=False)
    x, _ = load_edm_zip(zpath)
    s = open_store(tmp_path / "store")
    assert s.images.shape == (7, 4, 4, 1)
    assert torch.equal(dequantise_u8(torch.from_numpy(np.array(s.images))), torch.from_numpy(x))


@pytest.mark.parametrize("num_conditions", [None, 7])
def test_store_sampler_draws_what_the_memory_sampler_draws(store, num_conditions):
    """Same seed -> same rows, conditions and bit-identical images, call after call: G <= classes (without
    replacement), G > classes (with), k > class size (rows with replacement), given conditions, random_conditions."""
    zpath, folder, _ = store
    x, y = load_edm_zip(zpath)
    if num_conditions:  # a benchmark with more classes than the data has: both refuse the same way
        with pytest.raises(UserError, match=r"classes \[5, 6\] have no examples"):
            StoreSampler(open_store(folder), torch.Generator().manual_seed(0), num_conditions=num_conditions)
        with pytest.raises(UserError, match=r"classes \[5, 6\] have no examples"):
            ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator(), num_conditions)
        return
    mem = ClassBalancedSampler(torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(3))
    st = StoreSampler(open_store(folder), torch.Generator().manual_seed(3))
    calls = [(3, 4, None), (5, 9, None), (8, 4, None), (2, 12, None), (4, 2, torch.tensor([4, 4, 0, 1])),
             (12, 10, None)]
    for G, k, cond in calls:
        rows_m, cond_m = mem.draw(G, k, cond)
        state = st.generator.get_state()
        rows_s, cond_s = st.draw(G, k, cond)
        assert torch.equal(rows_m, rows_s) and torch.equal(cond_m, cond_s), (G, k)
        st.generator.set_state(state)
        mem.generator.set_state(state)
        img_m, cond_m = mem.sample(G, k, cond)
        img_s, cond_s = st.sample(G, k, cond)
        assert img_s.shape == (G, k, 3, 8, 8) and img_s.dtype == torch.float32 and img_s.is_contiguous()
        assert torch.equal(img_m, img_s) and torch.equal(cond_m, cond_s), (G, k)
        assert all((y[r] == c).all() for r, c in zip(rows_s.numpy(), cond_s.tolist()))  # rows of their class
        assert torch.equal(mem.random_conditions(6), st.random_conditions(6))
    assert torch.equal(mem.generator.get_state(), st.generator.get_state())


def test_store_sampler_reads_only_drawn_rows(store):
    """The sampler never reads the whole image array: index it through a recorder."""
    _, folder, _ = store
    s = open_store(folder)
    seen = []

    class Recorder(np.ndarray):
        def __getitem__(self, idx):
            seen.append(np.asarray(idx).copy())
            return np.ndarray.__getitem__(self, idx)

    object.__setattr__(s, "images", s.images.view(Recorder))
    sampler = StoreSampler(s, torch.Generator().manual_seed(0))
    rows, _ = sampler.draw(2, 3)
    sampler.generator.manual_seed(0)
    sampler.sample(2, 3)
    assert len(seen) == 1 and np.array_equal(seen[0], rows.flatten().numpy())


def test_missing_label_names_member_and_leaves_nothing(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    zpath = _zip(tmp_path / "data.zip", {"00000/img0.png": _png(a), "00000/img1.png": _png(a)}, {"00000/img0.png": 0})
    with pytest.raises(UserError, match=r"data\.zip: dataset.json has no label for 00000/img1\.png"):
        build_store(zpath, tmp_path / "store", progress=False)
    assert _only_zip_left(tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_member_named_and_nothing_left(tmp_path, workers):
    a = np.zeros((4, 4, 3), np.uint8)
    members = {f"00000/img{i:02d}.png": _png(a) for i in range(9)}
    members["00000/img07.png"] = b"\x89PNG\r\n\x1a\n but cut here"
    zpath = _zip(tmp_path / "data.zip", members, {n: 0 for n in members})
    with pytest.raises(BadFile, match=r"data\.zip: member 00000/img07\.png: not a readable PNG") as e:
        build_store(zpath, tmp_path / "store", workers=workers, progress=False, chunk_images=2)
    assert e.value.path == str(zpath)
    assert _only_zip_left(tmp_path)


def test_not_a_png_and_mixed_sizes_named(tmp_path):
    a, b = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="BMP")
    zpath = _zip(tmp_path / "data.zip", {"a.png": _png(a), "b.png": buf.getvalue()}, {"a.png": 0, "b.png": 1})
    with pytest.raises(BadFile, match=r"member b\.png: not a readable PNG .*not a PNG \(reads as BMP\)"):
        build_store(zpath, tmp_path / "store", progress=False)
    assert _only_zip_left(tmp_path)
    zpath = _zip(tmp_path / "data.zip", {"a.png": _png(a), "b.png": _png(b)}, {"a.png": 0, "b.png": 1})
    with pytest.raises(BadFile, match=r"member b\.png: image is 5x4 with 3 channel\(s\) of uint8, but the first "
                                      r"image is 4x4 with 3"):
        build_store(zpath, tmp_path / "store", progress=False)
    zpath = _zip(tmp_path / "data.zip", {"a.png": _png(a), "b.png": _png(a[:, :, 0])}, {"a.png": 0, "b.png": 1})
    with pytest.raises(BadFile, match=r"member b\.png: image is 4x4 with 1 channel"):
        build_store(zpath, tmp_path / "store", progress=False)
    assert _only_zip_left(tmp_path)


def test_failed_rebuild_keeps_the_old_store(store, tmp_path):
    zpath, folder, meta = store
    import shutil
    shutil.copytree(folder, tmp_path / "store")
    bad = _zip(tmp_path / "bad.zip", {"a.png": b"nope"}, {"a.png": 0})
    with pytest.raises(BadFile, match="member a.png"):
        build_store(bad, tmp_path / "store", progress=False)
    assert open_store(tmp_path / "store", verify=True).sha256 == meta["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "store"]


def test_open_store_checks_its_record(store, tmp_path):
    import shutil
    _, folder, _ = store
    with pytest.raises(BadFile, match=r"not a dataset store folder.*tfd prepare-data"):
        open_store(tmp_path / "nowhere")
    bad = tmp_path / "s1"
    shutil.copytree(folder, bad)
    meta = json.loads((bad / "store.json").read_text())
    meta["arrays"]["images"]["shape"] = [43, 8, 8, 1]
    (bad / "store.json").write_text(json.dumps(meta))
    with pytest.raises(BadFile, match=r"s1/images\.npy: images: does not match the store's record.*"
                                      r"expected shape \(43, 8, 8, 1\) uint8, found shape \(43, 8, 8, 3\) uint8"):
        open_store(bad)
    bad = tmp_path / "s2"
    shutil.copytree(folder, bad)
    np.save(bad / "labels.npy", np.zeros(43, np.int32))  # another dtype
    with pytest.raises(BadFile, match=r"s2/labels\.npy: labels: does not match"):
        open_store(bad)
    bad = tmp_path / "s3"
    shutil.copytree(folder, bad)
    with open(bad / "images.npy", "r+b") as f:  # same size, one byte changed: only the sha256 sees it
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    open_store(bad)
    with pytest.raises(BadFile, match=r"s3/images\.npy: changed after the store was built"):
        open_store(bad, verify=True)
    bad = tmp_path / "s4"
    shutil.copytree(folder, bad)
    with open(bad / "images.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BadFile, match=r"s4/images\.npy: not a readable \.npy array"):
        open_store(bad)
    (bad / "store.json").unlink()
    with pytest.raises(BadFile, match=r"s4/store\.json: missing"):
        open_store(bad)


def test_check_store_fits(store, tmp_path):
    zpath, folder, _ = store
    s = open_store(folder)
    check_store_fits(s, zpath, 8, 3)
    with pytest.raises(BadFile, match=r"does not fit the benchmark: expected 64x64 images with 3"):
        check_store_fits(s, zpath, 64, 3)
    other = make_edm_zip(tmp_path / "other.zip", 3, size=8, num_classes=1)
    with pytest.raises(BadFile, match=r"built from another zip"):
        check_store_fits(s, other, 8, 3)


# ----------------------------------------------------------------------------------------------
# the CLI: prepare-data, and distill / ref-stats reading the store


def _tfd(*argv) -> tuple[int, str]:
    """`tfd argv` in-process: (exit status, the error line or '')."""
    from tfd.cli import main
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return (1, e.code) if isinstance(e.code, str) else (int(e.code or 0), "")
    return 0, ""


@pytest.fixture(scope="module")
def zip_bench(tmp_path_factory):
    """A class benchmark on an EDM zip (12 RGB 8x8 images, 4 classes of 3: TFD's 2+2 per class draws
    rows with replacement), a random tiny EDM teacher, a tiny TFD run, and the zip's store."""
    import yaml

    from tfd.networks.convert import save_edm_safetensors
    from tfd.networks.edm import EDMPrecond
    d = tmp_path_factory.mktemp("zipbench")
    zpath = make_edm_zip(d / "data.zip", 12, size=8, num_classes=4, seed=2)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[])
    save_edm_safetensors(net, d / "teacher.safetensors")
    bench = {"data": {"kind": "edm_zip", "path": str(zpath)}, "num_classes": 4, "resolution": 8, "channels": 3,
             "teacher": {"kind": "edm", "checkpoint": str(d / "teacher.safetensors")},
             "eval": {"num_samples": 8, "shards": 1, "feature_extractor": "digits", "metrics": ["max_ssim"]},
             "table1": ["tfd"],
             "runs": {"tfd": {"method": "tfd", "train": {"steps": 2, "lr": 1e-4, "warmup_steps": 1, "log_every": 1,
                                                         "checkpoint_every": 2, "eval_every": 0, "seed": 0},
                              "params": {"layers": ["enc:2", "bottleneck"], "pool": 2, "groups_per_rank": 3,
                                         "n_gen": 2, "n_pos": 2, "n_anchor": 2}}},
             "ablations": {}}
    (d / "cfg.yaml").write_text(yaml.safe_dump({"benchmark": "zips", "benchmarks": {"zips": bench}}))
    assert _tfd("prepare-data", "--no-progress", "--zip", zpath, "--out", d / "store", "--workers", 2) == (0, "")
    return d


def test_distill_from_store_equals_distill_from_zip(zip_bench):
    """The same run trained on the store and on the zip in memory: identical generator weights; train.json
    records the store's sha256."""
    from eval.io import load_safetensors
    d = zip_bench
    common = ("distill", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
              d / "teacher.safetensors")
    assert _tfd(*common, "--out-dir", d / "mem") == (0, "")
    assert _tfd(*common, "--out-dir", d / "store_run", "--data-store", d / "store") == (0, "")
    a, _ = load_safetensors(d / "mem/generator.safetensors")
    b, _ = load_safetensors(d / "store_run/generator.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((d / "store_run/train.json").read_text())
    assert info["inputs_sha256"]["data"] == open_store(d / "store").sha256
    assert "data" not in json.loads((d / "mem/train.json").read_text())["inputs_sha256"]


def test_prepare_data_cli_errors(zip_bench, tmp_path):
    d = zip_bench
    bad = _zip(tmp_path / "data.zip", {"a.png": _png(np.zeros((8, 8, 3), np.uint8)), "b.png": b"junk"},
               {"a.png": 0, "b.png": 1})
    status, msg = _tfd("prepare-data", "--no-progress", "--zip", bad, "--out", tmp_path / "store", "--workers", 1)
    assert status == 1 and msg.startswith("tfd prepare-data: error: ") and "data.zip: member b.png" in msg, msg
    assert _only_zip_left(tmp_path)
    status, msg = _tfd("distill", "--config", d / "cfg.yaml", "--no-progress", "--run", "tfd", "--teacher",
                       d / "teacher.safetensors", "--out-dir", tmp_path / "run", "--data-store", tmp_path / "nowhere")
    assert status == 1 and "nowhere: not a dataset store folder" in msg and "tfd prepare-data" in msg, msg


def test_sigterm_leaves_no_store(tmp_path):
    """`tfd prepare-data` killed with SIGTERM mid-way (scancel, a killed Snakemake job) leaves the zip only."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT
    zpath = make_edm_zip(tmp_path / "data.zip", 3000, size=16, num_classes=3)
    p = subprocess.Popen([sys.executable, "-m", "tfd.cli", "prepare-data", "--no-progress", "--zip", str(zpath),
                          "--out", str(tmp_path / "store"), "--workers", "1"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".store.tmp-*/images.npy")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "finished before it could be interrupted: make the zip larger"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err)
    assert _only_zip_left(tmp_path)


def test_load_data_from_store_equals_zip(zip_bench):
    """What train-teacher --data-store and ref-stats read: the zip's data, bit for bit."""
    from tfd.config import load_config
    from tfd.runs import load_data
    b = load_config(zip_bench / "cfg.yaml").bench()
    (x0, y0), (x1, y1) = load_data(b), load_data(b, zip_bench / "store")
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and x1.shape == (12, 3, 8, 8)


def test_manifest_entry_of_a_store_is_its_recorded_identity(store):
    """A table manifest's input entry for the store: its sha256 and source from store.json (not a re-hash)."""
    from tfd.tables import _file_entry
    _, folder, meta = store
    e = _file_entry(folder)
    assert e["sha256"] == meta["sha256"] and e["count"] == 43 and e["source"] == meta["source"]
    assert e["arrays"]["images"]["sha256"] == meta["arrays"]["images"]["sha256"]
