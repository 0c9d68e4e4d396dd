"""Text data sets: the packaged WordNet set, its builder, file loaders and splitting."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest

from fedprompt.errors import ConfigError, DataError, FedPromptError
from fedprompt.data import build_wordnet
from fedprompt.data.datasets import (
    TextDataset,
    from_lists,
    load_text_file,
    load_wordnet_supersenses,
    train_test_split,
)

# Lines in the format of WordNet's data.noun (wndb(5WN)): a licence header line (leading
# spaces), then synsets "offset lex_filenum n w_cnt word lex_id ... ptr_cnt ... | gloss".
SYNTHETIC_DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis that has been domesticated by man; occurs in many breeds; "the dog barked all night"  
02121808 05 n 01 cat 0 000 | feline mammal usually having thick soft fur; "cats purr"  
02121809 05 n 01 kitty 0 000 | feline mammal usually having thick soft fur  
04379243 06 n 01 table 0 000 | a piece of furniture having a smooth flat top: "the table was set"  
04379244 06 n 01 x 0 000 | a thing; "short glosses are dropped"  
07583197 13 n 01 soup 0 000 | liquid food especially of meat or fish or vegetable stock  
07583198 20 n 01 soup_plant 0 000 | liquid food especially of meat or fish or vegetable stock  
15113229 28 n 01 time 0 000 | an instance or single occasion for some event  
15113230 44 n 01 notanoun 0 000 | a line with a lexicographer file that is not a noun file  
"""


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet_supersenses()


# --- The packaged WordNet data set ------------------------------------------------------


def test_wordnet_loads_with_26_shared_sorted_labels(wordnet):
    train, test = wordnet
    assert train.label_names == test.label_names
    assert len(train.label_names) == 26
    assert list(train.label_names) == sorted(build_wordnet.NOUN_LEXNAMES.values())
    assert train.labels.dtype == np.int32
    # Every supersense has examples on both sides.
    assert (train.label_histogram() > 0).all() and (test.label_histogram() > 0).all()


def test_wordnet_split_is_disjoint_and_about_80_20(wordnet):
    train, test = wordnet
    assert not set(train.texts) & set(test.texts)
    assert len(set(train.texts)) == len(train)  # texts were de-duplicated
    fraction = len(test) / (len(train) + len(test))
    assert 0.19 < fraction < 0.21
    assert len(train) + len(test) > 70_000


def test_wordnet_known_gloss_maps_to_its_supersense(wordnet):
    train, test = wordnet
    by_text = {}
    for ds in (train, test):
        by_text.update(zip(ds.texts, (ds.label_names[i] for i in ds.labels)))
    dog = (
        "a member of the genus Canis (probably descended from the common wolf) that has been "
        "domesticated by man since prehistoric times; occurs in many breeds"
    )
    assert by_text[dog] == "noun.animal"  # usage example "the dog barked all night" removed
    table = (
        "a piece of furniture having a smooth flat top that is usually supported by one or "
        "more vertical legs"
    )
    assert by_text[table] == "noun.artifact"
    assert not any(text.startswith('"') or text.endswith(";") for text in by_text)
    assert all(len(text.split()) >= 3 for text in by_text)


def test_wordnet_split_matches_builder_hash(wordnet):
    train, test = wordnet
    assert all(build_wordnet.split_of(text) == "train" for text in train.texts[:500])
    assert all(build_wordnet.split_of(text) == "test" for text in test.texts[:500])


# --- The builder ------------------------------------------------------------------------


LEXNAMES = build_wordnet.NOUN_LEXNAMES
SYNTHETIC_DOG = (
    "a member of the genus Canis that has been domesticated by man; occurs in many breeds"
)


def test_parse_data_line():
    line = SYNTHETIC_DATA_NOUN.splitlines()[1]
    label, text = build_wordnet.parse_data_line(line, LEXNAMES)
    assert label == "noun.animal"
    assert text == SYNTHETIC_DOG
    header = SYNTHETIC_DATA_NOUN.splitlines()[0]
    assert build_wordnet.parse_data_line(header, LEXNAMES) is None


def test_definition_of_strips_examples():
    assert build_wordnet.definition_of('a b c; "ex one"; "ex two"  ') == "a b c"
    assert build_wordnet.definition_of('a flat top: "the table was set"') == "a flat top"
    assert build_wordnet.definition_of("one; two;  three") == "one; two; three"
    assert build_wordnet.definition_of('"only an example"') == ""


