"""FID, feature extractors, reference statistics and scoring: our numbers against torch-fidelity's
and clean-fid's own code paths, offline, on the digits benchmark (CPU, small data)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from eval import features as F
from eval.digits_net import DigitsNet, load_digits_net, read_metadata, train_digits_net
from eval.fid import (
    EXTERNAL,
    ProvenanceMismatch,
    RunningStats,
    check_provenance,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_ref_stats,
)
from eval.score import make_ref_stats, score_in_memory, score_samples
from tfd.data import digits_arrays

REL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors/matrices: one thread is faster, and on a shared 2-core machine two threads
    spinning against other processes were measured 5-15x slower."""
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(prev)


def _u8(x: torch.Tensor) -> np.ndarray:
    return F.quantise_edm(x).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "digits_net.safetensors"
    info = train_digits_net(path, seed=0)
    assert info["test_acc"] >= 0.97, info
    return path


@pytest.fixture(scope="module")
def data():
    xr, _ = digits_arrays("train")
    xt, yt = digits_arrays("test")
    g = torch.Generator().manual_seed(0)
    noisy = (torch.from_numpy(xt) + 0.25 * torch.randn(xt.shape, generator=g)).clamp(-1, 1)
    return dict(real=_u8(torch.from_numpy(xr[:500])), fake=_u8(noisy), fake_float=noisy, labels=yt,
                real_all=_u8(torch.from_numpy(digits_arrays("all")[0])))


def _write_pngs(folder, arr):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(arr):
        Image.fromarray(im[..., 0]).save(folder / f"{i:05d}.png")
    return str(folder)


def test_digits_net_file(net_path):
    meta = read_metadata(net_path)
    assert meta["format"] == "tfd-digits-net-v1" and int(meta["feature_dim"]) == 64
    assert float(meta["test_acc"]) >= 0.97
    net = load_digits_net(net_path)
    x = torch.from_numpy(digits_arrays("test")[0][:5])
    assert net.features(x).shape == (5, 64) and net(x).shape == (5, 10)
    assert not list(net_path.parent.glob(".*tmp*"))  # atomic write left no temporary file


def test_missing_digits_net_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*rule digits_feature_net"):
        load_digits_net(missing)
    with pytest.raises(FileNotFoundError, match="rule digits_feature_net"):
        F.get_extractor("digits", {"digits_weights_path": str(missing)})
    with pytest.raises(FileNotFoundError, match="digits_weights_path"):
        F.get_extractor("digits", {})


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # clean-fid + SciPy 1.17
def test_fid_matches_torch_fidelity_and_cleanfid(net_path, data, tmp_path):
    import torch_fidelity
    from cleanfid import fid as cfid

    ext = F.get_extractor("digits", {"digits_weights_path": str(net_path)})
    fr, ff = ext.features(data["real"]), ext.features(data["fake"])
    ours = fid_from_features(ff, fr)
    assert ours > 1.0
    d1, d2 = _write_pngs(tmp_path / "fake", data["fake"]), _write_pngs(tmp_path / "real", data["real"])
    kw = dict(fid=True, feature_extractor=F.TORCH_FIDELITY_DIGITS, feature_layer_fid="penultimate",
              feature_extractor_weights_path=str(net_path), cuda=False, save_cpu_ram=True, cache=False,
              verbose=False)
    # torch-fidelity, folders of PNGs (its PIL -> RGB uint8 loader)
    tf_dirs = torch_fidelity.calculate_metrics(input1=d1, input2=d2, **kw)["frechet_inception_distance"]
    # torch-fidelity, a Dataset of uint8 tensors

    class U8(torch.utils.data.Dataset):
        def __init__(self, a):
            self.a = torch.from_numpy(a).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            return self.a[i]

    tf_ds = torch_fidelity.calculate_metrics(input1=U8(data["fake"]), input2=U8(data["real"]),
                                             **kw)["frechet_inception_distance"]
    # clean-fid, folders, our network as custom_feat_extractor (legacy_tensorflow: no resize outside)
    cf = cfid.compute_fid(d1, d2, mode="legacy_tensorflow", custom_feat_extractor=ext.cleanfid_fn(),
                          device=torch.device("cpu"), num_workers=0, batch_size=64, verbose=False)
    cf_same_feats = cfid.frechet_distance(*feature_stats(ff), *feature_stats(fr))
    for name, v in [("torch-fidelity folders", tf_dirs), ("torch-fidelity dataset", tf_ds),
                    ("clean-fid folders", cf), ("clean-fid frechet", cf_same_feats)]:
        assert abs(v - ours) / ours < REL, (name, v, ours)
    print(f"\nfid_digits ours={ours!r} rel.err torch-fidelity(dirs)={abs(tf_dirs - ours) / ours:.2e} "
          f"(dataset)={abs(tf_ds - ours) / ours:.2e} clean-fid={abs(cf - ours) / ours:.2e} "
          f"clean-fid frechet={abs(cf_same_feats - ours) / ours:.2e}")


