"""Data sources, splits, tokenized batches and the deterministic batch order."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from camex_runtime.training.batches import (BatchOrder, build_classification_set, build_lm_blocks,
                                            eval_batches)
from camex_runtime.training.data import (ACCEPTED_SHAPES, DataError, ReadOptions, TextExample,
                                         balance_labels, load_examples, read_text_documents,
                                         split_examples)
from camex_runtime.training.readers import split_text
from camex_runtime.training.fortunes import FortunesMissingError, fortune_files
from camex_runtime.training.tokenizer import train_bpe_tokenizer

from .conftest import TOPICS, write_fortune_file


def test_percent_separated_documents_are_split_and_cleaned():
    # "b" and "l" underlined by backspace overstriking, a bell character, a `%` with spaces
    text = "first line\nsecond\n%\n\n%\n_\x08bo_\x08ld text\x07\n%   \nlast\n"
    assert read_text_documents(text) == ["first line\nsecond", "bold text", "last"]


def test_text_directory_labels_from_file_names_and_skips_junk(tmp_path):
    root = tmp_path / "fortunes"
    root.mkdir()
    write_fortune_file(root / "food", ["eat", "drink"])
    write_fortune_file(root / "law.txt", ["judge"])
    (root / "food.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (root / "blob").write_bytes(b"abc\x00def")             # binary without a telling suffix
    (root / ".hidden").write_text("secret")
    os.symlink(root / "food", root / "food.u8")              # same file twice: read once
    examples = load_examples([str(root)], task="classify")
    assert [(e.text, e.label) for e in examples] == [("eat", "food"), ("drink", "food"),
                                                     ("judge", "law")]


def test_jsonl_examples_and_errors(tmp_path, labeled_jsonl):
    examples = load_examples([str(labeled_jsonl)], task="classify")
    assert Counter(e.label for e in examples) == {"fruit": 24, "vehicles": 24}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_examples([str(bad)], task="classify")
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text('{"text": "no label here"}\n')
    assert load_examples([str(unlabeled)], task="lm")[0].text == "no label here"
    with pytest.raises(DataError, match=r"unlabeled.jsonl:1: .*label"):
        load_examples([str(unlabeled)], task="classify")
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"txt": "typo"}\n')
    with pytest.raises(DataError, match='string "text" field .*found: txt.*--text-field'):
        load_examples([str(notext)], task="lm")
    renamed = load_examples([str(notext)], task="lm", opts=ReadOptions(text_field="txt"))
    assert [e.text for e in renamed] == ["typo"]


def test_missing_empty_and_single_label_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples([str(tmp_path / "nope")])
    (tmp_path / "empty").write_text("%\n%\n")
    with pytest.raises(DataError, match="holds no text"):
        load_examples([str(tmp_path / "empty")])
    write_fortune_file(tmp_path / "only", ["a", "b"])
    with pytest.raises(DataError, match="two distinct labels"):
        load_examples([str(tmp_path / "only")], task="classify")
    with pytest.raises(DataError, match="unknown task"):
        load_examples([str(tmp_path / "only")], task="regress")


def test_hf_source_without_datasets_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package"):
        load_examples(["hf:wikitext:wikitext-2-raw-v1@train"])


def test_stratified_split_and_balancing_are_seeded():
    examples = [TextExample(f"a{i}", "a") for i in range(30)] + \
               [TextExample(f"b{i}", "b") for i in range(10)]
    balanced = balance_labels(examples, seed=1)
    assert Counter(e.label for e in balanced) == {"a": 10, "b": 10}
    assert balanced == balance_labels(examples, seed=1) != balance_labels(examples, seed=2)
    train, held = split_examples(balanced, 0.2, seed=0, stratify=True)
    assert Counter(e.label for e in held) == {"a": 2, "b": 2}
    assert not {e.text for e in train} & {e.text for e in held}
    assert len(train) + len(held) == 20
    with pytest.raises(DataError, match="eval_fraction"):
        split_examples(balanced, 1.0, seed=0)


def test_fortune_files_skip_indexes_symlinks_and_offensive(tmp_path):
    write_fortune_file(tmp_path / "food", ["x"])
    write_fortune_file(tmp_path / "law", ["y"])
    (tmp_path / "food.dat").write_bytes(b"\x00")
    os.symlink(tmp_path / "food", tmp_path / "food.u8")
    (tmp_path / "off").mkdir()
    write_fortune_file(tmp_path / "off" / "rude", ["z"])
    assert [p.name for p in fortune_files(tmp_path)] == ["food", "law"]
    assert [p.name for p in fortune_files(tmp_path, ("law",))] == ["law"]
    with pytest.raises(FortunesMissingError, match="sports"):
        fortune_files(tmp_path, ("sports",))
    with pytest.raises(FortunesMissingError, match="apt-get install"):
        fortune_files(tmp_path / "missing")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [d for docs in TOPICS.values() for d in docs]
    return train_bpe_tokenizer(texts * 3, vocab_size=300)


def test_lm_blocks_put_eos_between_documents(tokenizer):
    docs = [TextExample("apples and pears"), TextExample("a fast car")]
    ids = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    blocks = build_lm_blocks(docs, tokenizer, block_size=3)
    assert blocks.blocks.shape == (len(stream) // 3, 3)
    assert blocks.blocks.flatten().tolist() == stream[: len(stream) // 3 * 3]
    batch = blocks.batch([1, 0])
    assert torch.equal(batch["input_ids"], batch["labels"])
    with pytest.raises(DataError, match="not enough for one block"):
        build_lm_blocks(docs, tokenizer, block_size=1000)


def test_classification_batches_are_right_padded_with_mask(tokenizer):
    docs = [TextExample("a fast car and a slow bus", "vehicles"), TextExample("apple", "fruit")]
    ds = build_classification_set(docs, tokenizer, max_length=4, label_names=["fruit", "vehicles"])
    assert len(ds.input_ids[0]) == 4  # truncated
    batch = ds.batch([1, 0])
    n = len(ds.input_ids[0 + 1])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (4 - n)
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1]
    with pytest.raises(DataError, match="do not occur"):
        build_classification_set([TextExample("x", "other")], tokenizer, 4, ["fruit"])


def test_batch_order_is_stateless_disjoint_across_ranks_and_covers_epochs():
    a, b = BatchOrder(10, 3, seed=5, world_size=2), BatchOrder(10, 3, seed=5, world_size=2)
    assert a.indices(7, rank=1) == b.indices(7, rank=1)  # a function of (seed, step, rank) only
    first_epoch = [i for step in range(5) for i in
                   (a.indices(step, 0) + a.indices(step, 1))][:10]
    assert sorted(first_epoch) == list(range(10))
    assert not set(a.indices(0, 0)) & set(a.indices(0, 1))
    assert BatchOrder(10, 3, seed=6).indices(0) != BatchOrder(10, 3, seed=5).indices(0)
    assert eval_batches(10, 4, rank=1, world_size=2) == [[4, 5, 6, 7]]
    assert eval_batches(10, 4, max_batches=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_hf_source_maps_class_label_names(monkeypatch):
    """The `hf:` path against a stand-in `datasets` module (no network in tests)."""
    import sys
    import types

    class ClassLabel:
        names = ["neg", "pos"]

    class FakeDataset(list):
        features = {"text": object(), "label": ClassLabel()}

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset([{"text": "bad film", "label": 0}, {"text": "  ", "label": 1},
                            {"text": "great film", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples(["hf:imdb:plain_text@test"], task="classify")
    assert calls == [("imdb", "plain_text", "test")]
    assert [(e.text, e.label) for e in examples] == [("bad film", "neg"), ("great film", "pos")]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="cannot load hf:imdb: ConnectionError: no network"):
        load_examples(["hf:imdb"])


# -- the data people have: one text file, folders, JSON, CSV/TSV ----------------------------


def test_auto_split_picks_percent_then_paragraphs_then_lines_or_chunks():
    assert split_text("a\n%\nb\n\nc\n%\n", "auto", "lm", 100) == ["a", "b\n\nc"]
    assert split_text("one\ntwo\n\n  \nthree\n", "auto", "lm", 100) == ["one\ntwo", "three"]
    lines = "first example\nsecond example\nthird example\n"
    assert split_text(lines, "auto", "classify", 100) == ["first example", "second example",
                                                          "third example"]
    assert split_text(lines, "auto", "lm", 30) == ["first example\nsecond example",
                                                   "third example"]
    assert split_text(lines, "file", "lm", 30) == [lines.strip()]
    assert split_text("a\n%\nb\n", "line", "lm", 30) == ["a", "%", "b"]  # explicit mode wins


def test_chunks_keep_every_character_and_respect_the_size():
    words = " ".join(f"word{i}" for i in range(400))           # one 3,000-character line
    text = "short line\n" + words + "\n" + "tail line\n" * 50
    chunks = split_text(text, "chunk", "lm", 200)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 10
    assert "".join(chunks).replace("\n", "").replace(" ", "") == \
        text.replace("\n", "").replace(" ", "")               # nothing lost or duplicated
    assert not any(c.startswith("ord") for c in chunks)        # long lines cut at spaces


def test_one_plain_text_file_gives_documents_and_a_held_out_share(tmp_path):
    book = tmp_path / "book.txt"                               # no `%`, no blank lines
    book.write_text("".join(f"Line {i} of a long story about merged experts.\n"
                            for i in range(400)))
    examples = load_examples([str(book)], task="lm", opts=ReadOptions(chunk_chars=500))
    assert len(examples) > 30 and {e.label for e in examples} == {"book"}
    train, held = split_examples(examples, 0.1, seed=0)
    assert len(held) == round(len(examples) * 0.1) and len(train) == len(examples) - len(held)
    whole = load_examples([str(book)], task="lm", opts=ReadOptions(text_split="file"))
    with pytest.raises(DataError, match=r"too few examples \(1\).*--text-split.*accepted:"):
        split_examples(whole, 0.1, seed=0)


def test_folder_per_label_layout_labels_by_folder_one_example_per_file(tmp_path):
    root = tmp_path / "reviews"
    for label, texts in {"neg": ["dull film.\n\nToo long.", "bad"], "pos": ["great"]}.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / label / f"{i}.txt").write_text(text + "\n")
    examples = load_examples([str(root)], task="classify")
    assert [(e.text, e.label) for e in examples] == [("dull film.\n\nToo long.", "neg"),
                                                     ("bad", "neg"), ("great", "pos")]
    (root / "train.jsonl").write_text('{"text": "x", "label": "pos"}\n')
    with pytest.raises(DataError, match="pass .jsonl files to --data explicitly"):
        load_examples([str(root)], task="classify")


def test_csv_and_tsv_with_text_and_label_columns(tmp_path):
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('\ufeffid,Text,Label\n1,"Great, really great",pos\n'
                        '2,"Two\nlines",neg\n3,,neg\n\n4,meh,neg\n', encoding="utf-8")
    examples = load_examples([str(csv_file)], task="classify")
    assert [(e.text, e.label) for e in examples] == [("Great, really great", "pos"),
                                                     ("Two\nlines", "neg"), ("meh", "neg")]
    assert examples[0].source.endswith("reviews.csv:2")
    semicolon = tmp_path / "eu.csv"
    semicolon.write_text("label;text\nsport;goal, at last\nnews;rates up\n")
    assert [(e.text, e.label) for e in load_examples([str(semicolon)], "classify")] == \
        [("goal, at last", "sport"), ("rates up", "news")]
    tsv = tmp_path / "data.tsv"
    tsv.write_text("sentence\ttopic\nthe cat\tanimals\nthe car\tvehicles\n")
    opts = ReadOptions(text_field="sentence", label_field="topic")
    assert [e.label for e in load_examples([str(tsv)], "classify", opts)] == ["animals",
                                                                               "vehicles"]
    assert [e.label for e in load_examples([str(tsv)], "lm", opts)] == ["animals", "vehicles"]


def test_csv_errors_name_the_row_the_header_and_the_flag(tmp_path):
    headerless = tmp_path / "raw.csv"
    headerless.write_text("great film,pos\nbad film,neg\n")
    with pytest.raises(DataError, match=r'raw.csv: the first row must be a header naming a '
                                        r'"text" column.*great film,pos.*--text-field'):
        load_examples([str(headerless)], "classify")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text,label\nfine,a\nno label here,\n")
    with pytest.raises(DataError, match=r'unlabeled.csv:3: classification data needs a "label"'):
        load_examples([str(unlabeled)], "classify")
    assert len(load_examples([str(unlabeled)], "lm")) == 2


def test_json_list_of_objects_with_configurable_fields(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"body": "a cat", "y": 0}, {"body": "a car", "y": 1}]')
    opts = ReadOptions(text_field="body", label_field="y")
    assert [(e.text, e.label) for e in load_examples([str(path)], "classify", opts)] == \
        [("a cat", "0"), ("a car", "1")]
    path.write_text('{"body": "not a list"}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_examples([str(path)], "lm", opts)
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"invalid JSON at line 2 .*\.jsonl"):
        load_examples([str(path)], "lm", opts)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": "x", "label": ["a", "b"]}\n')
    with pytest.raises(DataError, match="must be one string or number"):
        load_examples([str(nested)], "classify")


def test_unusable_data_errors_say_which_shapes_are_accepted(tmp_path):
    single = tmp_path / "notes.txt"
    single.write_text("one line\nanother line\n")
    with pytest.raises(DataError, match=r"two distinct labels, found \['notes'\]") as exc:
        load_examples([str(single)], task="classify")
    assert ACCEPTED_SHAPES in str(exc.value)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError) as exc:
        load_examples([str(tmp_path / "blank.txt")])
    assert "holds no text" in str(exc.value) and ACCEPTED_SHAPES in str(exc.value)
    for shape in ("--text-split", "JSONL", "CSV/TSV", "hf:NAME", "folder names"):
        assert shape in ACCEPTED_SHAPES
    with pytest.raises(DataError, match="text_split must be one of"):
        ReadOptions(text_split="sentences")