def test_builder_records_and_determinism(tmp_path):
    data_noun = tmp_path / "data.noun"
    data_noun.write_text(SYNTHETIC_DATA_NOUN, encoding="utf-8")
    first = build_wordnet.write_dataset(data_noun, tmp_path / "a" / "out.jsonl.gz", LEXNAMES)
    second = build_wordnet.write_dataset(data_noun, tmp_path / "b" / "out.jsonl.gz", LEXNAMES)
    payload = (tmp_path / "a" / "out.jsonl.gz").read_bytes()
    assert payload == (tmp_path / "b" / "out.jsonl.gz").read_bytes()
    assert payload[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field is zero

    records = [json.loads(line) for line in gzip.decompress(payload).decode().splitlines()]
    assert [(r["label"], r["text"]) for r in records] == [
        ("noun.animal", SYNTHETIC_DOG),
        ("noun.animal", "feline mammal usually having thick soft fur"),  # the repeat is dropped
        ("noun.artifact", "a piece of furniture having a smooth flat top"),
        ("noun.time", "an instance or single occasion for some event"),
    ]  # "a thing" is too short; the soup text has two labels; lex file 44 is not a noun
    assert all(r["split"] == build_wordnet.split_of(r["text"]) for r in records)
    assert first.num_synsets == 8 and first.num_too_short == 1
    assert first.num_duplicates == 1 and first.num_conflicting == 2
    assert first.label_counts == {"noun.animal": 2, "noun.artifact": 1, "noun.time": 1}
    assert first == dataclasses.replace(second, path=first.path)


PINNED_SPLITS = ["train", "test", "train", "test", "train", "train", "test", "test"] + ["train"] * 4


def test_split_of_is_fixed_and_about_20_percent():
    texts = [f"synthetic text number {i}" for i in range(5000)]
    share = sum(build_wordnet.split_of(t) == "test" for t in texts) / len(texts)
    assert 0.17 < share < 0.23
    # Pinned values: the split of a text must never change between versions.
    assert [build_wordnet.split_of(t) for t in texts[:12]] == PINNED_SPLITS


def test_read_lexnames_prefers_file(tmp_path):
    assert build_wordnet.read_lexnames(tmp_path) == dict(build_wordnet.NOUN_LEXNAMES)
    (tmp_path / "lexnames").write_text("00\tadj.all\t3\n05\tnoun.animal\t1\n", encoding="utf-8")
    assert build_wordnet.read_lexnames(tmp_path) == {5: "noun.animal"}


SYNTHETIC_DATA_VERB = """\
  1 This software and database is being provided to you, the LICENSEE, by  
00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 000 | draw air into, and expel out of, the lungs; "I can breathe better"  
01835496 38 v 01 travel 0 000 | change location; move, travel, or proceed  
01835497 38 v 01 go 0 000 | go"  
02604760 42 v 01 be 0 000 | have the quality of being; (copula, used with an adjective)  
01835498 05 v 01 dog 0 000 | a line whose lexicographer file is a noun file  
"""


def test_verb_supersenses_as_user_files(tmp_path):
    """--pos verb: the verb glosses as the two JSONL files fedprompt run reads, split as the
    packaged data set is, with the licence; the verb lexnames from the file when it is there."""
    data_verb = tmp_path / "data.verb"
    data_verb.write_text(SYNTHETIC_DATA_VERB, encoding="utf-8")
    copyright_path = tmp_path / "copyright"
    copyright_path.write_text("Copyright: (c) Princeton University\n WordNet 3.0 licence\n", encoding="utf-8")
    out = tmp_path / "verbs"
    assert build_wordnet.main(["--pos", "verb", "--wordnet-dir", str(tmp_path), "--out", str(out),
                               "--copyright", str(copyright_path)]) == 0
    records = {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
               for split in ("train", "test")}
    expected = [
        ("verb.body", "draw air into, and expel out of, the lungs"),
        ("verb.motion", "change location; move, travel, or proceed"),
        ("verb.stative", "have the quality of being; (copula, used with an adjective)"),
    ]  # "go" is too short; lex file 05 is not a verb file
    got = sorted((r["label"], r["text"]) for split in records.values() for r in split)
    assert got == sorted(expected)
    assert all(build_wordnet.split_of(r["text"]) == split for split, rs in records.items() for r in rs)
    assert all(set(r) == {"text", "label"} for rs in records.values() for r in rs)
    licence = (out / "WORDNET_LICENSE.txt").read_text()
    assert "train.jsonl and test.jsonl are derived from WordNet 3.0" in licence and "verb synset" in licence
    assert len(build_wordnet.VERB_LEXNAMES) == 15
    (tmp_path / "lexnames").write_text("05\tnoun.animal\t1\n38\tverb.motion\t2\n", encoding="utf-8")
    assert build_wordnet.read_lexnames(tmp_path, "verb") == {38: "verb.motion"}
    with pytest.raises(SystemExit):  # the packaged folder is for the noun set only
        build_wordnet.main(["--pos", "verb", "--wordnet-dir", str(tmp_path)])


def test_license_text_keeps_wordnet_stanza_only():
    copyright_text = (
        "Format: x\n\nFiles: *\nCopyright: (c) Princeton University\nLicense: WordNet3.0\n"
        " Permission to use.\n .\n WordNet 3.0 Copyright 2006 by Princeton University.\n\n"
        "Files: debian/*\nLicense: GPL-2+\n"
    )
    text = build_wordnet.license_text(copyright_text)
    assert "derived from WordNet 3.0" in text
    assert "Permission to use.\n\nWordNet 3.0 Copyright 2006" in text
    assert "GPL" not in text


# --- TextDataset ------------------------------------------------------------------------


def test_text_dataset_basics():
    ds = TextDataset(texts=("a", "b", "c"), labels=np.array([1, 0, 1]), label_names=("x", "y", "z"))
    assert len(ds) == 3 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.label_histogram(), [1, 2, 0])
    sub = ds.subset([2, 0])
    assert sub.texts == ("c", "a") and sub.labels.tolist() == [1, 1]
    assert sub.label_names == ds.label_names
    assert ds.subset(np.array([True, False, True])).texts == ("a", "c")
    assert len(ds.subset([])) == 0
    with pytest.raises(ValueError):
        ds.labels[0] = 2  # read-only
    with pytest.raises(DataError):
        TextDataset(texts=("a",), labels=np.array([3]), label_names=("x",))
    with pytest.raises(DataError):
        TextDataset(texts=("a", "b"), labels=np.array([0]), label_names=("x",))


