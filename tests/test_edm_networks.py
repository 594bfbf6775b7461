"""EDM/ADM UNet: EDM's names and sizes, preconditioning, layer names, safetensors, conversion."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eval.errors import UserError
from tfd.networks import EDMPrecond, digits_unet_kwargs, imagenet64_adm_kwargs, list_layers, resolve_layer
from tfd.networks.convert import EDM_IMPORT_HINT, convert_edm_pickle, load_edm_safetensors, save_edm_safetensors

REPO = Path(__file__).resolve().parents[1]

ENC_64 = ["64x64_conv", "64x64_block0", "64x64_block1", "64x64_block2",
          "32x32_down", "32x32_block0", "32x32_block1", "32x32_block2",
          "16x16_down", "16x16_block0", "16x16_block1", "16x16_block2",
          "8x8_down", "8x8_block0", "8x8_block1", "8x8_block2"]
DEC_64 = ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "8x8_block2", "8x8_block3",
          "16x16_up", "16x16_block0", "16x16_block1", "16x16_block2", "16x16_block3",
          "32x32_up", "32x32_block0", "32x32_block1", "32x32_block2", "32x32_block3",
          "64x64_up", "64x64_block0", "64x64_block1", "64x64_block2", "64x64_block3"]
TFD_LEVELS = {  # name -> (module path, feature shape at batch 1)
    "enc:6": ("model.enc.32x32_block1", [1, 384, 32, 32]),
    "enc:11": ("model.enc.16x16_block2", [1, 576, 16, 16]),
    "bottleneck": ("model.enc.8x8_block2", [1, 768, 8, 8]),
    "dec:7": ("model.dec.16x16_block0", [1, 576, 16, 16]),
    "dec:12": ("model.dec.32x32_block0", [1, 384, 32, 32]),
}


def randomized(net, seed=0, std=0.05):
    """Perturb every parameter (EDM zero-initialises out_conv/proj/conv1, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def digits_inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])[:n]
    return x, sigma, torch.eye(10)[torch.arange(n) % 10]


@pytest.fixture(scope="module")
def imagenet_net():
    torch.manual_seed(0)
    return EDMPrecond(**imagenet64_adm_kwargs()).eval()


@pytest.fixture
def digits_net():
    torch.manual_seed(0)
    return randomized(EDMPrecond(**digits_unet_kwargs()))


def test_imagenet64_parameter_count_and_keys(imagenet_net):
    assert sum(p.numel() for p in imagenet_net.parameters()) == 295_899_267
    assert list(imagenet_net.model.enc.keys()) == ENC_64
    assert list(imagenet_net.model.dec.keys()) == DEC_64
    keys = set(imagenet_net.state_dict())
    assert {"model.map_layer0.weight", "model.map_layer1.bias", "model.map_label.weight",
            "model.enc.64x64_conv.weight", "model.enc.32x32_down.conv0.resample_filter",
            "model.enc.32x32_down.skip.resample_filter", "model.dec.16x16_up.conv0.resample_filter",
            "model.enc.32x32_block0.norm0.weight", "model.enc.32x32_block0.qkv.weight",
            "model.dec.8x8_in0.proj.bias", "model.out_norm.weight", "model.out_conv.weight"} <= keys
    assert "model.map_label.bias" not in keys and not any("map_augment" in k for k in keys)
    assert "model.enc.32x32_down.skip.weight" not in keys  # kernel-0 skip: a pure resampler
    assert "model.dec.8x8_in1.qkv.weight" not in keys


def test_imagenet64_feature_shapes(imagenet_net):
    feats, handles = {}, []
    for name, (path, _) in TFD_LEVELS.items():
        got_path, module = resolve_layer(imagenet_net, name)
        assert got_path == path and module is imagenet_net.get_submodule(path)
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: feats.__setitem__(name, list(o.shape))))
    labels = torch.zeros(1, 1000)
    labels[0, 7] = 1
    with torch.no_grad():
        out = imagenet_net(torch.randn(1, 3, 64, 64), torch.tensor([1.0]), labels)
    for h in handles:
        h.remove()
    assert list(out.shape) == [1, 3, 64, 64] and out.dtype == torch.float32
    assert feats == {name: shape for name, (_, shape) in TFD_LEVELS.items()}


