"""CLIP score with DMD2's protocol (the one of Table 2), through open_clip, fully offline.

* Model: open_clip `clip_model` (paper: `ViT-g-14`, weights `laion2b_s12b_b42k`) loaded from a
  local checkpoint file `clip_checkpoint` via `create_model_and_transforms(name, pretrained=<file>)`
  (never a hub tag: offline a tag retries for ~47 s and fails). A custom architecture can be added
  with `clip_model_config` (a JSON file in open_clip's model-config format; its stem is the name).
* Images: uint8 HWC -> center crop of the long edge to a square (torchvision `center_crop` to
  `min(w, h)`, as DMD2's `CenterCropLongEdge`) -> PIL LANCZOS resize to `clip_resize` (256) ->
  the model's own eval preprocessing (resize/crop to its input size, normalise).
* Text: "A photo depicts " + caption, tokenised with the model's tokenizer and truncated to the
  context length with EOT last. DMD2 splices the three prefix tokens after SOT of the already
  tokenised caption and re-truncates; CLIP's BPE works word by word, so that is the same token
  sequence as tokenising the concatenated string.
* Score: the mean raw cosine similarity between image and text embeddings (no x100, no 2.5*max(.,0)).

The tokenizer is checked before use (vocabulary > 1000 entries, two different captions give
different tokens, ids inside the model's embedding table), because broken offline tokenizers fail
silently (see the project notes on transformers' CLIPTokenizer).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from eval.errors import BadFile, UserError
from eval.io import check_sidecar, file_sha256, load_safetensors, read_safetensors_metadata

SUITE_CLIP_FORMAT = "tfd-tiny-clip-v1"  # metadata format of the tiny CLIP of `tfd train-clip` (eval.tiny_clip)
DEFAULTS = dict(clip_model="ViT-g-14", clip_resize=256, clip_prefix="A photo depicts ")
PAPER_TAG = "laion2b_s12b_b42k"
PAPER_SOURCE = ("open_clip `ViT-g-14` / `laion2b_s12b_b42k` weights: Hugging Face repo "
                "laion/CLIP-ViT-g-14-laion2B-s12B-b42K, file `open_clip_pytorch_model.bin` (or "
                "`open_clip_model.safetensors`); download it on a machine with internet access")


def check_tokenizer(tokenizer, model=None) -> int:
    """Raise RuntimeError if the tokenizer is broken; returns its vocabulary size."""
    vs = getattr(tokenizer, "vocab_size", None)
    inner = getattr(tokenizer, "tokenizer", None)
    if vs is None and inner is not None:
        vs = getattr(inner, "vocab_size", None) or (len(inner) if hasattr(inner, "__len__") else None)
    if vs is None or vs <= 1000:
        raise UserError(f"CLIP tokenizer looks broken: vocabulary size {vs} (expected tens of thousands)")
    a, b = tokenizer(["a red square", "a photo of a dog on a beach"])
    if torch.equal(a, b):
        raise UserError("CLIP tokenizer looks broken: two different captions give identical tokens")
    if model is not None:
        emb = getattr(model, "token_embedding", None)
        n_emb = emb.num_embeddings if emb is not None else getattr(model, "vocab_size", None)
        if n_emb is not None and int(torch.stack([a, b]).max()) >= n_emb:
            raise UserError(f"CLIP tokenizer produces ids >= the model's embedding table ({n_emb})")
    return int(vs)


def crop_resize(img_u8_hwc: np.ndarray, size: int):
    """DMD2's `resize_and_center_crop`: center-crop the long edge, PIL LANCZOS to size x size."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    a = np.asarray(img_u8_hwc)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    pil = Image.fromarray(a).convert("RGB")
    pil = TF.center_crop(pil, min(pil.size))
    return pil.resize((size, size), Image.LANCZOS)