# --- Loading files ----------------------------------------------------------------------


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_string_labels(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": "good film", "label": "pos"}\n\n{"text": "bad film", "label": "neg"}\n'
        '{"text": "fine film", "label": "pos"}\n',
    )
    ds = load_text_file(path)
    assert ds.texts == ("good film", "bad film", "fine film")
    assert ds.label_names == ("neg", "pos") and ds.labels.tolist() == [1, 0, 1]
    ds = load_text_file(path, label_names=["pos", "neg", "meh"])
    assert ds.labels.tolist() == [0, 1, 0] and ds.num_labels == 3


def test_jsonl_int_labels_and_custom_keys(tmp_path):
    path = _write(tmp_path / "d.json", '{"s": "one", "y": 2}\n{"s": "two", "y": 0}\n')
    ds = load_text_file(path, text_key="s", label_key="y")
    assert ds.label_names == ("0", "1", "2") and ds.labels.tolist() == [2, 0]
    ds = load_text_file(path, text_key="s", label_key="y", label_names=("a", "b", "c", "d"))
    assert ds.label_names == ("a", "b", "c", "d") and ds.labels.tolist() == [2, 0]


def test_json_array(tmp_path):
    content = '[{"text": "one", "label": "a"},\n {"text": "two", "label": "b"}]'
    path = _write(tmp_path / "d.json", content)
    assert load_text_file(path).labels.tolist() == [0, 1]


def test_csv_string_and_int_labels(tmp_path):
    path = _write(tmp_path / "s.csv", 'text,label\n"hello, world",greeting\nbye now,farewell\n')
    ds = load_text_file(path)
    assert ds.texts == ("hello, world", "bye now")
    assert ds.label_names == ("farewell", "greeting") and ds.labels.tolist() == [1, 0]

    path = _write(tmp_path / "i.csv", "id,text,label\n1,first,1\n2,second,0\n3,third,3\n")
    ds = load_text_file(path)
    assert ds.label_names == ("0", "1", "2", "3") and ds.labels.tolist() == [1, 0, 3]
    # Digit labels that are all in label_names are names, not indices.
    ds = load_text_file(path, label_names=("3", "1", "0"))
    assert ds.labels.tolist() == [1, 2, 0]