def test_fid_self_is_zero(net_path, data):
    ext = F.get_extractor("digits", {"digits_weights_path": str(net_path)})
    f = ext.features(data["real"])
    v = fid_from_features(f, f)
    assert abs(v) < 1e-6, v


def test_feature_stats_and_running_stats():
    rng = np.random.default_rng(0)
    f = rng.normal(3.0, 2.0, size=(500, 16))
    mu, sigma = feature_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12, atol=1e-12)
    edm = (f.T @ f - len(f) * np.outer(mu, mu)) / (len(f) - 1)  # EDM's formula
    np.testing.assert_allclose(sigma, edm, rtol=1e-9, atol=1e-9)
    rs = RunningStats()
    for i in range(0, 500, 64):
        rs.add(f[i:i + 64].astype(np.float32))
    mu2, s2 = rs.finish()
    mu32, s32 = feature_stats(f.astype(np.float32))
    np.testing.assert_allclose(mu2, mu32, rtol=1e-12)
    np.testing.assert_allclose(s2, s32, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,dim", [(20, 64), (50, 256), (2000, 64)])
def test_frechet_matches_direct_scipy_rank_deficient(n, dim):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(n + dim)
    a, b = rng.normal(size=(n, dim)), rng.normal(0.2, 1.1, size=(n, dim))
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    ours = frechet_distance(m1, s1, m2, s2)
    direct = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                   - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    tf = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)["frechet_inception_distance"]
    assert abs(ours - direct) / direct < 1e-12
    assert abs(ours - tf) / tf < REL, (ours, tf)
    print(f"\nN={n} D={dim}: rel.err vs direct scipy {abs(ours - direct) / direct:.1e}, vs torch-fidelity "
          f"eigvals {abs(ours - tf) / tf:.1e}")


def test_ref_stats_roundtrip_external_and_mismatch(net_path, data, tmp_path):
    ext = F.get_extractor("digits", {"digits_weights_path": str(net_path)})
    ref = tmp_path / "ref.npz"
    made = make_ref_stats(data["real_all"], ref, ext, source="digits_arrays('all')")
    z = load_ref_stats(ref)
    np.testing.assert_array_equal(z["mu"], made["mu"])
    assert z["provenance"]["sha256"] == ext.provenance["sha256"] and z["provenance"]["n"] == 1797
    assert z["provenance"]["source"] == "digits_arrays('all')" and z["features"].shape == (1797, 64)
    # EDM's reference files: mu and sigma only
    edm = tmp_path / "edm_ref.npz"
    np.savez(edm, mu=z["mu"], sigma=z["sigma"])
    ze = load_ref_stats(edm)
    assert ze["provenance"] == EXTERNAL and ze["features"] is None
    with pytest.warns(UserWarning, match="no provenance"):
        check_provenance(ext.provenance, ze["provenance"])
    # a different network (other weights) -> mismatch error
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    net = DigitsNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(other),
              metadata={k: v for k, v in read_metadata(net_path).items() if k != "tensors_sha256"})
    samples = tmp_path / "s.npz"
    np.savez(samples, data["fake"], data["labels"])
    with pytest.raises(ProvenanceMismatch, match="sha256"):
        score_samples(samples, tmp_path / "o", ["fid"], extractor="digits",
                      config={"digits_weights_path": str(other)}, ref_stats_path=ref)
    with pytest.raises(ProvenanceMismatch, match="resolution"):
        check_provenance(ext.provenance, {**z["provenance"], "resolution": "64x64"})


