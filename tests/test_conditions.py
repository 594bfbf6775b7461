"""Conditions as a type: class lists and prompt tables, sample i -> condition i % len."""
import numpy as np
import pytest

from eval.conditions import ClassConditions, PromptTable, load_prompt_table
from eval.errors import UserError


def test_class_conditions():
    c = ClassConditions(10)
    assert len(c) == 10 and c.sha256 is None
    assert list(c.for_samples(np.arange(23))) == [i % 10 for i in range(23)]
    assert c.for_samples(np.arange(3)).dtype == np.int64
    assert list(ClassConditions(0).for_samples(np.arange(4))) == [0, 0, 0, 0]  # unconditional: one id


def test_prompt_table_formats_round_trip_and_hash(tmp_path):
    rows = dict(ids=(10, 11, 42), texts=("a cat on a mat", "two dogs, running", "an \"old\" car"),
                image_ids=(("9",), (), ("7", "8")))
    t = PromptTable(**rows, source="mem")
    t.save_jsonl(tmp_path / "p.jsonl")
    back = load_prompt_table(tmp_path / "p.jsonl")
    assert back.ids == t.ids and back.texts == t.texts and back.image_ids == t.image_ids
    assert back.sha256 == t.sha256 and len(t.sha256) == 64
    (tmp_path / "p.csv").write_text('id,text,image_ids\n10,a cat on a mat,9\n11,"two dogs, running",\n'
                                    '42,"an ""old"" car",7;8\n')
    assert load_prompt_table(tmp_path / "p.csv").sha256 == t.sha256
    assert list(t.for_samples(np.arange(5))) == [10, 11, 42, 10, 11]
    assert t.captions([42, 10]) == ['an "old" car', "a cat on a mat"]
    with pytest.raises(UserError, match="prompt id 5"):
        t.captions([5])
    # any change of a caption, an id or the order changes the hash
    assert PromptTable(ids=(10, 11, 42), texts=("a cat on a mat", "two dogs, running", "an old car")).sha256 != t.sha256
    assert PromptTable(ids=(11, 10, 42), texts=t.texts).sha256 != PromptTable(ids=(10, 11, 42), texts=t.texts).sha256


def test_txt_is_one_caption_per_line(tmp_path):
    (tmp_path / "p.txt").write_text("first caption\nsecond caption\n\n")
    t = load_prompt_table(tmp_path / "p.txt")
    assert t.ids == (0, 1) and t.texts == ("first caption", "second caption") and t.image_ids == ()


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"id": 1, "text": "a"}\n{"text": "no id"}\n', r"bad.jsonl:2"),
    ("bad.csv", "id,caption\n1,a\n", r"needs the columns 'id' and 'text'"),
    ("bad2.csv", "id,text\nx,a\n", r"bad2.csv:2: id 'x' is not an integer"),
    ("dup.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "duplicate prompt ids"),
    ("empty.txt", "\n", "is empty"),
    ("p.tsv", "1\ta\n", "unknown prompt table format"),
])
def test_bad_prompt_tables_are_named(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_prompt_table(tmp_path / name)


def test_missing_prompt_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_table(tmp_path / "nope.jsonl")