def test_layer_names(digits_net):
    assert resolve_layer(digits_net, "model.enc.4x4_block1") == (
        "model.enc.4x4_block1", digits_net.model.enc["4x4_block1"])
    assert resolve_layer(digits_net.model, "bottleneck")[0] == "enc.2x2_block1"
    assert list(digits_net.model.enc.keys()) == [
        "8x8_conv", "8x8_block0", "8x8_block1", "4x4_down", "4x4_block0", "4x4_block1",
        "2x2_down", "2x2_block0", "2x2_block1"]
    layers = list_layers(digits_net)
    assert "enc:3 = model.enc.4x4_down" in layers and "bottleneck = model.enc.2x2_block1" in layers
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(digits_net, "enc:9")
    for bad in ["dec:x", "middle", "", "model.enc.nope"]:
        with pytest.raises(ValueError, match="'enc:I'.*'bottleneck'"):
            resolve_layer(digits_net, bad)


def test_preconditioning_matches_edm_formulas(digits_net):
    x, sigma, labels = digits_inputs()
    sd = 0.5
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), sigma.log() / 4
    with torch.no_grad():
        F = digits_net.model(c_in * x, c_noise, labels)
        assert F.abs().max() > 0.1  # the check below is not vacuous
        torch.testing.assert_close(digits_net(x, sigma, labels), c_skip * x + c_out * F)
        # no labels = all-zero labels; float sigma accepted
        torch.testing.assert_close(digits_net(x, sigma), digits_net(x, sigma, torch.zeros(4, 10)))
        torch.testing.assert_close(digits_net(x[:1], 0.5, labels[:1]),
                                   digits_net(x[:1], torch.tensor([0.5]), labels[:1]))
    assert torch.equal(digits_net.round_sigma(0.3), torch.tensor(0.3))


def test_digits_unet_backward(digits_net):
    x, sigma, labels = digits_inputs()
    digits_net.train()
    (digits_net(x, sigma, labels) - x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in digits_net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 path runs only on CUDA")
def test_fp16_on_cuda_matches_fp32(digits_net):
    net = digits_net.cuda()
    net.use_fp16 = True
    x, sigma, labels = (t.cuda() for t in digits_inputs())
    with torch.no_grad():
        d16, d32 = net(x, sigma, labels), net(x, sigma, labels, force_fp32=True)
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, d32, atol=2e-2, rtol=2e-2)



@pytest.mark.parametrize("use_fp16", [False, True])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_under_the_trainers_autocast(digits_net, use_fp16, amp):
    """Under the trainer's autocast (`train.precision` bf16/fp16; here CPU autocast) the network runs with
    autocast's dtypes and returns float32 close to the fp32 output (it failed EDM's dtype assertion: the
    convolutions return the autocast dtype); `force_fp32` still runs it in fp32, bitwise."""
    net = digits_net.eval()
    x, sigma, labels = digits_inputs()
    with torch.no_grad():
        d32 = net(x, sigma, labels)
        old, net.use_fp16 = net.use_fp16, use_fp16
        try:
            with torch.autocast("cpu", dtype=amp):
                d, f, forced = net(x, sigma, labels), net.raw(x, sigma, labels), net(x, sigma, labels, force_fp32=True)
        finally:
            net.use_fp16 = old
    assert d.dtype == f.dtype == torch.float32
    assert not torch.equal(d, d32)                          # it did run in the lower precision
    torch.testing.assert_close(d, d32, atol=5e-2, rtol=5e-2)
    assert torch.equal(forced, d32)