OK_LINE = '{"text": "a", "label": 0}\n'


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "match"),
    [
        ("d.txt", "x", {}, r"d\.txt: unknown file extension"),
        ("d.jsonl", "", {}, "no examples"),
        ("d.csv", "", {}, "no examples"),
        ("d.csv", "text,label\n", {}, "no examples"),
        ("d.jsonl", OK_LINE + '{"text": "b", "label": 1\n', {}, "line 2: bad JSON"),
        ("d.jsonl", OK_LINE + '["a", 0]\n', {}, "line 2: expected a JSON object"),
        ("d.jsonl", OK_LINE + '\n{"text": "b"}\n', {}, "line 3: missing key 'label'"),
        ("d.jsonl", '{"label": 0}\n', {}, "line 1: missing key 'text'"),
        ("d.jsonl", OK_LINE + '{"text": "  ", "label": 1}\n', {}, "line 2: empty text"),
        ("d.jsonl", OK_LINE + '{"text": "b", "label": "x"}\n', {}, "line 2: mixed label types"),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, "line 1: label must be a string or an"),
        ("d.jsonl", '{"text": "a", "label": true}\n', {}, "line 1: label must be a string or an"),
        ("d.jsonl", '{"text": "a", "label": -1}\n', {}, "line 1: negative label"),
        ("d.jsonl", '{"text": 5, "label": 1}\n', {}, "line 1: text must be a string"),
        (
            "d.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n',
            {"label_names": ["x", "y"]},
            r"line 2: label 'z' is not in label_names",
        ),
        ("d.jsonl", '{"text": "a", "label": 2}\n', {"label_names": ["x"]}, "label 2 is out"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n', {"label_names": ["x", "x"]}, "duplicates"),
        ("d.csv", "text,name\na,b\n", {}, "line 1: missing column 'label'"),
        ("d.csv", "text,label\na,x\nb\n", {}, "line 3: missing key 'label'"),
        ("d.csv", "text,label\na,x\n,y\n", {}, "line 3: empty text"),
    ],
)
def test_load_text_file_errors(tmp_path, name, content, kwargs, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=match) as info:
        load_text_file(path, **kwargs)
    assert str(path) in str(info.value)
    assert isinstance(info.value, (FedPromptError, ValueError))


def test_load_text_file_missing(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_text_file(tmp_path / "nope.jsonl")


# --- In-memory data and splitting -------------------------------------------------------


def test_from_lists():
    ds = from_lists(["a b", "c d", "e f"], ["y", "x", "y"])
    assert ds.label_names == ("x", "y") and ds.labels.tolist() == [1, 0, 1]
    ds = from_lists(["a", "b"], np.array([1, 0]))
    assert ds.label_names == ("0", "1") and ds.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        from_lists(["a", "b"], [0])
    with pytest.raises(DataError, match="no examples"):
        from_lists([], [])
    with pytest.raises(DataError, match="item 1: mixed label types"):
        from_lists(["a", "b"], [0, "x"])
    with pytest.raises(DataError, match="item 0: empty text"):
        from_lists([""], ["x"])
    with pytest.raises(DataError, match="item 0: label 'q' is not in label_names"):
        from_lists(["a"], ["q"], label_names=["x"])


def test_train_test_split_deterministic():
    ds = from_lists([f"text {i}" for i in range(100)], [i % 3 for i in range(100)])
    train, test = train_test_split(ds, test_fraction=0.2, seed=7)
    again_train, again_test = train_test_split(ds, test_fraction=0.2, seed=7)
    assert len(train) == 80 and len(test) == 20
    assert train.texts == again_train.texts and test.texts == again_test.texts
    assert not set(train.texts) & set(test.texts)
    assert set(train.texts) | set(test.texts) == set(ds.texts)
    assert train.label_names == test.label_names == ds.label_names
    other_train, _ = train_test_split(ds, test_fraction=0.2, seed=8)
    assert other_train.texts != train.texts
    with pytest.raises(ConfigError):
        train_test_split(ds, test_fraction=1.0)
    with pytest.raises(DataError, match="one part would be empty"):
        train_test_split(from_lists(["a", "b"], [0, 1]), test_fraction=0.1)
