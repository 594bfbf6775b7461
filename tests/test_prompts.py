"""Prompt tables of the text-to-image track: COCO subsets through pycocotools (eval/coco.py), DMD2's
caption lists, DMD2's crop/resize protocol, the embedded digits-text set (eval/digits_text.py) and
the digits extractor on its 32x32 images."""
import hashlib
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from eval.coco import build_coco_prompts, crop_resize_batch, load_image_folder, load_real_images
from eval.conditions import PromptTable, load_prompt_table
from eval.digits_text import CLASS_WORDS, digits_text_arrays, measure_attributes, write_digits_coco

# ----------------------------------------------------------------------------------------------
# a tiny hand-written COCO captions file

# image id -> captions (annotation ids are assigned below); image 4 has no caption
CAPTIONS = {3: ["  a red bus on a street\n", "a bus"], 1: ["two cats on a sofa"], 10: ["a kite", "a kite in the sky",
            " a blue kite \n"], 7: ["a plate of food"], 5: ["a man riding a horse", "a horse"], 2: ["a train"],
            4: []}


def write_tiny_coco(root):
    """captions.json (images listed unsorted, captions with stray whitespace) + one PNG per image."""
    images, anns, next_id = [], [], 900
    for image_id, caps in CAPTIONS.items():
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg", "width": 6, "height": 4})
        for c in caps:
            anns.append({"id": next_id, "image_id": image_id, "caption": c})
            next_id -= 7
    path = root / "captions.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    (root / "val").mkdir()
    for rec in images:
        Image.fromarray(np.full((4, 6, 3), rec["id"] * 20, np.uint8)).save(root / "val" / rec["file_name"], "PNG")
    return path, {a["id"]: a for a in anns}


def reference_choice(path, n, seed):
    """The documented rule, written out: rng.choice of the sorted captioned image ids, then per image
    (in id order) rng.integers over its caption annotations sorted by id -> [(image id, caption id)]."""
    ids = sorted(i for i, c in CAPTIONS.items() if c)
    rng = np.random.default_rng(seed)
    chosen = sorted(ids[k] for k in rng.choice(len(ids), size=n, replace=False))
    data = json.loads(path.read_text())
    rows = []
    for image_id in chosen:
        anns = sorted(a["id"] for a in data["annotations"] if a["image_id"] == image_id)
        rows.append((image_id, anns[int(rng.integers(len(anns)))]))
    return rows


@pytest.fixture
def tiny_coco(tmp_path):
    path, anns = write_tiny_coco(tmp_path)
    return path, anns, tmp_path / "val"


def test_coco_subset_is_seeded_one_caption_per_image(tiny_coco, capsys):
    path, anns, val = tiny_coco
    t = build_coco_prompts(path, 4, seed=0, images_dir=val)
    assert capsys.readouterr().out == ""  # pycocotools' prints go to the log
    assert len(t) == 4 and len(set(t.image_ids)) == 4
    image_ids = [int(i[0]) for i in t.image_ids]
    assert image_ids == sorted(image_ids) and 4 not in image_ids  # sorted rows; the caption-less image never chosen
    assert [(int(i[0]), pid) for i, pid in zip(t.image_ids, t.ids)] == reference_choice(path, 4, 0)
    for pid, text, (iid,), (fname,) in zip(t.ids, t.texts, t.image_ids, t.file_names):
        assert anns[pid]["image_id"] == int(iid) and text == anns[pid]["caption"].strip()
        assert fname == f"COCO_val2014_{int(iid):012d}.jpg"
    assert build_coco_prompts(path, 4, seed=0) == t  # deterministic
    subsets = {tuple(build_coco_prompts(path, 4, seed=s).ids) for s in range(6)}
    assert len(subsets) > 1  # the seed changes the subset
    for s in range(6):
        u = build_coco_prompts(path, 3, seed=s)
        assert [(int(i[0]), pid) for i, pid in zip(u.image_ids, u.ids)] == reference_choice(path, 3, s)


