"""CLIP score (DMD2 protocol) with a tiny open_clip model built and trained offline."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import torch

from eval.clip_score import ClipScorer, check_tokenizer, clip_score, crop_resize
from eval.errors import UserError

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    cfg_path = d / "tfd-tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tfd-tiny-clip", pretrained=None)
    ckpt = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return {"clip_model": "tfd-tiny-clip", "clip_checkpoint": str(ckpt), "clip_model_config": str(cfg_path)}


def _square(rgb, h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = rgb
    return img


def test_missing_checkpoint_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match=r"clip_checkpoint.*laion2b_s12b_b42k"):
        ClipScorer({"clip_model": "ViT-g-14"})
    with pytest.raises(FileNotFoundError, match=r"clip_checkpoint.*nope\.safetensors.*CLIP-ViT-g-14"):
        ClipScorer({**tiny, "clip_checkpoint": str(tmp_path / "nope.safetensors")})


def test_tokenizer_checks(tiny):
    import open_clip

    tok = open_clip.get_tokenizer("tfd-tiny-clip")
    assert check_tokenizer(tok) > 1000

    class TwoWords:  # the failure mode of an offline transformers tokenizer: a 2-word vocabulary
        vocab_size = 2

        def __call__(self, texts):
            return torch.zeros(len(texts), 77, dtype=torch.long)

    with pytest.raises(UserError, match="vocabulary size 2"):
        check_tokenizer(TwoWords())

    class Constant(TwoWords):
        vocab_size = 49408

    with pytest.raises(UserError, match="identical tokens"):
        check_tokenizer(Constant())


def test_preprocessing_and_end_to_end(tiny):
    s = ClipScorer(tiny)
    # center crop of the long edge, LANCZOS to 256
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 30:70] = 255  # the central 40x40 square after cropping
    pil = crop_resize(img, 256)
    assert pil.size == (256, 256) and np.asarray(pil).min() == 255
    # grayscale NHWC with one channel works too
    assert crop_resize(np.zeros((8, 8, 1), np.uint8), 256).mode == "RGB"
    # the prefix is in the tokens: "A photo depicts a cat" == tokens of the concatenation
    t = s.tokens(["a cat"])
    assert torch.equal(t, s.tokenizer(["A photo depicts a cat"]))
    assert not torch.equal(t, s.tokenizer(["a cat"]))
    imgs = np.stack([_square((255, 0, 0)), _square((0, 0, 255)), _square((0, 255, 0))])
    caps = ["a red square", "a blue square", "a green square"]
    mean, per, prov = clip_score(imgs, caps, tiny, batch_size=2)
    assert per.shape == (3,) and np.all(np.abs(per) <= 1) and mean == pytest.approx(per.mean())
    assert prov["clip_model"] == "tfd-tiny-clip" and len(prov["sha256"]) == 64
    # raw cosine, checked by hand for one pair
    with torch.no_grad():
        ie = s.model.encode_image(s.image_tensor(imgs[:1]))
        te = s.model.encode_text(s.tokens(caps[:1]))
    assert per[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(ie, te).item()), abs=1e-6)


def test_trained_tiny_clip_prefers_matching_caption(tiny, tmp_path):
    """Train the tiny CLIP a few dozen steps so red/blue/green squares match their captions, save
    it, reload it through the config path, and check the matched caption scores higher."""
    from safetensors.torch import save_file

    s = ClipScorer(tiny)
    colours = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20)}
    imgs = np.stack([_square(c) for c in colours.values()])
    caps = [f"a {n} square" for n in colours]
    x = s.image_tensor(imgs)
    tok = s.tokens(caps)
    model = s.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        ie = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        te = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)
        logits = 10.0 * ie @ te.T
        target = torch.arange(len(caps))
        ce = torch.nn.functional.cross_entropy
        loss = (ce(logits, target) + ce(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trained = tmp_path / "trained.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(trained))
    s2 = ClipScorer({**tiny, "clip_checkpoint": str(trained)})
    red, blue = imgs[:1], imgs[1:2]
    m_red, mm_red = s2.score(red, ["a red square"]), s2.score(red, ["a blue square"])
    m_blue, mm_blue = s2.score(blue, ["a blue square"]), s2.score(blue, ["a red square"])
    assert m_red > mm_red and m_blue > mm_blue, (m_red, mm_red, m_blue, mm_blue)
    # a red square of another size and aspect (crop + LANCZOS path) still prefers its caption
    other = _square(colours["red"], h=100, w=70)[None]
    assert s2.score(other, ["a red square"]) > s2.score(other, ["a blue square"])
    print(f"\nred: matched {m_red:.3f} vs mismatched {mm_red:.3f}; blue: {m_blue:.3f} vs {mm_blue:.3f}")
