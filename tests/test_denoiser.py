"""The `Denoiser` interface: every network goes through it; methods never touch raw networks."""
import re

import pytest
import torch
import torch.nn.functional as F

from tfd.denoiser import EDMDenoiser, load_denoiser
from tfd.networks.edm import EDMPrecond, digits_unet_kwargs

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def make(label_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(**digits_unet_kwargs(**TINY, label_dropout=label_dropout))
    with torch.no_grad():
        for p in net.parameters():  # non-zero output layer: outputs depend on every input
            p.add_(0.05 * torch.randn_like(p))
    return EDMDenoiser(net)


def test_denoise_is_the_edm_network_with_one_hot_labels():
    d = make()
    assert d.sample_shape == (1, 8, 8) and (d.sigma_min, d.sigma_max, d.sigma_data) == (0.002, 80.0, 0.5)
    assert not any(p.requires_grad for p in d.parameters()) and not d.training  # frozen
    x, cond = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    ref = d.net(x, torch.full([3], 2.5), F.one_hot(cond, 10).float())
    assert torch.equal(d.denoise(x, 2.5, cond), ref)                    # a scalar sigma
    assert torch.equal(d.denoise(x, torch.full([3, 1, 1, 1], 2.5), cond), ref)  # one per sample
    assert torch.equal(d.denoise(x, 2.5, cond, guidance=1.0), ref)      # guidance 1 = no guidance


def test_raw_output_and_edm_scalings():
    """D = c_skip x + c_out F with EDM's Table 1 scalings (sigma_data 0.5)."""
    d = make()
    x, cond, s = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0.3, 7.0]).reshape(-1, 1, 1, 1)
    sd = 0.5
    want = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * d.raw(x, s, cond)
    torch.testing.assert_close(d.denoise(x, s, cond), want)


def test_classifier_free_guidance():
    with pytest.raises(ValueError, match="unconditional"):
        make().denoise(torch.randn(1, 1, 8, 8), 1.0, torch.tensor([3]), guidance=2.0)
    d = make(label_dropout=0.1)
    assert d.has_uncond
    x, cond = torch.randn(2, 1, 8, 8), torch.tensor([3, 5])
    d_c = d.net(x, torch.ones(2), F.one_hot(cond, 10).float())
    d_u = d.net(x, torch.ones(2), torch.zeros(2, 10))
    torch.testing.assert_close(d.denoise(x, 1.0, cond, guidance=3.0), d_u + 3.0 * (d_c - d_u))


def test_features_aliases_module_paths_and_early_stop():
    d = make()
    x, cond = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    f, out = d.features(x, 1.0, cond, ["enc:1", "bottleneck", "model.dec.8x8_block0"], return_output=True)
    assert torch.equal(out, d.denoise(x, 1.0, cond))
    path, _ = d.resolve_layer("bottleneck")
    assert torch.equal(f["bottleneck"], d.features(x, 1.0, cond, [path])[path])
    # without return_output the forward stops after the last requested layer: the decoder never runs
    ran = []
    h = d.net.model.out_conv.register_forward_hook(lambda *a: ran.append(1))
    try:
        d.features(x, 1.0, cond, ["enc:1"])
        assert ran == []
        d.features(x, 1.0, cond, ["enc:1"], return_output=True)
        assert ran == [1]
    finally:
        h.remove()
    with pytest.raises(ValueError, match="unknown layer"):
        d.features(x, 1.0, cond, ["enc:1", "no.such.module"])
    assert any(name.startswith("bottleneck = ") for name in d.layer_names())


def test_copy_is_trainable_and_independent(tmp_path):
    d = make()
    g = d.copy()
    assert g.training and all(p.requires_grad for p in g.parameters())
    assert not any(p.requires_grad for p in d.parameters())
    with torch.no_grad():
        next(g.parameters()).add_(1.0)
    assert not torch.equal(next(g.parameters()), next(d.parameters()))
    g.save(tmp_path / "g.safetensors")
    back = load_denoiser(tmp_path / "g.safetensors", what="generator")
    x, cond = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    assert torch.equal(back.denoise(x, 3.0, cond), g.eval().denoise(x, 3.0, cond))
    with pytest.raises(FileNotFoundError, match="generator checkpoint not found"):
        load_denoiser(tmp_path / "missing.safetensors", what="generator")


FORBIDDEN = [r"one_hot", r"img_resolution", r"img_channels", r"label_dim", r"\.net\.model\b", r"\bnet\.model\b",
             r"num_classes", r"tfd\.teacher", r"tfd\.networks"]


@pytest.mark.parametrize("path", sorted(p.relative_to(p.parents[2]).as_posix() for p in
                                        __import__("pathlib").Path(__file__).resolve().parents[1]
                                        .joinpath("tfd", "methods").glob("*.py")) + ["docs/method_template.py"])
def test_methods_use_only_the_denoiser_interface(path, root):
    """No method builds one-hot labels, reads raw network attributes or imports network code: a
    text-to-image teacher has none of them."""
    text = (root / path).read_text()
    hits = [(pat, text[:m.start()].count("\n") + 1) for pat in FORBIDDEN for m in re.finditer(pat, text)]
    assert not hits, f"{path}: raw-network access at (pattern, line) {hits}"


def test_forbidden_patterns_are_caught(root, tmp_path):
    """The grep test can fail: a line that builds a one-hot is found."""
    text = "x = F.one_hot(labels, self.teacher.net.label_dim)\n"
    assert [p for p in FORBIDDEN if re.search(p, text)]


def test_load_denoiser_dispatches_on_the_file_format(tmp_path):
    """Files are read by the `format` in their metadata; folders and unknown formats are errors
    naming the file."""
    from eval.io import atomic_save_safetensors
    from tfd.denoiser import DENOISER_FORMATS, register_denoiser_format

    make().save(tmp_path / "t.safetensors")
    assert isinstance(load_denoiser(tmp_path / "t.safetensors"), EDMDenoiser)
    atomic_save_safetensors({"w": torch.zeros(1)}, tmp_path / "other.safetensors", {"format": "someone.else.v1"})
    with pytest.raises(ValueError, match=r"other.safetensors: unknown denoiser format 'someone.else.v1'"):
        load_denoiser(tmp_path / "other.safetensors")
    seen = []
    register_denoiser_format("someone.else.v1", lambda path, device: seen.append(path) or "loaded")
    try:
        assert load_denoiser(tmp_path / "other.safetensors") == "loaded" and seen == [tmp_path / "other.safetensors"]
    finally:
        DENOISER_FORMATS.pop("someone.else.v1")
    with pytest.raises(ValueError, match="is a folder"):
        load_denoiser(tmp_path)