def test_coco_subset_errors(tiny_coco):
    path, _, val = tiny_coco
    assert len(build_coco_prompts(path, 6)) == 6  # 6 captioned images of 7
    with pytest.raises(ValueError, match=r"captions\.json: num_prompts must be in 1\.\.6"):
        build_coco_prompts(path, 7)
    with pytest.raises(ValueError, match="num_prompts"):
        build_coco_prompts(path, 0)
    for i in (1, 2):
        (val / f"COCO_val2014_{i:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 6 image files are missing under .*val: "
                                                r"COCO_val2014_000000000001\.jpg, COCO_val2014_000000000002\.jpg$"):
        build_coco_prompts(path, 6, images_dir=val)
    for i in (3, 5, 7, 10):
        (val / f"COCO_val2014_{i:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"6 of 6 image files are missing.*, \.\.\.$"):
        build_coco_prompts(path, 6, images_dir=val)
    (path.parent / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a COCO annotation file"):
        build_coco_prompts(path.parent / "bad.json", 1)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        build_coco_prompts(path.parent / "nope.json", 1)


def test_coco_prompt_file_is_byte_identical_and_round_trips(tiny_coco, tmp_path):
    path, _, _ = tiny_coco
    build_coco_prompts(path, 5, seed=3).save_jsonl(tmp_path / "a.jsonl")
    build_coco_prompts(path, 5, seed=3).save_jsonl(tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    back = load_prompt_table(tmp_path / "a.jsonl")
    t = build_coco_prompts(path, 5, seed=3)
    assert (back.ids, back.texts, back.image_ids, back.file_names) == (t.ids, t.texts, t.image_ids, t.file_names)
    assert back.sha256 == t.sha256
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


# ----------------------------------------------------------------------------------------------
# DMD2 caption lists and the table hash


def test_dmd2_pickle_and_txt_keep_order(tmp_path):
    caps = ["a zebra", "  an apple \n", "a cat", "a zebra again"]
    (tmp_path / "all_prompts.pkl").write_bytes(pickle.dumps(caps))
    t = load_prompt_table(tmp_path / "all_prompts.pkl")
    assert t.texts == tuple(caps) and t.ids == (0, 1, 2, 3) and t.image_ids == () and t.file_names == ()
    (tmp_path / "tuple.pkl").write_bytes(pickle.dumps(tuple(caps), protocol=2))
    assert load_prompt_table(tmp_path / "tuple.pkl").texts == tuple(caps)
    (tmp_path / "c.txt").write_text("b second\na first\n")
    assert load_prompt_table(tmp_path / "c.txt").texts == ("b second", "a first")


class Evil:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize("obj,match", [
    ({"a": "b"}, r"bad\.pkl: expected a pickled list of caption strings .*got a dict"),
    (["a", 3, "c"], r"bad\.pkl: element 1 of the caption list is a int, not a str"),
    (np.array(["a", "b"]), r"bad\.pkl: not a pickled list of caption strings .*refusing to load the global"),
    ([Evil()], r"bad\.pkl: not a pickled list .*builtins\.print"),
])
def test_dmd2_pickle_refuses_anything_but_strings(tmp_path, capsys, obj, match):
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match=match):
        load_prompt_table(tmp_path / "bad.pkl")
    assert capsys.readouterr().out == ""  # nothing in the file ran


def test_truncated_pickle_is_named(tmp_path):
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(["a", "b"])[:-3])
    with pytest.raises(ValueError, match=r"cut\.pkl: not a pickled list"):
        load_prompt_table(tmp_path / "cut.pkl")


def test_sha256_without_file_names_is_unchanged(tmp_path):
    ids, texts, images = (10, 11), ("a cat", "two dogs"), (("9",), ())
    t = PromptTable(ids, texts, images)
    rows = [[10, "a cat", ["9"]], [11, "two dogs", []]]  # the hash as it was defined before file names
    assert t.sha256 == hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    t.save_jsonl(tmp_path / "t.jsonl")
    assert "file_names" not in (tmp_path / "t.jsonl").read_text()
    f = PromptTable(ids, texts, images, file_names=(("x.jpg",), ()))
    assert f.sha256 != t.sha256
    f.save_jsonl(tmp_path / "f.jsonl")
    assert load_prompt_table(tmp_path / "f.jsonl").sha256 == f.sha256
    (tmp_path / "f.csv").write_text("id,text,image_ids,file_names\n10,a cat,9,x.jpg\n11,two dogs,,\n")
    assert load_prompt_table(tmp_path / "f.csv").sha256 == f.sha256
    with pytest.raises(ValueError, match="file_names has 1 rows, expected 2"):
        PromptTable(ids, texts, file_names=(("x.jpg",),))
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "a", "file_names": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'file_names' must be a list"):
        load_prompt_table(tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------------------------
# DMD2's crop + LANCZOS


def pil_crop_lanczos(a, size):
    """Independent reference: PIL crop of the centred square (even margins), LANCZOS to size."""
    h, w = a.shape[:2]
    s = min(h, w)
    left, top = (w - s) // 2, (h - s) // 2
    im = Image.fromarray(a).convert("RGB").crop((left, top, left + s, top + s))
    return np.asarray(im.resize((size, size), Image.LANCZOS))


@pytest.mark.parametrize("shape", [(2, 40, 64, 3), (2, 64, 40, 3), (1, 30, 50, 1)])
def test_crop_resize_batch_matches_pil(shape):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = crop_resize_batch(a, 24)
    assert out.shape == (shape[0], 24, 24, 3) and out.dtype == np.uint8
    for img, o in zip(a, out):
        assert np.array_equal(o, pil_crop_lanczos(img[..., 0] if img.shape[2] == 1 else img, 24))
    with pytest.raises(TypeError, match="uint8"):
        crop_resize_batch(a.astype(np.float32), 24)


def test_load_real_images_uses_the_same_transform(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    for i, img in enumerate(a):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    t = PromptTable((5, 6), ("x", "y"), (("1",), ("2",)), file_names=(("0.png",), ("1.png",)))
    real = load_real_images(t, tmp_path, 16)
    assert real.dtype == np.uint8 and np.array_equal(real, crop_resize_batch(a, 16))
    (tmp_path / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        load_real_images(t, tmp_path, 16)
    with pytest.raises(ValueError, match="no image file names"):
        load_real_images(PromptTable((5,), ("x",)), tmp_path, 16)
    Image.fromarray(a[1]).save(tmp_path / "1.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert np.array_equal(load_image_folder(tmp_path, 16), crop_resize_batch(a, 16))  # sorted: 0.png, 1.PNG
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path / "nope", 16)


# ----------------------------------------------------------------------------------------------
# the embedded digits-text set


@pytest.fixture(scope="module")
def digits_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_text")
    info = write_digits_coco(root / "a")
    return root, info


def tree_bytes(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_write_digits_coco_is_deterministic_and_atomic(digits_coco):
    root, info = digits_coco
    a = root / "a"
    assert info["paths"]["captions"] == str(a / "captions.json")
    first = tree_bytes(a)
    assert len(first) == 1797 + 2  # the images, captions.json and the folder's checksum manifest
    write_digits_coco(root / "b")
    assert tree_bytes(root / "b") == first
    write_digits_coco(a)  # replacing a previous output
    assert tree_bytes(a) == first
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # no temporary folders left
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a digits-text folder"):
        write_digits_coco(root / "c")


def test_digits_captions_name_their_class_and_vary(digits_coco):
    root, info = digits_coco
    images, captions, labels = digits_text_arrays(root / "a")
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images[..., 0], images[..., 2])  # gray as RGB
    from sklearn.datasets import load_digits

    assert np.array_equal(labels, load_digits().target)
    for caps, y in zip(captions, labels):
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        assert all(re.search(rf"\b{CLASS_WORDS[y]}\b", c) for c in caps)
        others = [w for w in CLASS_WORDS if w != CLASS_WORDS[y]]
        assert not any(re.search(rf"\b{w}\b", c) for c in caps for w in others)
    c = info["counts"]
    assert c["images"] == 1797 and c["captions"] == sum(map(len, captions))
    for key in ("weight", "slant", "size"):
        assert sum(c[key].values()) == 1797 and min(c[key].values()) > 150  # every value is used
    t = build_coco_prompts(info["paths"]["captions"], 50, seed=0, images_dir=info["paths"]["images"])
    assert len(t) == 50
    for text, (iid,), (fname,) in zip(t.texts, t.image_ids, t.file_names):  # image id = sklearn index + 1
        assert text in captions[int(iid) - 1] and fname == f"digit_{int(iid) - 1:04d}.png"


def test_slant_and_weight_measure_what_they_say():
    """A stroke from the top right to the bottom left leans right; more ink is thicker."""
    img = np.zeros((3, 8, 8))
    for r in range(8):
        img[0, r, 7 - r] = 16  # '/': leaning right
        img[1, r, r] = 16  # '\': leaning left
        img[2, r, 3:5] = 16  # '|': upright, twice the ink
    offsets = measure_attributes(img, np.zeros(3, int))["slant_offset"]
    assert offsets[0] < 0 < offsets[1]  # relative to the class median (the upright one)
    a = measure_attributes(img, np.zeros(3, int))
    assert a["weight"][2] == "thick" and a["slant"][0] == "leaning right" and a["slant"][1] == "leaning left"


# ----------------------------------------------------------------------------------------------
# the digits extractor on 32x32 inputs


@pytest.fixture
def digits_net(tmp_path):
    """An untrained (seeded) digits network file in the format of eval.digits_net."""
    from safetensors.torch import save_file

    from eval.digits_net import FORMAT, DigitsNet

    torch.manual_seed(0)
    net = DigitsNet()
    path = tmp_path / "digits_net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"format": FORMAT, "arch": json.dumps(net.arch), "test_acc": "0.5"})
    return path


def test_digits_extractor_area_averages_larger_inputs(digits_net):
    from eval.features import DigitsExtractor, build_extractor

    u8 = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    small = DigitsExtractor(digits_net)
    assert small.provenance["resolution"] == "8x8"
    assert small.provenance["preprocessing"] == ("uint8 grayscale (RGB must have equal channels; channel 0 used) "
                                                 "-> u8/127.5-1 float32")
    big = build_extractor("digits", weights_path=digits_net, digits_input_size=32)
    assert big.provenance["resolution"] == "32x32 -> 8x8" and "4x4 pixel blocks" in big.provenance["preprocessing"]
    up = u8.repeat(4, axis=1).repeat(4, axis=2)  # exact 4x nearest upsampling
    assert np.array_equal(big.features(up), small.features(u8))
    assert np.array_equal(big.features(np.repeat(up, 3, axis=3)), small.features(u8))  # gray as RGB
    assert np.array_equal(big.logits(up), small.logits(u8))
    rgb = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # channels differ: their mean
    mean = np.floor(rgb.reshape(6, 8, 4, 8, 4, 3).mean(axis=(2, 4, 5)) + 0.5).astype(np.uint8)[..., None]
    assert np.array_equal(big.features(rgb), small.features(mean))
    with pytest.raises(ValueError, match="got 8x8"):
        big.features(u8)
    with pytest.raises(ValueError, match="got 20x20.*multiple of 8"):
        small.features(np.zeros((1, 20, 20, 1), np.uint8))
    with pytest.raises(ValueError, match="multiple of 8.*got size 20"):
        DigitsExtractor(digits_net, input_size=20)


def test_area_average_rounding():
    from eval.features import digits_input_8x8

    x = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    x[0, 0, :2, :2] = torch.tensor([[1, 1], [1, 0]], dtype=torch.uint8)  # block sum 3 over 12 values: 0.25 -> 0
    x[0, 0, :2, 2:4] = torch.tensor([[3, 3], [0, 0]], dtype=torch.uint8)  # 6/12 = 0.5 -> 1 (half up)
    x[0, :, 2:4, :2] = 255
    out = digits_input_8x8(x, 16)
    assert out.shape == (1, 1, 8, 8) and out.dtype == torch.uint8
    assert (int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1]), int(out[0, 0, 1, 0])) == (0, 1, 255)


def test_digits_text_images_average_back_to_the_digits():
    """The 32x32 bicubic images, area-averaged to 8x8, stay close to `v * 255 / 16`."""
    from sklearn.datasets import load_digits

    from eval.digits_text import upsample_digits
    from eval.features import digits_input_8x8

    x = load_digits().images[:200]
    back = digits_input_8x8(torch.from_numpy(upsample_digits(x, 32)).permute(0, 3, 1, 2), 32)[:, 0].numpy()
    err = np.abs(back.astype(np.float64) - x * 255 / 16)
    assert err.mean() < 15 and err.max() < 80  # measured on all 1797: 11.7, 72
