"""FD_DINOv2 (EDM2's protocol) and CMMD (google-research cmmd): the `dinov2` and `cmmd_clip`
feature extractors (eval.features), the CMMD estimator (eval.embed_metrics) and their metrics
`fd_dinov2` / `cmmd` through the scoring entry (eval.score), on tiny random transformers models
saved to local folders (no hub, no download).

Each extractor is checked against an independent computation: the transformers model called
directly on inputs prepared here by another route (numpy normalisation in float64; PIL's float
resampler for the torch resize; a numpy bicubic for the position embeddings), and each metric
against a plain numpy/scipy (or double loop) implementation of its formula."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from eval.errors import BadFile, UserError
from eval.features import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_extractor,
    get_extractor,
    hf_folder_sha256,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*not (DINOv2 ViT-L/14|CLIP ViT-L/14-336).*:UserWarning")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (a fresh model has zero CLS tokens, unit norms, ...), so
    that every part of the network matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def dinov2_dirs(tmp_path_factory):
    """{image_size: folder} of tiny random DINOv2 checkpoints, patch 14: image_size 224 has the 16x16
    position grid of 224 px inputs (nothing to resample); 70 has a 5x5 grid (resampled to 16x16)."""
    from transformers import Dinov2Config, Dinov2Model

    out = {}
    for size in (224, 70):
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=size, patch_size=14))
        _perturb(model, size)
        out[size] = tmp_path_factory.mktemp(f"dinov2_{size}")
        model.save_pretrained(out[size])
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP vision tower with projection, at CMMD's 336 px (patch 14, 16-d embeddings)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=336, patch_size=14,
                                                           projection_dim=16))
    _perturb(model, 1)
    d = tmp_path_factory.mktemp("clip336")
    model.save_pretrained(d)
    return d


def _images(seed: int, n: int, h: int, w: int | None = None, c: int = 3) -> np.ndarray:
    """uint8 NHWC: smooth random images (a coarse random field upsampled) plus noise, so that
    resizing and the networks see structure, not only noise."""
    rng = np.random.default_rng(seed)
    w = w or h
    coarse = rng.uniform(0, 255, (n, 4, 4, c))
    yy, xx = np.meshgrid(np.linspace(0, 3, h), np.linspace(0, 3, w), indexing="ij")
    i0, j0 = np.floor(yy).astype(int).clip(0, 2), np.floor(xx).astype(int).clip(0, 2)
    ty, tx = (yy - i0)[None, ..., None], (xx - j0)[None, ..., None]
    img = (coarse[:, i0, j0] * (1 - ty) * (1 - tx) + coarse[:, i0 + 1, j0] * ty * (1 - tx)
           + coarse[:, i0, j0 + 1] * (1 - ty) * tx + coarse[:, i0 + 1, j0 + 1] * ty * tx)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).round().astype(np.uint8)


def _hf_dinov2(folder):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval()


def _hf_clip(folder):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()


def _normalise64(x01: np.ndarray, mean, std) -> torch.Tensor:
    """float64 NHWC in [0, 1] -> float32 NCHW normalised (computed in float64, then rounded)."""
    x = (x01 - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def _edm2_input(u8: np.ndarray) -> torch.Tensor:
    """EDM2's DINOv2Detector preprocessing (resize_mode 'torch'), step by step as edm2 writes it."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor(IMAGENET_MEAN, dtype=torch.float32).reshape(1, -1, 1, 1)
    return x / torch.tensor(IMAGENET_STD, dtype=torch.float32).reshape(1, -1, 1, 1)