def test_unet_dtypes_follow_edm_or_the_outer_autocast():
    """EDM's rule (float16 only with use_fp16, on CUDA, without force_fp32) without autocast; under an
    autocast on the input's device: a float32 input and the autocast dtype out. The CUDA case with a
    bfloat16 autocast (ImageNet-64 with EDM's `use_fp16` teacher at train.precision bf16) is set through
    torch's thread-local autocast state, which needs no GPU."""
    from tfd.networks.edm import unet_dtypes
    f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
    assert unet_dtypes(True, False, "cuda") == (f16, f16)
    assert unet_dtypes(True, True, "cuda") == unet_dtypes(False, False, "cuda") == unet_dtypes(True, False, "cpu") == (
        f32, f32)
    was, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", bf16)
    try:
        assert unet_dtypes(True, False, "cuda") == unet_dtypes(False, False, "cuda") == (f32, bf16)
        assert unet_dtypes(True, False, "cpu") == (f32, f32)        # autocast on another device: EDM's rule
    finally:
        torch.set_autocast_enabled("cuda", was)
        torch.set_autocast_dtype("cuda", dtype)


def test_init_kwargs_and_presets():
    kw = digits_unet_kwargs(model_channels=16)
    net = EDMPrecond(**kw)
    assert json.loads(json.dumps(net.init_kwargs)) == net.init_kwargs
    assert all(net.init_kwargs[k] == v for k, v in kw.items())
    with pytest.raises(TypeError):
        digits_unet_kwargs(model_channel=16)
    with pytest.raises(ValueError):
        EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet")


def test_safetensors_roundtrip(digits_net, tmp_path):
    path = tmp_path / "sub" / "teacher.safetensors"
    save_edm_safetensors(digits_net, path, source="unit-test")
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    assert set(load_file(str(path))) == set(digits_net.state_dict())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    parsed = json.loads(meta["tfd"])  # one sorted JSON key: byte-reproducible files
    assert parsed["init_kwargs"] == digits_net.init_kwargs and parsed["source"] == "unit-test"
    # a file written before (init_kwargs as a plain JSON string in the metadata map) still loads
    old = {"format": "tfd.edm_precond.v1", "init_kwargs": json.dumps(digits_net.init_kwargs)}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=old)
    x, sigma, labels = digits_inputs()
    with torch.no_grad():
        assert torch.equal(load_edm_safetensors(tmp_path / "old.safetensors")(x, sigma, labels),
                           digits_net(x, sigma, labels))
    loaded = load_edm_safetensors(path)
    x, sigma, labels = digits_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), digits_net(x, sigma, labels))
    # strict: an extra tensor is an error
    tensors = load_file(str(path))
    tensors["model.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="bad.safetensors: tensors_sha256: .*checksum mismatch"):
        load_edm_safetensors(tmp_path / "bad.safetensors")  # the stored checksum sees the change first
    unverified = {"tfd": json.dumps({k: v for k, v in parsed.items() if k != "tensors_sha256"})}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=unverified)
    with pytest.raises(UserError, match="model.extra"):  # without one, the strict key check does
        load_edm_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_edm_safetensors(tmp_path / "nope.safetensors")


# ---- conversion from an EDM pickle, with a stand-in "EDM repository" -----------------------------
# An independent stand-in for NVlabs/edm, written in a temporary directory: `dnnlib.EasyDict`,
# `torch_utils.persistence` (as EDM's: a pickled network carries its module's source and is rebuilt
# from it, so unpickling needs dnnlib and torch_utils but not `training`; constructor arguments are
# recorded as `init_args` / `init_kwargs`), and `training/networks.py` whose EDMPrecond/DhariwalUNet
# build EDM's module tree from plain torch.nn layers, transcribed from EDM's code (not ours). Nothing
# in it imports tfd, so a wrong key mapping, a layout difference or a lost tensor shows.

EDM_DNNLIB = """
class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value
"""

