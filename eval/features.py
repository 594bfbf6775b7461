"""Feature-extractor registry for FID / precision / recall.

`get_extractor(name, config)` returns an object with `.name`, `.dim`, `.provenance` (a dict:
extractor, weights file, sha256 of the weights, input resolution, preprocessing, layer, dim) and
`.features(uint8 NHWC numpy) -> float64 [N, dim]` (a CPU numpy array). `.features_in_memory(x)`
takes a float torch batch in [-1, 1] (NCHW, straight from a generator), quantises it exactly like
the sample files (`eval.sample.quantise_edm`) and returns the same features the npz/PNG path gives,
without writing anything.

Every extractor runs on the device given by the config key `device` (default `cpu`; e.g. `cuda`,
`cuda:1`): its network is moved there at construction, and inputs are moved there batch by batch.

Entries (config keys in brackets):

* `digits` [`digits_weights_path`, optional `digits_input_size` = 8]: the penultimate (64-d)
  features of the digits feature network (`eval.digits_net`); inputs larger than 8x8 (side a
  multiple of 8, e.g. 32 for `digits-text`) are area-averaged to 8x8 (`digits_input_8x8`).
  Also registered with torch-fidelity as `digits-net` (8x8 inputs; weights through
  torch-fidelity's own `feature_extractor_weights_path` kwarg), so torch-fidelity's
  `calculate_metrics(..., feature_extractor='digits-net')` runs through its real code path; and
  `DigitsExtractor.cleanfid_fn()` is the same network as a clean-fid `custom_feat_extractor`.
* `shapes` [`shapes_weights_path`]: the same network trained on the `shapes` benchmark's 48 modes
  (`eval.digits_net.train_digits_net(data='shapes')`), 64-d penultimate features of 8x8 RGB
  inputs taken as they are (`ShapesExtractor`). Metrics `fid_shapes`, `precision_shapes`, ...
* `inception` [`feature_extractor_weights_path`]: torch-fidelity's TF-compatible Inception
  (`inception-v3-compat`, 2048-d pool features). Weights: torch-fidelity's release asset
  `weights-inception-2015-12-05-6726825d.pth`.
* `clean-fid` [`cleanfid_weights_path`, `cleanfid_mode` = `clean` | `legacy_tensorflow`,
  optional `cleanfid_link_dir`]:
  clean-fid's Inception (the StyleGAN TorchScript port `inception-2015-12-05.pt`). clean-fid
  itself always looks for that exact file name in a hard-coded folder (`/tmp` on Linux/macOS,
  `./` on Windows -- it does not consult `tempfile.gettempdir()`/`TMPDIR`) and downloads it there
  when absent; we never let it download: the configured file is exposed to clean-fid's own
  `InceptionV3W(dir, download=False)` through a symlink named `inception-2015-12-05.pt` in a
  private folder keyed by the file's sha256 under `cleanfid_link_dir` (default: the system temp
  folder), or its own folder when the file already has that name.
* `dinov2` [`dinov2_checkpoint`, optional `dinov2_resize` = `torch` | `pil`]: DINOv2 ViT-L/14 for
  FD_DINOv2 with EDM2's protocol (`Dinov2Extractor`): a local transformers checkpoint folder
  (Hugging Face `facebook/dinov2-large`), 1024-d CLS token after the final layer norm, inputs
  bicubic-antialiased to 224x224 and ImageNet-normalised, float32. Metric `fd_dinov2`.
* `cmmd_clip` [`cmmd_clip_checkpoint`]: CLIP ViT-L/14-336 image embeddings for CMMD with the
  google-research `cmmd` protocol (`CmmdClipExtractor`): a local transformers checkpoint folder
  (Hugging Face `openai/clip-vit-large-patch14-336`), 768-d L2-normalised projected image
  embeddings of PIL-bicubic 336x336 inputs. Metric `cmmd` (`eval.embed_metrics`), which needs the
  reference embeddings stored in the reference statistics (`features`).

The checkpoint of these two is a folder, not a file: its provenance `sha256` is the sha256 of the
`sha256sum`-style listing of `config.json` and its weights files (`hf_folder_sha256`), and the
per-file hashes are listed under `files`.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from eval.digits_net import load_digits_net, missing_net_error
from eval.errors import BadFile, UserError, one_line
from eval.io import file_sha256, temp_path
from eval.sample import dequantise_edm, quantise_edm

TF_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
TF_INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TF_INCEPTION_FILE}"
CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{CLEANFID_FILE}"
TORCH_FIDELITY_DIGITS = "digits-net"

def _as_u8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC numpy (the npz convention) or uint8 NCHW torch -> uint8 NCHW torch."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images (the arr_0 convention), got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise UserError(f"expected NHWC images, got shape {images.shape}")
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    # A fresh tensor with canonical NCHW strides: CPU convolutions pick their kernel from the
    # strides (a [N,1,H,W] view of NHWC data looks channels-last), and different kernels differ
    # in the last float32 bits -- 7.6e-6 in digits features, 2e-8 relative in FID, measured.
    return torch.empty(images.shape, dtype=torch.uint8).copy_(images)


def _gray(u8: torch.Tensor) -> torch.Tensor:
    """[B,1|3,H,W] uint8 -> [B,1,H,W]: 3-channel input must be grayscale replicated (as PIL's
    convert('RGB') of a grayscale PNG, which torch-fidelity and clean-fid do)."""
    if u8.shape[1] == 1:
        return u8
    if u8.shape[1] == 3:
        if not (torch.equal(u8[:, 0], u8[:, 1]) and torch.equal(u8[:, 0], u8[:, 2])):
            raise UserError("the digits network is grayscale: got RGB images whose channels differ")
        return u8[:, :1]
    raise UserError(f"expected 1 or 3 channels, got {u8.shape[1]}")


def _rgb(u8: torch.Tensor) -> torch.Tensor:
    if u8.shape[1] == 3:
        return u8
    if u8.shape[1] == 1:
        return u8.expand(-1, 3, -1, -1)
    raise UserError(f"expected 1 or 3 channels, got {u8.shape[1]}")


def _config_path(config: Mapping | None, key: str, what: str) -> Path:
    value = (config or {}).get(key)
    if not value:
        raise FileNotFoundError(f"config key `{key}` is not set: it must point to {what}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config key `{key}` = {str(path)!r}: file not found. It must be {what}")
    return path


class FeatureExtractor:
    """Base class: subclasses implement `_features_u8(uint8 NCHW torch) -> torch [B, dim]`."""

    name: str
    dim: int
    provenance: dict
    batch_size: int = 256
    device: str | torch.device = "cpu"

    def _features_u8(self, u8_nchw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """uint8 NHWC numpy (or uint8 NCHW torch) -> float64 numpy [N, dim] on the CPU; batches
        of `batch_size` (default: the class's) are moved to `self.device` one at a time."""
        u8 = _as_u8_nchw(images)
        bs = batch_size or self.batch_size
        out = [self._features_u8(u8[i:i + bs]).to(torch.float64).cpu() for i in range(0, len(u8), bs)]
        if not out:
            return np.zeros((0, self.dim))
        return torch.cat(out).numpy()

    @torch.no_grad()
    def features_in_memory(self, x: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """float NCHW in [-1, 1] (a generator's output) -> features of its EDM-quantised uint8
        version: identical to writing the samples to an npz/PNGs and scoring those."""
        return self.features(quantise_edm(x).cpu(), batch_size)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} dim={self.dim} sha256={self.provenance.get('sha256', '')[:12]}>"


# ----------------------------------------------------------------------------------------------
# digits

DIGITS_8X8_RULE = "uint8 grayscale (RGB must have equal channels; channel 0 used) -> u8/127.5-1 float32"
DIGITS_AREA_RULE = ("uint8 1 or 3 channels -> mean over channels and {k}x{k} pixel blocks, rounded half up to uint8 "
                    "8x8 (floor((2*sum + n) / (2*n)), n = channels*{k}*{k}) -> u8/127.5-1 float32")


def _digits_block(side: int) -> int:
    """The area-averaging factor `side // 8` for square inputs of `side` (8, 16, 24, 32, ...);
    ValueError naming the size otherwise."""
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 8 or side % 8:
        raise UserError(f"the digits network takes square images whose side is a multiple of 8 "
                         f"(8x8, 16x16, 32x32, ...): got size {side!r}")
    return int(side) // 8


def digits_input_8x8(u8: torch.Tensor, input_size: int = 8) -> torch.Tensor:
    """uint8 [B, 1|3, S, S] -> uint8 [B, 1, 8, 8], the digits network's input (S = `input_size`).

    S = 8: the original rule (`DIGITS_8X8_RULE`): grayscale, or RGB with equal channels (channel 0).
    S = 8k (k > 1): area average (`DIGITS_AREA_RULE`): the mean over the channels and each k x k
    block, rounded half up in exact integer arithmetic, so a nearest-neighbour k-times upsampling
    of an 8x8 image (gray or replicated RGB) gives back that image exactly. ValueError naming the
    size when the images are not S x S or S is not a multiple of 8; 1 or 3 channels only."""
    k = _digits_block(input_size)
    b, c, h, w = u8.shape
    if (h, w) != (input_size, input_size):
        raise UserError(f"the digits extractor was built for {input_size}x{input_size} images (input_size), "
                         f"got {h}x{w}" + ("" if h == w and h % 8 == 0 and h >= 8 else
                                            ": the side must be a multiple of 8 (8x8, 16x16, 32x32, ...)"))
    if k == 1:
        return _gray(u8)
    if c not in (1, 3):
        raise UserError(f"expected 1 or 3 channels, got {c}")
    n = c * k * k
    sums = u8.to(torch.int64).reshape(b, c, 8, k, 8, k).sum(dim=(1, 3, 5))
    return torch.div(2 * sums + n, 2 * n, rounding_mode="floor").to(torch.uint8)[:, None]


class DigitsExtractor(FeatureExtractor):
    batch_size = 1000

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu", input_size: int = 8):
        """`weights_path`: digits network from `train_digits_net` (FileNotFoundError naming the DAG
        rule when absent); `device`: where the network runs; `input_size`: the side of the square
        images it is given (8, or a multiple of 8 such as 32 for `digits-text`; see
        `digits_input_8x8`), recorded in the provenance (ValueError for another value)."""
        _digits_block(input_size)
        self.weights_path = Path(weights_path)
        self.net = load_digits_net(self.weights_path, device=device)
        self.device = device
        self.input_size = int(input_size)
        self.name = "digits"
        self.dim = self.net.feat_dim
        self.provenance = {
            "extractor": "digits",
            "weights": str(self.weights_path),
            "sha256": file_sha256(self.weights_path),
            "layer": "penultimate",
            "dim": self.dim,
            "resolution": "8x8" if input_size == 8 else f"{input_size}x{input_size} -> 8x8",
            "preprocessing": DIGITS_8X8_RULE if input_size == 8 else DIGITS_AREA_RULE.format(k=input_size // 8),
            "test_acc": self.net.test_acc,
        }

    def _net_input(self, u8: torch.Tensor) -> torch.Tensor:
        return dequantise_edm(digits_input_8x8(u8, self.input_size).to(self.device))

    def _features_u8(self, u8):
        return self.net.features(self._net_input(u8))

    @torch.no_grad()
    def logits(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """uint8 NHWC numpy (or NCHW torch) -> the 10 class logits, float32 numpy [N, 10] on the CPU."""
        u8 = _as_u8_nchw(images)
        bs = batch_size or self.batch_size
        return torch.cat([self.net(self._net_input(u8[i:i + bs])).cpu() for i in range(0, len(u8), bs)]).numpy()

    def cleanfid_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The same features as a clean-fid `custom_feat_extractor`: clean-fid hands float32
        [B,3,H,W] in [0,255] (`ToTensor()(u8) * 255`, integer up to float rounding, which `round()`
        undoes exactly). Use clean-fid mode `legacy_tensorflow` (no resize outside the network) or
        a `custom_fn_resize` that keeps 8x8. Returns float64, so clean-fid's statistics run in
        float64 like ours."""

        @torch.no_grad()
        def fn(x: torch.Tensor) -> torch.Tensor:
            u8 = x.round().clamp(0, 255).to(torch.uint8)
            return self._features_u8(u8).to(torch.float64)

        return fn


try:  # torch-fidelity adapter (registered once, at import)
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase as _TFBase
except ImportError:  # pragma: no cover - torch-fidelity is a hard dependency of the suite
    _TFBase = None

if _TFBase is not None:

    class TorchFidelityDigitsNet(_TFBase):
        """torch-fidelity feature extractor `digits-net`: uint8 [B,3|1,8,8] -> ('penultimate' [B,64],
        'logits' [B,10]), both float64 so that torch-fidelity's own statistics are float64.
        Weights come from torch-fidelity's `feature_extractor_weights_path` kwarg."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise FileNotFoundError(
                    f"torch-fidelity feature extractor `{TORCH_FIDELITY_DIGITS}` needs "
                    f"`feature_extractor_weights_path=<digits net .safetensors>` (built by `rule digits_feature_net`)")
            self.net = load_digits_net(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("penultimate", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
                raise TypeError("expecting uint8 images [B,C,H,W]")
            xf = dequantise_edm(_gray(x))
            feats = self.net.features(xf)
            out = {"penultimate": feats, "logits": self.net.fc2(feats)}
            return tuple(out[a].to(torch.float64) for a in self.features_list)

    def _register_torch_fidelity():
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

        if TORCH_FIDELITY_DIGITS not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(TORCH_FIDELITY_DIGITS, TorchFidelityDigitsNet)

    _register_torch_fidelity()


# ----------------------------------------------------------------------------------------------
# Inception through torch-fidelity


def _check_hash_suffix(path: Path, sha: str) -> None:
    """torch.hub-style names carry a sha256 prefix (`...-6726825d.pth`): warn when it disagrees."""
    m = re.search(r"-([0-9a-f]{8,})\.\w+$", path.name)
    if m and not sha.startswith(m.group(1)):
        warnings.warn(f"{path}: file name says sha256 {m.group(1)}..., contents hash to {sha[:12]}...: "
                      f"not the official weights", stacklevel=3)


class TorchFidelityInception(FeatureExtractor):
    batch_size = 64

    def __init__(self, weights_path: str | os.PathLike, layer: str = "2048", device: str | torch.device = "cpu"):
        """`weights_path`: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`; `layer`: a
        torch-fidelity feature name (`2048` = pool features); `device`: where the network runs
        (torch-fidelity's `cuda=` is set from it)."""
        from torch_fidelity.utils import create_feature_extractor

        self.weights_path = Path(weights_path)
        sha = file_sha256(self.weights_path)
        _check_hash_suffix(self.weights_path, sha)
        self.device = device
        self.model = create_feature_extractor("inception-v3-compat", [layer], cuda=torch.device(device).type == "cuda",
                                              verbose=False, feature_extractor_weights_path=str(self.weights_path))
        self.model.to(device)
        self.name = "inception"
        self.dim = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008}[layer]
        self.provenance = {
            "extractor": "inception",
            "implementation": "torch-fidelity inception-v3-compat",
            "weights": str(self.weights_path),
            "sha256": sha,
            "layer": layer,
            "dim": self.dim,
            "resolution": "299x299 (TF1-compatible bilinear resize inside the network)",
            "preprocessing": "uint8 RGB NCHW (grayscale replicated) at native size -> (x-128)/128 after resize",
        }

    def _features_u8(self, u8):
        return self.model(_rgb(u8).contiguous().to(self.device))[0]


# ----------------------------------------------------------------------------------------------
# Inception through clean-fid


def cleanfid_model_dir(weights_path: str | os.PathLike, link_root: str | os.PathLike | None = None) -> Path:
    """A folder holding `inception-2015-12-05.pt` (the name clean-fid's InceptionV3W requires) that
    resolves to `weights_path`: its own folder when the name already matches, else a symlink in
    `<link_root or tempdir>/tfd-cleanfid-<sha256[:16]>/` (created atomically; clean-fid's own
    `/tmp/inception-2015-12-05.pt` is never touched)."""
    p = Path(weights_path).resolve()
    if p.name == CLEANFID_FILE:
        return p.parent
    d = Path(link_root or tempfile.gettempdir()) / f"tfd-cleanfid-{file_sha256(p)[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    link = d / CLEANFID_FILE
    if not (link.exists() and link.resolve() == p):
        tmp = temp_path(link)  # an atomic symlink swap (the same temp naming as eval.io.atomic_write)
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(p, tmp)
        os.replace(tmp, link)
    return d


class CleanFidInception(FeatureExtractor):
    batch_size = 32

    def __init__(self, weights_path: str | os.PathLike, mode: str = "clean", link_root: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu"):
        """`weights_path`: clean-fid's `inception-2015-12-05.pt`; `mode`: `clean` or
        `legacy_tensorflow`; `link_root`: where the name-fixing symlink goes (see
        `cleanfid_model_dir`); `device`: where the network runs (resizing stays on the CPU)."""
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if mode not in ("clean", "legacy_tensorflow"):
            raise UserError(f"cleanfid_mode must be 'clean' or 'legacy_tensorflow', got {mode!r}")
        self.weights_path = Path(weights_path)
        sha = file_sha256(self.weights_path)
        self.model = InceptionV3W(str(cleanfid_model_dir(self.weights_path, link_root)), download=False,
                                  resize_inside=(mode == "legacy_tensorflow")).eval().to(device)
        self.device = device
        self.mode = mode
        self.fn_resize = build_resizer(mode)
        self.name = "clean-fid"
        self.dim = 2048
        self.provenance = {
            "extractor": "clean-fid",
            "implementation": f"clean-fid InceptionV3W (TorchScript), mode {mode}",
            "weights": str(self.weights_path),
            "sha256": sha,
            "layer": "pool_3",
            "dim": 2048,
            "resolution": "299x299",
            "preprocessing": ("uint8 RGB HWC -> PIL bicubic float resize to 299 (clean-fid 'clean')" if mode == "clean"
                              else "uint8 RGB HWC at native size -> TF1 bilinear resize inside the network "
                                   "(clean-fid 'legacy_tensorflow')"),
            "mode": mode,
        }

    def _prepare(self, u8: torch.Tensor) -> torch.Tensor:
        """Per image exactly what clean-fid's ResizeDataset does after PIL `convert('RGB')`."""
        import torchvision

        to_tensor = torchvision.transforms.ToTensor()
        out = []
        for img in _rgb(u8).permute(0, 2, 3, 1).numpy():
            r = self.fn_resize(img)
            out.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
        return torch.stack(out)

    def _features_u8(self, u8):
        return self.model(self._prepare(u8).to(self.device))


# ----------------------------------------------------------------------------------------------
# transformers checkpoints in local folders: DINOv2 (FD_DINOv2) and CLIP ViT-L/14-336 (CMMD)

# files of a transformers checkpoint folder that decide the network: its config and the weights
# `from_pretrained` reads (a hub download also holds README/preprocessor/flax/tf files: not hashed)
HF_FOLDER_FILES = ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")
DINOV2_SOURCE = ("the DINOv2 ViT-L/14 checkpoint in transformers format: a local folder with config.json and "
                 "model.safetensors (Hugging Face repo facebook/dinov2-large, converted from torch.hub's "
                 "dinov2_vitl14); download it on a machine with internet access")
CMMD_CLIP_SOURCE = ("the CLIP ViT-L/14-336 checkpoint in transformers format: a local folder with config.json and "
                    "model.safetensors (Hugging Face repo openai/clip-vit-large-patch14-336); download it on a "
                    "machine with internet access")
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CMMD_RESOLUTION = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV2_POS_OFFSET = 0.1  # facebookresearch/dinov2's `interpolate_offset` (the torch.hub default)


def _config_folder(config: Mapping | None, key: str, what: str) -> Path:
    """The folder of config key `key` (the benchmark config's `eval.<key>`): FileNotFoundError
    naming the key when it is unset, missing, or not a folder holding a `config.json`."""
    value = (config or {}).get(key)
    where = f"config key `{key}` (eval.{key})"
    if not value:
        raise FileNotFoundError(f"{where} is not set: it must point to {what}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{where} = {str(path)!r}: folder not found. It must be {what}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{where} = {str(path)!r}: no config.json in that folder. It must be {what}")
    return path


def hf_folder_sha256(folder: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(sha256 of the folder, {file name: sha256}) of a transformers checkpoint folder, over
    `config.json` and the weights files of `HF_FOLDER_FILES` present in it. The folder's sha256 is
    that of the listing `<sha256>  <name>\\n` sorted by name (the `sha256sum` format): it changes
    when any of those files does, and ignores the rest of the folder."""
    import hashlib

    folder = Path(folder)
    names = sorted({p.name for pattern in HF_FOLDER_FILES for p in folder.glob(pattern) if p.is_file()})
    files = {n: file_sha256(folder / n) for n in names}
    listing = "".join(f"{h}  {n}\n" for n, h in files.items())
    return hashlib.sha256(listing.encode()).hexdigest(), files


def _load_hf_model(cls, folder: Path, key: str, model_type: str, what: str):
    """`cls.from_pretrained(folder)` offline, in float32, in eval mode; BadFile naming the folder
    and the config key for a folder that does not load, is not a `model_type` checkpoint, or leaves
    weights missing (transformers would initialise those randomly, with only a log message)."""
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise BadFile(folder, f"not a loadable transformers checkpoint (config key `{key}`)",
                      found=one_line(e), hint=f"it must be {what}") from None
    missing = sorted(info.get("missing_keys") or [])
    if model.config.model_type != model_type or missing:
        raise BadFile(folder, f"not a {model_type} checkpoint (config key `{key}`)",
                      found=f"model_type {model.config.model_type!r}" +
                            (f", {len(missing)} weights missing, e.g. {missing[:3]}" if missing else ""),
                      hint=f"it must be {what}")
    return model.eval().requires_grad_(False)


def dinov2_hub_position_embeddings(pos: torch.Tensor, grid: int, offset: float = DINOV2_POS_OFFSET) -> torch.Tensor:
    """DINOv2 position embeddings [1, 1 + M*M, D] (the CLS slot, then an M x M grid) -> [1, 1 +
    grid*grid, D], resampled as facebookresearch/dinov2's `interpolate_pos_encoding` does (the
    torch.hub model EDM2 loads): bicubic (a = -0.75, no antialias, align_corners False) with
    `scale_factor = (grid + offset) / M`, in float32, cast back. transformers' `Dinov2Embeddings`
    (5.x) passes `size=(grid, grid)` instead, i.e. a scale of grid / M: a slightly different
    sampling of the same grid (up to ~0.2 source cells apart at 224 px, 37 -> 16), hence other
    features. Returned unchanged when M == grid (the hub does not resample either)."""
    m = int(round((pos.shape[1] - 1) ** 0.5))
    if pos.ndim != 3 or m * m != pos.shape[1] - 1:
        raise ValueError(f"position embeddings [1, 1+M*M, D] expected, got {tuple(pos.shape)}")
    if m == grid:
        return pos
    d = pos.shape[-1]
    s = float(grid + offset) / m
    patch = torch.nn.functional.interpolate(pos[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2),
                                            scale_factor=(s, s), mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise ValueError(f"position-embedding resampling gave {tuple(patch.shape[-2:])}, not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)
    return torch.cat((pos[:, :1], patch), dim=1)


DINOV2_RULE = {
    "torch": ("uint8 RGB NCHW (grayscale replicated) -> float32 -> torch interpolate bicubic antialias=True to "
              "224x224 (not rounded) -> /255 -> (x - ImageNet mean) / ImageNet std, float32 (EDM2 DINOv2Detector, "
              "resize_mode 'torch')"),
    "pil": ("uint8 RGB (grayscale replicated) -> PIL bicubic resize to 224x224 (uint8) -> float32 /255 -> "
            "(x - ImageNet mean) / ImageNet std, float32 (EDM2 DINOv2Detector resize_mode 'pil' = dgm-eval)"),
}
CMMD_RULE = ("uint8 RGB (grayscale replicated) -> centre crop to a square -> PIL bicubic resize to {s}x{s} (uint8) "
             "-> float32 /255 -> (x - CLIP mean) / CLIP std, float32 (google-research cmmd io_util + embedding)")


def pil_resize_u8(u8_rgb: torch.Tensor, size: int, center_crop: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, size, size] on the CPU, image by image through PIL's
    antialiased BICUBIC `Image.resize`, optionally after a centre crop to a square (google-research
    cmmd's `_center_crop_and_resize`: side min(w, h) at offsets ((h - side) // 2, (w - side) // 2))."""
    from PIL import Image

    out = []
    for img in u8_rgb.permute(0, 2, 3, 1).cpu().numpy():
        im = Image.fromarray(np.ascontiguousarray(img), "RGB")
        if center_crop:
            w, h = im.size
            side = min(w, h)
            top, left = (h - side) // 2, (w - side) // 2
            im = im.crop((left, top, left + side, top + side))
        out.append(np.asarray(im.resize((size, size), resample=Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def ieee_float32():
    """Inside the block, CUDA convolutions and matmuls compute in IEEE float32 (no TF32); the
    previous settings are restored after. PyTorch lets cuDNN convolutions use TF32 by default
    (`torch.backends.cudnn.allow_tf32`): on an H200 that moved tiny-DINOv2 features (scale 3) by
    2e-4 from the CPU's, 1.6e-6 without it. No effect on the CPU."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float32 [B, 3, H, W] in [0, 1] -> (x - mean) / std per channel, in float32."""
    x = x - torch.tensor(mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)


class Dinov2Extractor(FeatureExtractor):
    """FD_DINOv2 features with EDM2's protocol (Karras et al. 2024, NVlabs/edm2
    `calculate_metrics.py` `DINOv2Detector`, itself modelled on layer6ai-labs/dgm-eval).

    uint8 NHWC images (1 or 3 channels, any size) -> float64 [N, 1024] (float32 network values):
    the CLS token after DINOv2's final LayerNorm (transformers' `Dinov2Model(...).pooler_output` =
    `layernorm(last_hidden_state)[:, 0]`, the value torch.hub's `dinov2_vitl14(x)` returns,
    `x_norm_clstoken`) of 224x224 float32 inputs: resize mode `torch` (EDM2's default) =
    `F.interpolate(float32(u8), (224, 224), mode='bicubic', antialias=True)`, not rounded; mode
    `pil` = PIL BICUBIC on the uint8 image (dgm-eval's, EDM2's slow reference path); then /255 and
    the ImageNet mean/std, in float32 (EDM2's order of operations). The network runs in IEEE
    float32 (`ieee_float32`: no TF32, also on GPUs; EDM2's calculate_metrics.py sets no flag, so
    on Ampere+ GPUs its patch-embedding convolution ran in PyTorch's default TF32: differences of
    order 1e-4 relative in the features, far below FD_DINOv2's sampling noise).

    The network is loaded from a LOCAL transformers folder (`facebook/dinov2-large`), and its 37x37
    position embeddings are resampled once to the 16x16 grid of 224 px inputs with the hub's rule
    (`dinov2_hub_position_embeddings`), not transformers' own, so that the features are those of
    the torch.hub model EDM2 loads. Comparable with: EDM2's FD_DINOv2 (its published tables and
    reference statistics, e.g. the `fd_dinov2` entry of `img512.pkl`), and dgm-eval's FD with
    DINOv2 ViT-L/14 in mode `pil`. NOT comparable with torch-fidelity's `dinov2-vit-l-14`: it
    resizes with TF1-style bilinear interpolation without antialiasing, and it cannot load a local
    file (`feature_extractor_weights_path` raises NotImplementedError in torch-fidelity 0.4)."""

    batch_size = 64

    def __init__(self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", resize: str = "torch"):
        """`checkpoint`: the transformers DINOv2 folder (config key `dinov2_checkpoint`);
        `device`: where the resize (mode torch) and the network run; `resize`: `torch` or `pil`."""
        from transformers import Dinov2Model

        if resize not in DINOV2_RULE:
            raise UserError(f"dinov2_resize must be 'torch' or 'pil', got {resize!r}")
        self.checkpoint = Path(checkpoint)
        model = _load_hf_model(Dinov2Model, self.checkpoint, "dinov2_checkpoint", "dinov2", DINOV2_SOURCE)
        cfg = model.config
        if (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size) != (1024, 24, 14):
            warnings.warn(f"{self.checkpoint}: not DINOv2 ViT-L/14 (hidden size {cfg.hidden_size}, "
                          f"{cfg.num_hidden_layers} layers, patch {cfg.patch_size}): FD_DINOv2 values are not "
                          f"comparable with published ones", stacklevel=2)
        if DINOV2_RESOLUTION % cfg.patch_size:
            raise UserError(f"{self.checkpoint}: patch size {cfg.patch_size} does not divide {DINOV2_RESOLUTION}")
        emb = model.embeddings
        with torch.no_grad():
            pos = dinov2_hub_position_embeddings(emb.position_embeddings.data, DINOV2_RESOLUTION // cfg.patch_size)
        # a [1, 1 + 16*16, D] table: transformers then uses it as is for 224x224 inputs (no resampling)
        emb.position_embeddings = torch.nn.Parameter(pos.contiguous(), requires_grad=False)
        self.model = model.to(device)
        self.device = device
        self.resize = resize
        self.name = "dinov2"
        self.dim = int(cfg.hidden_size)
        sha, files = hf_folder_sha256(self.checkpoint)
        self.provenance = {
            "extractor": "dinov2",
            "implementation": "transformers Dinov2Model pooler_output; position embeddings resampled with "
                              "facebookresearch/dinov2's rule (bicubic, scale (grid + 0.1) / M, as torch.hub)",
            "weights": str(self.checkpoint),
            "sha256": sha,
            "files": files,
            "layer": "CLS token after the final LayerNorm",
            "dim": self.dim,
            "resolution": f"{DINOV2_RESOLUTION}x{DINOV2_RESOLUTION}",
            "preprocessing": DINOV2_RULE[resize],
            "mode": resize,
            "compute_dtype": "float32, TF32 off (ieee_float32)",
            "protocol": "EDM2 FD_DINOv2 (NVlabs/edm2 calculate_metrics.py, DINOv2Detector)",
        }

    def net_input(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 1|3, H, W] -> the network's float32 [B, 3, 224, 224] input, on `self.device`."""
        u8 = _rgb(u8)
        if self.resize == "pil":
            x = pil_resize_u8(u8, DINOV2_RESOLUTION).to(self.device).to(torch.float32)
        else:
            x = torch.nn.functional.interpolate(u8.to(self.device).to(torch.float32),
                                                size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION),
                                                mode="bicubic", antialias=True)
        return _normalise(x / 255, IMAGENET_MEAN, IMAGENET_STD)

    def _features_u8(self, u8):
        with ieee_float32():
            return self.model(pixel_values=self.net_input(u8)).pooler_output


class CmmdClipExtractor(FeatureExtractor):
    """CMMD embeddings with the protocol of Jayasumana et al. 2024 (google-research/google-research
    `cmmd/`: `io_util.py` reads, `embedding.py` embeds).

    uint8 NHWC images (1 or 3 channels, any size) -> float64 [N, 768] (float32 network values):
    CLIP ViT-L/14-336's projected image embedding (transformers `CLIPVisionModelWithProjection(...)
    .image_embeds` = `visual_projection(post_layernorm(CLS))`, the reference's `encode_image`),
    L2-normalised in float32 (network in IEEE float32: `ieee_float32`). Inputs: each image
    centre-cropped to a square and resized with PIL BICUBIC (antialiased, uint8) to 336x336, as the
    reference's image reader does, then /255 and CLIP's mean/std in float32 (the reference's
    model-side bicubic resize to 336 is then the identity). The reference reads PNG/JPEG files; a
    benchmark whose reference images are first resized by the suite (text benchmarks:
    `eval.resolution`, LANCZOS) feeds those resized images here.

    Loaded from a LOCAL transformers folder (`openai/clip-vit-large-patch14-336`; a full CLIPModel
    checkpoint loads, its text tower unused). The input size is the checkpoint's `image_size` (336
    for that model; another checkpoint warns: its CMMD is not comparable with published values)."""

    batch_size = 32

    def __init__(self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
        """`checkpoint`: the transformers CLIP folder (config key `cmmd_clip_checkpoint`);
        `device`: where the network runs (the PIL resize runs on the CPU)."""
        from transformers import CLIPVisionModelWithProjection

        self.checkpoint = Path(checkpoint)
        model = _load_hf_model(CLIPVisionModelWithProjection, self.checkpoint, "cmmd_clip_checkpoint",
                               "clip_vision_model", CMMD_CLIP_SOURCE)
        cfg = model.config
        self.size = int(cfg.image_size)
        if (self.size, cfg.patch_size, cfg.hidden_size, cfg.projection_dim) != (CMMD_RESOLUTION, 14, 1024, 768):
            warnings.warn(f"{self.checkpoint}: not CLIP ViT-L/14-336 (image size {self.size}, patch {cfg.patch_size}, "
                          f"hidden size {cfg.hidden_size}, projection {cfg.projection_dim}): CMMD values are not "
                          f"comparable with published ones", stacklevel=2)
        self.model = model.to(device)
        self.device = device
        self.name = "cmmd_clip"
        self.dim = int(cfg.projection_dim)
        sha, files = hf_folder_sha256(self.checkpoint)
        self.provenance = {
            "extractor": "cmmd_clip",
            "implementation": "transformers CLIPVisionModelWithProjection image_embeds",
            "weights": str(self.checkpoint),
            "sha256": sha,
            "files": files,
            "layer": "projected image embedding (image_embeds), L2-normalised",
            "dim": self.dim,
            "resolution": f"{self.size}x{self.size}",
            "preprocessing": CMMD_RULE.format(s=self.size),
            "compute_dtype": "float32, TF32 off (ieee_float32)",
            "protocol": "CMMD (google-research cmmd): CLIP ViT-L/14-336 embeddings, Gaussian RBF MMD, sigma 10, x1000",
        }

    def net_input(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 1|3, H, W] -> the network's float32 [B, 3, S, S] input, on `self.device`."""
        x = pil_resize_u8(_rgb(u8), self.size, center_crop=True).to(self.device).to(torch.float32)
        return _normalise(x / 255, CLIP_MEAN, CLIP_STD)

    def _features_u8(self, u8):
        with ieee_float32():
            e = self.model(pixel_values=self.net_input(u8)).image_embeds
        return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# shapes

SHAPES_RULE = "uint8 RGB 8x8, as is -> u8/127.5-1 float32"


class ShapesExtractor(FeatureExtractor):
    batch_size = 1000

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu"):
        """`weights_path`: a feature network trained on the shapes data (`train_digits_net(data=
        'shapes')`; FileNotFoundError naming the DAG rule when absent, UserError for a network of
        other data); `device`: where it runs. Takes uint8 [B, 3, 8, 8] images (UserError otherwise)."""
        self.weights_path = Path(weights_path)
        self.net = load_digits_net(self.weights_path, device=device)
        if self.net.data != "shapes":
            raise UserError(f"{weights_path}: a feature network of {self.net.data!r} data, not of 'shapes' "
                            "(build it with `tfd train-feature-net --data shapes`)")
        self.device, self.name, self.dim = device, "shapes", self.net.feat_dim
        self.provenance = {"extractor": "shapes", "weights": str(self.weights_path),
                           "sha256": file_sha256(self.weights_path), "layer": "penultimate", "dim": self.dim,
                           "resolution": "8x8", "preprocessing": SHAPES_RULE, "test_acc": self.net.test_acc}

    def _features_u8(self, u8: torch.Tensor) -> torch.Tensor:
        if tuple(u8.shape[1:]) != (3, 8, 8):
            raise UserError(f"the shapes feature network takes 8x8 RGB images, got [C, H, W] = {list(u8.shape[1:])}")
        return self.net.features(dequantise_edm(u8.to(self.device)))


# ----------------------------------------------------------------------------------------------
# registry


def _build_digits(config):
    value = (config or {}).get("digits_weights_path")
    if not value:
        raise FileNotFoundError("no weights for the digits feature network (`digits_weights_path`): the "
                                "workflow's rule digits_feature_net builds them, or `tfd train-feature-net`")
    if not Path(value).is_file():
        raise missing_net_error(value)
    return DigitsExtractor(value, device=(config or {}).get("device", "cpu"),
                           input_size=(config or {}).get("digits_input_size") or 8)


def _build_shapes(config):
    value = (config or {}).get("shapes_weights_path")
    if not value:
        raise FileNotFoundError("no weights for the shapes feature network (`shapes_weights_path`): the workflow's "
                                "rule digits_feature_net builds them, or `tfd train-feature-net --data shapes`")
    if not Path(value).is_file():
        raise missing_net_error(value)
    return ShapesExtractor(value, device=(config or {}).get("device", "cpu"))


def _build_inception(config):
    path = _config_path(config, "feature_extractor_weights_path",
                        f"torch-fidelity's TF-compatible Inception weights `{TF_INCEPTION_FILE}` (a torch-fidelity "
                        f"v0.2.0 release asset: {TF_INCEPTION_URL}); download it on a machine with internet access")
    return TorchFidelityInception(path, layer=str((config or {}).get("inception_layer", "2048")),
                                  device=(config or {}).get("device", "cpu"))


def _build_cleanfid(config):
    path = _config_path(config, "cleanfid_weights_path",
                        f"clean-fid's Inception TorchScript file `{CLEANFID_FILE}` (the StyleGAN2-ADA metrics "
                        f"asset clean-fid downloads from {CLEANFID_URL} to /tmp/{CLEANFID_FILE}); copy it from "
                        f"a machine with internet access")
    return CleanFidInception(path, mode=(config or {}).get("cleanfid_mode", "clean"),
                             link_root=(config or {}).get("cleanfid_link_dir"),
                             device=(config or {}).get("device", "cpu"))


def _build_dinov2(config):
    path = _config_folder(config, "dinov2_checkpoint", DINOV2_SOURCE)
    return Dinov2Extractor(path, device=(config or {}).get("device", "cpu"),
                           resize=(config or {}).get("dinov2_resize") or "torch")


def _build_cmmd_clip(config):
    path = _config_folder(config, "cmmd_clip_checkpoint", CMMD_CLIP_SOURCE)
    return CmmdClipExtractor(path, device=(config or {}).get("device", "cpu"))


EXTRACTORS: dict[str, Callable[[Mapping | None], FeatureExtractor]] = {
    "digits": _build_digits,
    "shapes": _build_shapes,
    "inception": _build_inception,
    "clean-fid": _build_cleanfid,
    "dinov2": _build_dinov2,
    "cmmd_clip": _build_cmmd_clip,
}


def register_extractor(name: str, builder: Callable[[Mapping | None], FeatureExtractor]) -> None:
    if name in EXTRACTORS:
        raise ValueError(f"feature extractor {name!r} is already registered")
    EXTRACTORS[name] = builder


def get_extractor(name: str, config: Mapping | None = None) -> FeatureExtractor:
    """Build the extractor `name` from a config of paths (see the module docstring for the keys)."""
    if name not in EXTRACTORS:
        raise KeyError(f"unknown feature extractor {name!r}; available: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](config)


WEIGHTS_KEY = {"digits": "digits_weights_path", "shapes": "shapes_weights_path",
               "inception": "feature_extractor_weights_path",
               "clean-fid": "cleanfid_weights_path", "dinov2": "dinov2_checkpoint",
               "cmmd_clip": "cmmd_clip_checkpoint"}


def build_extractor(name: str, weights_path: str | os.PathLike | None = None, config: Mapping | None = None,
                    **options) -> FeatureExtractor:
    """`get_extractor` with the weights file given directly: `weights_path` goes to the config key of
    that extractor (`digits_weights_path`, `feature_extractor_weights_path`, `cleanfid_weights_path`,
    or the checkpoint folder `dinov2_checkpoint` / `cmmd_clip_checkpoint`);
    `options` are further config keys (e.g. `device="cuda"`, `cleanfid_mode`)."""
    cfg = dict(config or {})
    cfg.update(options)
    if weights_path is not None:
        if name not in WEIGHTS_KEY:
            raise KeyError(f"unknown feature extractor {name!r}; available: {sorted(EXTRACTORS)}")
        cfg[WEIGHTS_KEY[name]] = str(weights_path)
    return get_extractor(name, cfg)