def _pil_float_resize(u8: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> float64 NHWC resized channel by channel with PIL's float ('F') BICUBIC: the same
    antialiased cubic filter (a = -0.5, support scaled on downsampling) as torch's antialias=True,
    a separate implementation."""
    return np.stack([np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), "F")
                                          .resize((size, size), Image.BICUBIC)) for c in range(img.shape[2])], -1)
                     for img in u8]).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# DINOv2


@pytest.mark.parametrize("side", [40, 300])  # upsampled / downsampled (antialiasing matters) to 224
def test_dinov2_features_are_edm2s(dinov2_dirs, side):
    """16x16 position grid (no resampling anywhere): our features == transformers' pooler_output
    of EDM2's preprocessing, exactly; and == the same network on PIL-float-resized inputs
    normalised in float64 (an independent resize) up to float32 resampling noise."""
    u8 = _images(side, 5, side)
    ext = get_extractor("dinov2", {"dinov2_checkpoint": str(dinov2_dirs[224])})
    ours = ext.features(u8)
    assert ours.shape == (5, 32) and ours.dtype == np.float64 and ext.dim == 32
    model = _hf_dinov2(dinov2_dirs[224])
    with torch.no_grad():
        edm2 = model(pixel_values=_edm2_input(u8)).pooler_output.double().numpy()
        pil = model(pixel_values=_normalise64(_pil_float_resize(u8, 224) / 255, IMAGENET_MEAN, IMAGENET_STD)
                    ).pooler_output.double().numpy()
        cls = model(pixel_values=_edm2_input(u8)).last_hidden_state[:, 0].double().numpy()
    np.testing.assert_array_equal(ours, edm2)
    np.testing.assert_array_equal(ours, cls)  # pooler_output is the CLS token of the normed output
    scale = np.abs(edm2).max()
    assert np.abs(ours - pil).max() < 2e-5 * scale, np.abs(ours - pil).max() / scale  # measured: 3e-6


def test_dinov2_pil_mode_and_grayscale(dinov2_dirs):
    """Mode `pil` = PIL BICUBIC on the uint8 image (dgm-eval); grayscale input = replicated RGB."""
    u8 = _images(7, 4, 64)
    ext = get_extractor("dinov2", {"dinov2_checkpoint": str(dinov2_dirs[224]), "dinov2_resize": "pil"})
    resized = np.stack([np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC)) for a in u8])
    with torch.no_grad():
        want = _hf_dinov2(dinov2_dirs[224])(
            pixel_values=_normalise64(resized / 255.0, IMAGENET_MEAN, IMAGENET_STD)).pooler_output.double().numpy()
    np.testing.assert_allclose(ext.features(u8), want, rtol=0, atol=1e-5 * np.abs(want).max())
    gray = u8[..., :1]
    np.testing.assert_array_equal(ext.features(gray), ext.features(np.repeat(gray, 3, axis=-1)))
    assert ext.provenance["mode"] == "pil" and "PIL bicubic" in ext.provenance["preprocessing"]
    with pytest.raises(UserError, match="dinov2_resize"):
        get_extractor("dinov2", {"dinov2_checkpoint": str(dinov2_dirs[224]), "dinov2_resize": "lanczos"})


def _keys_bicubic_matrix(n_in: int, n_out: int, scale: float, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic upsampling with an explicit scale factor
    (align_corners False, no antialias): source x = (i + 0.5) / scale - 0.5, Keys' cubic with
    a = -0.75 on the 4 nearest samples, indices clamped to the border. Written here from the
    formula, in float64."""
    def k(t):
        t = abs(t)
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += k(x - j)
    return w


def test_dinov2_position_embeddings_follow_the_hub(dinov2_dirs):
    """5x5 position grid -> 16x16 for 224 px: resampled with facebookresearch/dinov2's rule
    (scale_factor (16 + 0.1) / 5), which EDM2's torch.hub model uses, not transformers' own
    (size 16): equal to the network whose table is resampled here by a numpy bicubic, and
    measurably different from plain transformers."""
    u8 = _images(3, 4, 96)
    ext = get_extractor("dinov2", {"dinov2_checkpoint": str(dinov2_dirs[70])})
    ours = ext.features(u8)
    model = _hf_dinov2(dinov2_dirs[70])
    x = _edm2_input(u8)
    with torch.no_grad():
        plain = model(pixel_values=x).pooler_output.double().numpy()  # transformers' size=(16, 16) rule
        pos = model.embeddings.position_embeddings.detach().double().numpy()  # [1, 26, 32]
        w = _keys_bicubic_matrix(5, 16, (16 + 0.1) / 5)
        grid = np.einsum("ai,bj,ijd->abd", w, w, pos[0, 1:].reshape(5, 5, -1)).reshape(256, -1)
        table = np.concatenate([pos[:, :1], grid[None]], axis=1)
        model.embeddings.position_embeddings = torch.nn.Parameter(torch.from_numpy(table).float())
        hub = model(pixel_values=x).pooler_output.double().numpy()
    scale = np.abs(hub).max()
    assert np.abs(ours - hub).max() < 1e-5 * scale, np.abs(ours - hub).max() / scale
    assert np.abs(plain - hub).max() > 2e-4 * scale  # the rule matters (measured: 9e-4)


def test_fd_dinov2_is_the_frechet_distance_of_the_features(dinov2_dirs, tmp_path):
    """`fd_dinov2` through the scoring entry (reference statistics from `make_ref_stats`; the generic
    name `fid` maps to it) == an independent Frechet distance (np.cov, scipy sqrtm) of features
    computed directly with transformers on EDM2's preprocessing, to 1e-6 relative."""
    from eval.score import compute_metrics, make_ref_stats

    real, fake = _images(10, 48, 56), _images(11, 40, 64)
    ext = get_extractor("dinov2", {"dinov2_checkpoint": str(dinov2_dirs[224])})
    make_ref_stats(real, tmp_path / "ref.npz", ext, source="test")
    res = compute_metrics(fake, None, ["fid"], extractor=ext, ref_stats_path=tmp_path / "ref.npz")
    assert list(res) == ["fd_dinov2"]
    value, prov = res["fd_dinov2"]
    assert prov["extractor"] == "dinov2" and prov["dim"] == 32 and prov["resolution"] == "224x224"
    model = _hf_dinov2(dinov2_dirs[224])
    with torch.no_grad():
        f_real, f_fake = (model(pixel_values=_edm2_input(u8)).pooler_output.double().numpy() for u8 in (real, fake))
    m1, m2 = f_fake.mean(0), f_real.mean(0)
    s1, s2 = np.cov(f_fake, rowvar=False), np.cov(f_real, rowvar=False)
    want = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    assert want > 0 and abs(value - want) <= 1e-6 * want, (value, want)


# ----------------------------------------------------------------------------------------------
# CMMD


def _cmmd_input(u8: np.ndarray, size: int = 336) -> torch.Tensor:
    """The reference's reader, written here: centre crop to a square by numpy slicing, PIL BICUBIC
    to size x size, /255 and CLIP mean/std in float64."""
    n, h, w, _ = u8.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    rgb = np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8
    crops = rgb[:, top:top + side, left:left + side]
    resized = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.BICUBIC))
                        for a in crops])
    return _normalise64(resized / 255.0, CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("shape", [(3, 64, 64, 3), (3, 40, 57, 3), (2, 500, 380, 1)])
def test_cmmd_clip_features_are_the_references(clip_dir, shape):
    """Centre-cropped, PIL-bicubic 336 px inputs, CLIP normalisation -> transformers' image_embeds,
    L2-normalised: equal to the model called directly on inputs prepared here in float64."""
    u8 = _images(shape[1] + shape[2], shape[0], shape[1], shape[2], shape[3])
    ext = get_extractor("cmmd_clip", {"cmmd_clip_checkpoint": str(clip_dir)})
    ours = ext.features(u8)
    with torch.no_grad():
        e = _hf_clip(clip_dir)(pixel_values=_cmmd_input(u8)).image_embeds.double().numpy()
    want = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert ours.shape == (shape[0], 16) and ext.dim == 16
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(ours, want, rtol=0, atol=5e-6)  # measured: 9e-7
    assert ext.provenance["resolution"] == "336x336" and ext.provenance["extractor"] == "cmmd_clip"


def _cmmd_loop(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """google-research cmmd's `mmd` written as plain double loops: 1000 * (mean k(x, x') +
    mean k(y, y') - 2 mean k(x, y)), every pair including i == j, k = exp(-|a - b|^2 / (2 sigma^2))."""
    def mean_k(a, b):
        return sum(np.exp(-np.sum((ai - bj) ** 2) / (2 * sigma ** 2)) for ai in a for bj in b) / (len(a) * len(b))

    return 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def test_mmd_rbf_matches_the_reference_formula():
    from eval.embed_metrics import mmd_rbf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 8))
    y = rng.normal(size=(17, 8)) + 0.4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    want = _cmmd_loop(x, y)
    for block in (1, 7, 1 << 20):  # row blocks of 1 row, of a few rows, all at once
        assert abs(mmd_rbf(x, y, block_entries=block) - want) <= 1e-9 * abs(want)
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-12)
    assert mmd_rbf(x, x) == pytest.approx(0, abs=1e-12)
    with pytest.raises(UserError):
        mmd_rbf(x, y[:, :4])