EDM_PERSISTENCE = """
import copy, inspect, sys, types, uuid
import dnnlib

_version = 6
_src_to_module_dict = {}
_module_to_src_dict = {}


def persistent_class(orig_class):
    if getattr(orig_class, "_is_persistent", False):
        return orig_class
    module_src = _module_to_src(sys.modules[orig_class.__module__])

    class Decorator(orig_class):
        _is_persistent = True
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0], fields[1], fields[2] = _reconstruct_persistent_obj, (meta,), None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    return Decorator


def _module_to_src(module):
    src = _module_to_src_dict.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    module = _src_to_module_dict.get(src)
    if module is None:
        name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(name)
        sys.modules[name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module


def _reconstruct_persistent_obj(meta):
    assert meta["version"] == _version and meta["type"] == "class"
    cls = _src_to_module(meta["module_src"]).__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    obj.__setstate__(meta["state"])
    return obj
"""

EDM_NETWORKS = """
import torch
from torch import nn
from torch_utils import persistence


def conv(cin, cout, kernel, up=False, down=False):
    # EDM's Conv2d: weight [out, in, k, k] and bias (none for kernel 0), buffer resample_filter when resampling
    m = nn.Conv2d(cin, cout, kernel) if kernel else nn.Module()
    if up or down:
        f = torch.tensor([1.0, 1.0])
        m.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum().square())
    return m


def norm(c):
    return nn.GroupNorm(min(32, c // 4), c)


@persistence.persistent_class  # as every class of EDM's networks.py: pickled with its module's source
class UNetBlock(nn.Module):
    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, channels_per_head=64):
        super().__init__()
        self.out_channels = cout
        self.norm0 = norm(cin)
        self.conv0 = conv(cin, cout, 3, up=up, down=down)
        self.affine = nn.Linear(emb, cout * 2)
        self.norm1 = norm(cout)
        self.conv1 = conv(cout, cout, 3)
        if cout != cin or up or down:
            self.skip = conv(cin, cout, 1 if cout != cin else 0, up=up, down=down)
        if attention and cout // channels_per_head:
            self.norm2 = norm(cout)
            self.qkv = conv(cout, cout * 3, 1)
            self.proj = conv(cout, cout, 1)


@persistence.persistent_class
class DhariwalUNet(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
                 dropout=0.10, label_dropout=0):
        super().__init__()
        emb = model_channels * channel_mult_emb
        if augment_dim:
            self.map_augment = nn.Linear(augment_dim, model_channels, bias=False)
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        if label_dim:
            self.map_label = nn.Linear(label_dim, emb, bias=False)
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = conv(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        self.out_norm = norm(cout)
        self.out_conv = conv(cout, out_channels, 3)


@persistence.persistent_class
class EDMPrecond(nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self.sigma_data = sigma_data
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)
"""

MAKE_PICKLES = """
import pickle, sys, torch, dnnlib
from safetensors.torch import save_file
from training.networks import EDMPrecond
out = sys.argv[1]
ARCH = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2, 2], num_blocks=2,
            attn_resolutions=[4], dropout=0.0)


def make(*args, **kwargs):
    torch.manual_seed(0)
    net = EDMPrecond(*args, **kwargs)
    with torch.no_grad():
        for t in net.state_dict().values():  # every tensor random: none may be dropped or swapped unseen
            t.copy_(torch.randn_like(t))
    return net


def dump(name, net):
    with open(f"{out}/{name}.pkl", "wb") as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(resolution=8)), f)


net = make(img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, **ARCH)  # as EDM's train.py
save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{out}/ref.safetensors")
dump("good", net)
dump("positional", make(8, 1, 10, **ARCH))  # init_args (8, 1, 10)
net = make(img_resolution=8, img_channels=1, label_dim=10, **ARCH)
block = net.model.enc["4x4_block0"]
block.norm = block._modules.pop("norm0")  # one module renamed
dump("renamed", net)
net = make(img_resolution=8, img_channels=1, label_dim=10, **ARCH)
layer = net.model.map_layer0
layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous())  # one tensor transposed
dump("transposed", net)
net = make(img_resolution=8, img_channels=1, label_dim=10, **ARCH)
net._init_kwargs = dict(net._init_kwargs, num_blocks=1)  # recorded config does not match the tensors
dump("mismatch", net)
"""

