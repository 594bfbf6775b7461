"""The tiny open_clip model of the embedded text-to-image benchmark (`eval.tiny_clip`): it loads
through ClipScorer's exact call path, training is deterministic, and a short training on a small
stand-in of the digits-text set already ranks matching captions above shuffled ones."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from eval.clip_score import ClipScorer
from eval.tiny_clip import (
    DIGIT_WORDS,
    NAME,
    clip_checks,
    encode_text_prefix,
    model_config,
    scorer_config,
    swap_digit,
    train_tiny_clip,
)

SMALL = {"embed_dim": 32, "vision_width": 32, "vision_layers": 1, "text_width": 32, "text_layers": 1}


def standin_digits(per_class: int = 16, classes=(0, 1, 7)):
    """A small stand-in of `eval.digits_text`: sklearn digits of `classes`, nearest-neighbour
    upsampled 8 -> 32, grey copied to RGB; captions naming the class word (one also the numeral).
    -> (uint8 [N,32,32,3], N lists of 3 captions, int64 labels [N])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == c)[:per_class] for c in classes])
    u8 = (d.images[idx] * (255 / 16)).round().astype(np.uint8).repeat(4, 1).repeat(4, 2)
    labels = d.target[idx].astype(np.int64)
    caps = [[f"a {DIGIT_WORDS[y]}", f"a handwritten {DIGIT_WORDS[y]}", f"the digit {DIGIT_WORDS[y]} ({y})"]
            for y in labels]
    return np.repeat(u8[..., None], 3, -1), caps, labels


@pytest.fixture(scope="module")
def data():
    return standin_digits()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The default tiny CLIP trained 60 steps on the stand-in (no hold-out; ~3 s), with its record."""
    images, caps, labels = data
    out = tmp_path_factory.mktemp("tinyclip")
    info = train_tiny_clip(images, caps, out, steps=60, batch_size=24, lr=2e-3, seed=0, progress=False,
                           holdout=0.0, labels=labels, warmup_steps=5, name="TinyCLIP-test")
    return out, info


def test_model_config_is_open_clip_format():
    cfg = model_config()
    assert set(cfg) == {"embed_dim", "vision_cfg", "text_cfg"}
    assert cfg["text_cfg"]["context_length"] == 77 and cfg["text_cfg"]["vocab_size"] == 49408
    assert cfg["vision_cfg"]["image_size"] == 32
    with pytest.raises(ValueError, match="head_width"):
        model_config(vision_width=48)
    with pytest.raises(ValueError, match="patch_size"):
        model_config(patch_size=5)


def test_loads_through_clip_scorer(trained, data):
    """The files load through ClipScorer's own call (add_model_config + create_model_and_transforms
    with pretrained=<file> + get_tokenizer), with the exact trained weights."""
    from safetensors.torch import load_file

    out, info = trained
    cfg = info["clip_config"]
    assert cfg == scorer_config(out, "TinyCLIP-test")
    assert (out / "TinyCLIP-test.json").is_file() and (out / "TinyCLIP-test.train.json").is_file()
    s = ClipScorer(cfg)
    saved = load_file(cfg["clip_checkpoint"])
    assert all(torch.equal(v, saved[k]) for k, v in s.model.state_dict().items())
    assert s.provenance["clip_model"] == "TinyCLIP-test" and s.prefix == "A photo depicts "
    cos = s.cosines(data[0][:4], [c[0] for c in data[1][:4]])
    assert cos.shape == (4,) and np.all(np.abs(cos) <= 1)


def test_matching_beats_shuffled_after_short_training(trained):
    checks = trained[1]["checks"]
    assert checks["on"] == "train" and checks["n"] == 48
    assert checks["matched"] > checks["shuffled"] + 0.1, checks
    assert checks["wrong_digit_share"] > 0.7, checks
    assert trained[1]["loss_last100"] < trained[1]["loss_first"]


def test_checks_on_heldout_images(data, tmp_path):
    images, caps, labels = data
    info = train_tiny_clip(images, caps, tmp_path, steps=2, batch_size=8, seed=0, progress=False, arch=SMALL,
                           holdout=0.25, labels=labels, name="TinyCLIP-test")
    assert info["n_train"] == 36 and info["n_heldout"] == 12 and info["checks"]["n"] == 12
    assert info["checks"]["on"] == "heldout"
    direct = clip_checks(info["clip_config"], images[:5], caps[:5], labels[:5])
    assert set(direct) == {"n", "matched", "shuffled", "wrong_digit", "wrong_digit_share", "zeroshot_acc"}


def test_same_seed_byte_identical(data, tmp_path):
    images, caps, _ = data
    runs = [train_tiny_clip(images, caps, tmp_path / f"r{i}", steps=3, batch_size=8, seed=s, progress=False,
                            arch=SMALL, name="TinyCLIP-test") for i, s in enumerate((1, 1, 2))]
    files = [(tmp_path / f"r{i}" / "TinyCLIP-test.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] and files[0] != files[2]
    assert runs[0]["sha256"] == runs[1]["sha256"]
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writers left no temporary files


def test_encode_text_prefix_equals_encode_text(trained):
    """Training skips the padding after the end-of-text token; the causal text transformer makes
    that exact (up to float rounding) against open_clip's own encode_text on all 77 positions."""
    s = ClipScorer(trained[1]["clip_config"])
    tok = s.tokens(["a seven", "the digit one (1), thick strokes, slanted to the right"])
    with torch.no_grad():
        ref = s.model.encode_text(tok, normalize=True)
        ours = encode_text_prefix(s.model, tok)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_swap_digit():
    assert swap_digit("a thick seven leaning right", 7, 3) == "a thick three leaning right"
    assert swap_digit("the digit seven (7), upright", 7, 1) == "the digit one (1), upright"
    assert swap_digit("Seven", 7, 8) == "Eight"
    with pytest.raises(ValueError, match="does not name the digit 4"):
        swap_digit("a handwritten five", 4, 2)
    with pytest.raises(ValueError, match="does not name the digit 7"):  # whole words only
        swap_digit("a sevenfold 17", 7, 2)


def test_input_errors(data, tmp_path):
    images, caps, labels = data
    with pytest.raises(ValueError, match="caption lists"):
        train_tiny_clip(images[:3], caps[:2], tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one caption"):
        train_tiny_clip(images[:2], [["a one"], []], tmp_path, steps=1, progress=False, holdout=0.0, arch=SMALL)
    assert NAME == "TinyCLIP-digits"