def test_cmmd_metric_through_the_scoring_entry(clip_dir, tmp_path):
    """`cmmd` with reference statistics from `make_ref_stats` (which store the embeddings) == the
    double-loop reference formula on the sample embeddings and the stored reference embeddings, to
    1e-6 relative; refused (UserError) when the reference statistics store only mu/sigma."""
    from eval.fid import load_ref_stats
    from eval.score import compute_metrics, make_ref_stats

    real, fake = _images(20, 24, 48), _images(21, 19, 64)
    ext = get_extractor("cmmd_clip", {"cmmd_clip_checkpoint": str(clip_dir)})
    make_ref_stats(real, tmp_path / "ref.npz", ext, source="test")
    res = compute_metrics(fake, None, ["cmmd"], extractor=ext, ref_stats_path=tmp_path / "ref.npz")
    value, prov = res["cmmd"]
    ref_feats = load_ref_stats(tmp_path / "ref.npz")["features"].astype(np.float64)
    want = _cmmd_loop(ext.features(fake), ref_feats)
    assert want > 0 and abs(value - want) <= 1e-6 * want, (value, want)
    assert prov["sigma"] == 10 and prov["scale"] == 1000 and prov["n_real"] == 24
    make_ref_stats(real, tmp_path / "mu_only.npz", ext, source="test", store_features=False)
    with pytest.raises(UserError, match="features|embeddings"):
        compute_metrics(fake, None, ["cmmd"], extractor=ext, ref_stats_path=tmp_path / "mu_only.npz")