def test_score_samples_end_to_end_and_in_memory(net_path, data, tmp_path):
    cfg = {"digits_weights_path": str(net_path)}
    ref = tmp_path / "ref.npz"
    make_ref_stats(data["real_all"], ref, "digits", config=cfg, source="digits all")
    samples = tmp_path / "samples.npz"
    np.savez(samples, data["fake"], data["labels"])
    metrics = ["fid_digits", "precision_digits", "recall_digits", "max_ssim", "class_acc"]
    rec = score_samples(samples, tmp_path / "metrics", metrics, extractor="digits", ref_stats_path=ref, config=cfg)
    assert sorted(rec) == sorted(metrics)
    for m in metrics:
        j = json.loads((tmp_path / "metrics" / f"{m}.json").read_text())
        assert j["metric"] == m and j["n"] == len(data["fake"]) and np.isfinite(j["value"])
        p = j["provenance"]
        assert p["samples"] == str(samples) and p["quantisation"].startswith("edm")
    p = json.loads((tmp_path / "metrics" / "fid_digits.json").read_text())["provenance"]
    assert p["extractor"] == "digits" and p["ref_stats"] == str(ref) and len(p["sha256"]) == 64
    assert p["ref_provenance"]["n"] == 1797 and p["resolution"] == "8x8"
    ss = json.loads((tmp_path / "metrics" / "max_ssim.json").read_text())["provenance"]["ssim"]
    assert ss["win_size"] == 7 and ss["clamped"]
    assert 0.5 < rec["class_acc"]["value"] <= 1.0 and 0 < rec["precision_digits"]["value"] <= 1
    # the in-memory path (float batch from a "generator") gives the same numbers
    mem = score_in_memory(data["fake_float"], data["labels"], metrics, extractor="digits", ref_stats_path=ref,
                          config=cfg)
    for m in metrics:
        assert abs(mem[m] - rec[m]["value"]) <= 1e-9 * max(1.0, abs(mem[m])), m
    # generic names map to the extractor's names; n_max truncates
    rec2 = score_samples(samples, tmp_path / "m2", ["fid"], extractor="digits", ref_stats_path=ref, config=cfg,
                         n_max=100)
    assert list(rec2) == ["fid_digits"] and rec2["fid_digits"]["n"] == 100
    with pytest.raises(ValueError, match="inapplicable"):
        score_samples(samples, tmp_path / "m3", ["fid_clean"], extractor="digits", ref_stats_path=ref, config=cfg)
    # precision/recall need stored reference features
    ref_nofeat = tmp_path / "ref_nofeat.npz"
    make_ref_stats(data["real_all"], ref_nofeat, "digits", config=cfg, store_features=False)
    with pytest.raises(ValueError, match="reference features"):
        score_samples(samples, tmp_path / "m4", ["precision"], extractor="digits", ref_stats_path=ref_nofeat,
                      config=cfg)


# ----------------------------------------------------------------------------------------------
# Inception extractors: the real weights cannot be downloaded here; exercise the code paths with
# locally built stand-ins (a randomly initialised torch-fidelity Inception state_dict; a tiny
# TorchScript module with clean-fid's InceptionV3W interface) and check the missing-file errors.


def _random_tf_inception_weights(path):
    import torch_fidelity.feature_extractor_inceptionv3 as m

    class _NoLoad(m.FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):
            return None

    orig = m.load_state_dict_from_url
    m.load_state_dict_from_url = lambda *a, **k: {}
    try:
        net = _NoLoad("inception-v3-compat", ["2048"])
    finally:
        m.load_state_dict_from_url = orig
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}, path)