CONVERT = """
import sys
from tfd.networks.convert import convert_edm_pickle
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        print(convert_edm_pickle(src, dst)["source"])
    except Exception as e:
        print(f"{type(e).__name__}: {e}".replace(chr(10), " "))
"""


def _run(code, *args, edm_repo=None, tfd=True):
    path = ([str(REPO)] if tfd else []) + ([str(edm_repo)] if edm_repo else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=env, cwd=str(REPO if tfd else edm_repo), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _write_repo(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def fake_edm(tmp_path_factory):
    """-> (EDM stand-in without `training`, the pickles' folder). The pickles are written with the
    whole stand-in importable and no tfd (tfd's folder is not on the path)."""
    lib = {"dnnlib/__init__.py": EDM_DNNLIB, "torch_utils/__init__.py": "",
           "torch_utils/persistence.py": EDM_PERSISTENCE}
    full = _write_repo(tmp_path_factory.mktemp("edm_repo"),
                       {**lib, "training/__init__.py": "", "training/networks.py": EDM_NETWORKS})
    out = tmp_path_factory.mktemp("pickles")
    _run(MAKE_PICKLES, out, edm_repo=full, tfd=False)
    return _write_repo(tmp_path_factory.mktemp("edm_lib"), lib), out


def test_convert_needs_edm_code(fake_edm, tmp_path):
    _, out = fake_edm
    msg = _run(CONVERT, out / "good.pkl", tmp_path / "t.safetensors")
    assert msg.startswith("UserError: ") and EDM_IMPORT_HINT in msg
    assert not (tmp_path / "t.safetensors").exists()


def test_convert_edm_pickle(fake_edm, tmp_path):
    edm_lib, out = fake_edm
    names = ["good", "positional", "renamed", "transposed", "mismatch"]
    pairs = [a for n in names for a in (out / f"{n}.pkl", tmp_path / f"{n}.safetensors")]
    msgs = dict(zip(names, _run(CONVERT, *pairs, edm_repo=edm_lib).splitlines()))
    ref = load_file(str(out / "ref.safetensors"))  # the stand-in's own state_dict
    ours = EDMPrecond(**digits_unet_kwargs())
    assert {k: list(v.shape) for k, v in ref.items()} == {k: list(v.shape) for k, v in ours.state_dict().items()}
    for name in ("good", "positional"):
        target = tmp_path / f"{name}.safetensors"
        assert msgs[name].startswith(f"{name}.pkl sha256:"), msgs[name]
        with safe_open(str(target), framework="pt") as f:
            assert json.loads(f.metadata()["tfd"])["source"] == msgs[name]
            assert set(f.keys()) == set(ref)
            for k in f.keys():  # every tensor, bit for bit, under its EDM name
                assert f.get_tensor(k).dtype == torch.float32 and torch.equal(f.get_tensor(k), ref[k]), k
        net = load_edm_safetensors(target)
        assert net.init_kwargs == ours.init_kwargs  # from persistence's init_args / init_kwargs
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    assert msgs["renamed"].startswith("UserError: ") and "4x4_block0.norm.weight" in msgs["renamed"]
    assert "missing keys ['model.enc.4x4_block0.norm0.bias', 'model.enc.4x4_block0.norm0.weight']" in msgs["renamed"]
    assert msgs["transposed"].startswith("UserError: ")
    assert "size mismatch for model.map_layer0.weight" in msgs["transposed"]
    assert msgs["mismatch"].startswith("UserError: ") and "unexpected keys" in msgs["mismatch"]
    assert "2x2_block2" in msgs["mismatch"]
    assert not any((tmp_path / f"{n}.safetensors").exists() for n in ("renamed", "transposed", "mismatch"))
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        convert_edm_pickle(tmp_path / "missing.pkl", tmp_path / "x.safetensors")