# ----------------------------------------------------------------------------------------------
# checkpoints, provenance, config


@pytest.mark.parametrize("name,key", [("dinov2", "dinov2_checkpoint"), ("cmmd_clip", "cmmd_clip_checkpoint")])
def test_missing_checkpoint_names_the_config_key(name, key, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"`{key}`.*not set"):
        get_extractor(name, {})
    with pytest.raises(FileNotFoundError, match=f"`{key}`.*folder not found"):
        get_extractor(name, {key: str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=f"`{key}`.*no config.json"):
        get_extractor(name, {key: str(tmp_path)})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadFile, match=key):
        get_extractor(name, {key: str(tmp_path)})


def test_a_checkpoint_of_the_other_network_is_refused(dinov2_dirs, clip_dir):
    """transformers would load a CLIP folder into a DINOv2 model with random weights (a log line
    only): refused, naming the folder and the key."""
    with pytest.raises(BadFile, match="not a dinov2 checkpoint.*dinov2_checkpoint"):
        get_extractor("dinov2", {"dinov2_checkpoint": str(clip_dir)})
    with pytest.raises(BadFile, match="not a clip_vision_model checkpoint.*cmmd_clip_checkpoint"):
        get_extractor("cmmd_clip", {"cmmd_clip_checkpoint": str(dinov2_dirs[224])})


def test_provenance_and_folder_hash(dinov2_dirs, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(dinov2_dirs[224], d)
    with pytest.warns(UserWarning, match="not DINOv2 ViT-L/14"):
        ext = build_extractor("dinov2", weights_path=d)  # the CLI's --feature-weights route
    sha, files = hf_folder_sha256(d)
    assert ext.provenance["sha256"] == sha and set(files) == {"config.json", "model.safetensors"}
    assert ext.provenance["dim"] == 32 and "antialias=True" in ext.provenance["preprocessing"]
    (d / "README.md").write_text("not part of the network")
    assert hf_folder_sha256(d)[0] == sha
    (d / "config.json").write_text((d / "config.json").read_text() + "\n")
    assert hf_folder_sha256(d)[0] != sha


def test_reference_statistics_of_the_other_resize_mode_are_refused(dinov2_dirs, tmp_path):
    from eval.fid import ProvenanceMismatch
    from eval.score import compute_metrics, make_ref_stats

    u8 = _images(5, 6, 32)
    cfg = {"dinov2_checkpoint": str(dinov2_dirs[224])}
    make_ref_stats(u8, tmp_path / "ref.npz", get_extractor("dinov2", cfg), source="test")
    with pytest.raises(ProvenanceMismatch, match="mode"):
        compute_metrics(u8, None, ["fd_dinov2"], extractor=get_extractor("dinov2", {**cfg, "dinov2_resize": "pil"}),
                        ref_stats_path=tmp_path / "ref.npz")


def test_config_accepts_the_new_extractors():
    from tfd.config import EvalCfg, from_dict

    e = from_dict(EvalCfg, {"feature_extractor": "dinov2", "dinov2_checkpoint": "/models/dinov2-large",
                            "metrics": ["fd_dinov2"]}, "eval")
    assert e.feature_extractor == "dinov2" and e.dinov2_checkpoint == "/models/dinov2-large"
    e = from_dict(EvalCfg, {"feature_extractor": "cmmd_clip", "cmmd_clip_checkpoint": "/models/clip-336",
                            "metrics": ["cmmd"]}, "eval")
    assert e.cmmd_clip_checkpoint == "/models/clip-336"


def test_ieee_float32_restores_the_settings():
    from eval.features import ieee_float32

    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with ieee_float32():
            assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 == conv and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(matmul)