def test_inception_torch_fidelity_path(tmp_path):
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    with pytest.raises(FileNotFoundError, match=r"feature_extractor_weights_path.*weights-inception-2015-12-05"):
        F.get_extractor("inception", {})
    with pytest.raises(FileNotFoundError, match=r"feature_extractor_weights_path.*torch-fidelity"):
        F.get_extractor("inception", {"feature_extractor_weights_path": str(tmp_path / "missing.pth")})
    w = tmp_path / "random-inception.pth"
    _random_tf_inception_weights(w)
    ext = F.get_extractor("inception", {"feature_extractor_weights_path": str(w)})
    assert ext.dim == 2048 and ext.provenance["sha256"] == F.file_sha256(w)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    ours = ext.features(imgs)
    assert ours.shape == (3, 2048) and ours.dtype == np.float64 and np.isfinite(ours).all()
    # torch-fidelity's own feature loop (what calculate_metrics runs) on a uint8 Dataset
    tf_fe = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                     feature_extractor_weights_path=str(w))
    ds = [torch.from_numpy(im).permute(2, 0, 1).expand(3, -1, -1).contiguous() for im in imgs]
    theirs = get_featuresdict_from_dataset(_List(ds), tf_fe, 64, False, True, False)["2048"].double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)
    # a file named like the official asset but with other contents is flagged
    fake_official = tmp_path / F.TF_INCEPTION_FILE
    fake_official.symlink_to(w)
    with pytest.warns(UserWarning, match="not the official weights"):
        F.get_extractor("inception", {"feature_extractor_weights_path": str(fake_official)})


class _List(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _TinyInceptionTS(torch.nn.Module):
    """clean-fid's InceptionV3W interface: `.layers` (299x299 normalised input -> 2048) and
    `forward(x in [0,255], return_features=True)` resizing inside."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.AdaptiveAvgPool2d(1),
                                          torch.nn.Flatten(), torch.nn.Linear(8, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/load deprecation (torch 2.14)
@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_cleanfid_path(tmp_path, mode):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    with pytest.raises(FileNotFoundError, match=r"cleanfid_weights_path.*inception-2015-12-05\.pt"):
        F.get_extractor("clean-fid", {"cleanfid_mode": mode})
    with pytest.raises(FileNotFoundError, match=r"cleanfid_weights_path.*inception-2015-12-05\.pt"):
        F.get_extractor("clean-fid", {"cleanfid_weights_path": str(tmp_path / "x.pt"), "cleanfid_mode": mode})
    torch.manual_seed(0)
    w = tmp_path / "my-inception.pt"  # any name: exposed to clean-fid under its fixed name via a symlink
    torch.jit.script(_TinyInceptionTS()).save(str(w))
    links = tmp_path / "links"
    ext = F.get_extractor("clean-fid", {"cleanfid_weights_path": str(w), "cleanfid_mode": mode,
                                        "cleanfid_link_dir": str(links)})
    d = F.cleanfid_model_dir(w, links)
    assert (d / F.CLEANFID_FILE).resolve() == w.resolve() and d.parent == links
    # a file already named like clean-fid's is used in place
    named = tmp_path / "named" / F.CLEANFID_FILE
    named.parent.mkdir()
    named.write_bytes(w.read_bytes())
    assert F.cleanfid_model_dir(named) == named.parent
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    ours = ext.features(imgs)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    model = InceptionV3W(str(d), download=False, resize_inside=(mode == "legacy_tensorflow"))
    theirs = get_folder_features(str(folder), model, num_workers=0, batch_size=2, device=torch.device("cpu"),
                                 mode=mode, verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ext.provenance["mode"] == mode and ext.provenance["sha256"] == F.file_sha256(w)


def test_build_extractor_and_metric_names(net_path):
    from eval.score import metric_names

    ext = F.build_extractor("digits", weights_path=net_path)
    assert ext.provenance["weights"] == str(net_path)
    assert metric_names(ext) == {g: f"{g}_digits" for g in ("fid", "precision", "recall", "kid", "density", "coverage")}
    assert metric_names("inception")["fid"] == "fid"
    with pytest.raises(KeyError, match="available"):
        F.get_extractor("vgg16", {})