class ClipScorer:
    """CLIP score of uint8 NHWC images against captions (see the module docstring).

    `config`: the `clip_*` keys (`clip_checkpoint` required: FileNotFoundError naming the key when
    unset or missing). `device`: where the CLIP model runs; images and tokens are moved there batch
    by batch, cosines come back as CPU float64."""

    def __init__(self, config: Mapping, device: str | torch.device = "cpu"):
        import open_clip

        cfg = {**DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        ckpt = cfg.get("clip_checkpoint")
        if not ckpt:
            source = (PAPER_SOURCE if cfg["clip_model"] == DEFAULTS["clip_model"] else
                      f"weights of {cfg['clip_model']!r} (on an embedded benchmark: made by `tfd train-clip`)")
            raise FileNotFoundError(f"config key `clip_checkpoint` is not set: it must be a local file with the "
                                    f"{source}")
        ckpt = Path(ckpt).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"config key `clip_checkpoint` = {str(ckpt)!r}: file not found. It must be the "
                                    f"{PAPER_SOURCE}")
        if cfg.get("clip_model_config"):
            mc = Path(cfg["clip_model_config"])
            if not mc.is_file():
                raise FileNotFoundError(f"config key `clip_model_config` = {str(mc)!r}: file not found")
            check_sidecar(mc, "CLIP model config")  # tfd train-clip's: as written
            try:
                json.loads(mc.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadFile(mc, "CLIP model config is not readable JSON (truncated or damaged)", found=e) from None
            open_clip.add_model_config(mc)
        name = cfg["clip_model"]
        if name not in open_clip.list_models():
            raise FileNotFoundError(f"config key `clip_model` = {name!r} is not an open_clip built-in architecture: "
                                    "set `clip_model_config` to its model-config JSON (for an embedded benchmark, "
                                    f"the {name}.json written beside the checkpoint by `tfd train-clip`)")
        if ckpt.suffix == ".safetensors":
            meta = read_safetensors_metadata(ckpt)
            if "tensors_sha256" in meta:  # a file of the suite: the tiny CLIP of `tfd train-clip`, as written
                if meta.get("format") != SUITE_CLIP_FORMAT:
                    raise BadFile(ckpt, "not a CLIP checkpoint", key="format", expected=SUITE_CLIP_FORMAT,
                                  found=meta.get("format"))
                load_safetensors(ckpt, "CLIP checkpoint")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=str(ckpt),
                                                                                   device=device)
        except RuntimeError as e:  # another network's weights (a file of another model or tool)
            if "state_dict" not in str(e):
                raise
            first = str(e).strip().splitlines()[0]
            raise BadFile(ckpt, f"CLIP weights do not fit the model {name!r}", found=first[:200]) from None
        self.model.eval().float()
        self.tokenizer = open_clip.get_tokenizer(name)
        vocab = check_tokenizer(self.tokenizer, self.model)
        self.device = device
        self.resize = int(cfg["clip_resize"])
        self.prefix = str(cfg["clip_prefix"])
        self.provenance = {
            "metric": "clip_score",
            "clip_model": name,
            "checkpoint": str(ckpt),
            "sha256": file_sha256(ckpt),
            "paper_setting": f"ViT-g-14 / {PAPER_TAG}",
            "is_paper_setting": name == DEFAULTS["clip_model"],
            "image_preprocessing": f"center-crop long edge, PIL LANCZOS to {self.resize}, then open_clip eval "
                                   f"transform ({self.preprocess})",
            "text": f"prefix {self.prefix!r}, tokenizer {type(self.tokenizer).__name__} (vocab {vocab})",
            "score": "mean raw cosine similarity",
        }

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer([self.prefix + c for c in captions])

    def image_tensor(self, images_u8_nhwc: np.ndarray) -> torch.Tensor:
        return torch.stack([self.preprocess(crop_resize(im, self.resize)) for im in images_u8_nhwc])

    @torch.no_grad()
    def cosines(self, images_u8_nhwc: np.ndarray, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if len(images_u8_nhwc) != len(captions):
            raise UserError(f"{len(images_u8_nhwc)} images but {len(captions)} captions")
        out = []
        for i in range(0, len(captions), batch_size):
            img = self.image_tensor(images_u8_nhwc[i:i + batch_size]).to(self.device)
            txt = self.tokens(captions[i:i + batch_size]).to(self.device)
            ie = self.model.encode_image(img).float()
            te = self.model.encode_text(txt).float()
            out.append(torch.nn.functional.cosine_similarity(ie, te, dim=1).cpu())
        return torch.cat(out).to(torch.float64).numpy() if out else np.zeros(0)

    def score(self, images_u8_nhwc: np.ndarray, captions: Sequence[str], batch_size: int = 32) -> float:
        return float(self.cosines(images_u8_nhwc, captions, batch_size).mean())


def clip_score(images_u8_nhwc: np.ndarray, captions: Sequence[str], config: Mapping,
               batch_size: int = 32, device: str | torch.device = "cpu") -> tuple[float, np.ndarray, dict]:
    """-> (mean cosine, per-sample cosines float64 [N], provenance), the model on `device`."""
    s = ClipScorer(config, device=device)
    c = s.cosines(images_u8_nhwc, captions, batch_size)
    return float(c.mean()), c, s.provenance
