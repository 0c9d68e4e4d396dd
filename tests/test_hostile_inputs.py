"""Hostile input at every loader: only the library's own errors come out, and memory stays small.

Each loader (wire messages, ``.fpp`` artifacts, PEFT adapters, data files, TOML configs, texts
to tokenize) is fed inputs that declare far more than they hold, with valid checksums where the
format has one. The tests assert the error type and message, and that the tracemalloc peak of
the call stays within ``8 * input size`` plus a small constant: sizes are checked before
anything of a declared size is allocated (:mod:`fedprompt.wire.limits`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from conftest import FIXTURES, tiny_backbone
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fedprompt
from fedprompt.config import read_toml
from fedprompt.errors import ArtifactError, ConfigError, DataError, WireError
from fedprompt.prompts import PromptConfig
from fedprompt.data.datasets import load_text_file
from fedprompt.wire import limits
from fedprompt.wire import peft as fp_peft
from fedprompt.wire.artifact import SCHEMA, SCHEMA_VERSION, load_prompt, save_prompt
from fedprompt.wire.codec import decode, encode

FLOOR = 1 << 20
"""Bytes any call may use beyond ``8 * input size`` (interpreter bookkeeping, small tables)."""

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _peak(fn, *args, **kwargs):
    """``(exception or None, tracemalloc peak in bytes)`` of one call."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        error = None
    except BaseException as exc:  # noqa: BLE001 - a MemoryError is what these tests look for
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def _assert_refused(fn, size, error_type, match=None, *, factor=8, floor=FLOOR):
    """``fn()`` raises ``error_type`` (matching ``match``) within ``factor * size + floor`` bytes."""
    error, peak = _peak(fn)
    assert isinstance(error, error_type), f"expected {error_type.__name__}, got {type(error).__name__}: {error}"
    if match is not None:
        assert match in str(error), str(error)
    assert peak <= factor * size + floor, f"peak {peak} bytes for an input of {size} bytes"
    return error


# ----------------------------------------------------------------------------- .fpp artifacts


def _hostile_fpp(path, edit):
    """A 3-class soft-prompt artifact whose content ``edit(meta, tree)`` rewrites, with a valid checksum."""
    params = {"prompt": {"embeddings": np.zeros((2, 8), np.float32)},
              "head": {"w": np.zeros((8, 3), np.float32), "b": np.zeros(3, np.float32)}}
    save_prompt(path, params, config=PromptConfig(num_virtual_tokens=2), backbone_name="b", fingerprint="fp",
                storage="float32", label_names=["x", "y", "z"])
    content = decode(decode(path.read_bytes()).tree["content"].tobytes())
    meta, tree = edit(dict(content.meta), content.tree)
    body = encode(tree, kind="prompt-content", fingerprint="fp", meta=meta)
    checksum = "sha256:" + hashlib.sha256(body).hexdigest()
    path.write_bytes(encode({"content": np.frombuffer(body, np.uint8)}, kind="prompt", fingerprint="fp",
                            meta={"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "checksum": checksum}))
    return path


def _declare(prompt=None, backbone=None, task=None, method=None):
    """An edit that overrides schema fields of the content."""
    def edit(meta, tree):
        if method is not None:
            meta["method"] = method
        meta["prompt_config"] = {**meta["prompt_config"], **(prompt or {})}
        meta["backbone"] = {**meta["backbone"], **(backbone or {})}
        if task is not None:
            meta["task"] = {**meta["task"], **task}
        return meta, tree
    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_declare(prompt={"num_virtual_tokens": 100_000}, backbone={"hidden_size": 100_000}),
         "prompt/embeddings (100000, 100000)"),
        (_declare(task={"num_labels": 2**40, "label_names": None}), "num_labels: 1099511627776 classes, over the limit"),
        (_declare(task={"num_labels": 60_000, "label_names": None}, backbone={"hidden_size": 100_000}),
         "head/w (100000, 60000)"),
        (_declare(method="prefix", prompt={"method": "prefix", "reparameterize": True, "reparam_hidden": 2**31 - 1},
                  backbone={"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}), "prompt/mlp_in/w (8, 2147483647)"),
    ],
)
def test_artifact_declaring_huge_tensors_is_refused_before_allocating(tmp_path, edit, match):
    path = _hostile_fpp(tmp_path / "p.fpp", edit)
    error = _assert_refused(lambda: load_prompt(path), path.stat().st_size, ArtifactError, match)
    assert str(path) in str(error)


_BIG = st.one_of(st.integers(1, 64), st.integers(1, 2**31 - 1))


@FUZZ
@given(
    p=_BIG, d=_BIG, labels=st.one_of(st.integers(2, 64), st.integers(2, 2**62)), hidden=_BIG,
    layers=_BIG, kv=_BIG, hd=_BIG, method=st.sampled_from(["prompt", "prefix", "reparam"]),
)
def test_artifact_declarations_never_escape_as_memory_errors(tmp_path, p, d, labels, hidden, layers, kv, hd, method):
    backbone = {"hidden_size": d, "num_layers": layers, "num_kv_heads": kv, "head_dim": hd}
    prompt = {"num_virtual_tokens": p}
    if method != "prompt":
        prompt.update(method="prefix", reparameterize=method == "reparam", reparam_hidden=hidden)
    assume((method, p, d, labels) != ("prompt", 2, 8, 3))  # the stored tensors themselves
    edit = _declare(prompt=prompt, backbone=backbone, task={"num_labels": labels, "label_names": None},
                    method="prefix" if method != "prompt" else None)
    path = _hostile_fpp(tmp_path / "p.fpp", edit)
    _assert_refused(lambda: load_prompt(path), path.stat().st_size, ArtifactError)


def test_artifact_float64_values_beyond_float32_are_named_as_such(tmp_path):
    def edit(meta, tree):
        tree["prompt"]["embeddings"] = np.full((2, 8), 1e300)
        meta["tensors"] = {**meta["tensors"], "prompt/embeddings": {"dtype": "float32", "storage": "float64"}}
        return meta, tree

    path = _hostile_fpp(tmp_path / "p.fpp", edit)
    _assert_refused(lambda: load_prompt(path), path.stat().st_size, ArtifactError, "out of the float32 range")


def test_artifact_loading_of_a_large_valid_int8_file_stays_within_8x(tmp_path):
    params = {"embeddings": np.random.default_rng(0).normal(size=(500, 1024)).astype(np.float32)}
    path = save_prompt(tmp_path / "p.fpp", params, config=PromptConfig(num_virtual_tokens=500), backbone_name="b",
                       fingerprint="fp", storage="int8")
    error, peak = _peak(load_prompt, path)
    assert error is None and peak <= 8 * path.stat().st_size + FLOOR  # float32 out of int8 in is 4x alone


def test_infinite_epsilon_round_trips_though_messages_carry_finite_numbers(tmp_path):
    path = save_prompt(tmp_path / "p.fpp", {"embeddings": np.zeros((2, 8), np.float32)},
                       config=PromptConfig(num_virtual_tokens=2), backbone_name="b", fingerprint="fp",
                       training={"rounds": 1, "clients": 2, "algorithm": "fedavg", "privacy_epsilon": float("inf")})
    assert load_prompt(path).training["privacy_epsilon"] == float("inf")
    with pytest.raises(WireError, match="not finite"):
        save_prompt(tmp_path / "q.fpp", {"embeddings": np.zeros((2, 8), np.float32)},
                    config=PromptConfig(num_virtual_tokens=2), backbone_name="b", fingerprint="fp",
                    metadata={"score": float("nan")})


# ----------------------------------------------------------------------------- backbone paths


def test_artifacts_and_adapters_record_a_name_never_a_local_path(tmp_path):
    backbone = tiny_backbone("bert")
    assert backbone.path is not None and backbone.path.is_absolute()
    config = PromptConfig(num_virtual_tokens=2)
    path = save_prompt(tmp_path / "p.fpp", {"embeddings": np.zeros((2, backbone.width), np.float32)},
                       config=config, backbone=backbone)
    folder = str(FIXTURES.resolve()).encode()
    assert folder not in path.read_bytes()
    artifact = load_prompt(path, backbone=backbone)  # the fingerprint binds it to the backbone
    assert artifact.backbone.name == "bert" and artifact.backbone.path is None
    out = fp_peft.export_peft(artifact, tmp_path / "adapter")
    assert json.loads((out / fp_peft.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "bert"
    assert all(folder not in file.read_bytes() for file in out.iterdir())
    named = save_prompt(tmp_path / "n.fpp", {"embeddings": np.zeros((2, 8), np.float32)}, config=config,
                        backbone_name=str(tmp_path / "models" / "my-model"), fingerprint="fp")
    assert load_prompt(named).backbone.name == "my-model"


# ----------------------------------------------------------------------------- PEFT adapters


def _safetensors(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_aliases_are_refused_before_any_copy(tmp_path):
    data = bytes(2 << 20)
    entry = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data)]}
    path = _safetensors(tmp_path / "w.safetensors", {"prompt_embeddings": entry, **{f"t{i}": entry for i in range(60)}}, data)
    _assert_refused(lambda: fp_peft.read_safetensors(path), path.stat().st_size, ArtifactError, "overlap", factor=2)


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8"])
_OFFSET = st.one_of(st.integers(0, 4096), st.integers(-(2**63), 2**64))
_DIM = st.one_of(st.integers(0, 64), st.integers(0, 2**40))


@FUZZ
@given(
    entries=st.lists(st.tuples(_DTYPES, st.lists(_DIM, max_size=3), _OFFSET, _OFFSET), min_size=1, max_size=8),
    size=st.integers(0, 4096),
)
def test_safetensors_headers_never_escape_as_other_errors(tmp_path, entries, size):
    header = {("prompt_embeddings" if i == 0 else f"t{i}"): {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
              for i, (dtype, shape, begin, end) in enumerate(entries)}
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(size))
    error, peak = _peak(fp_peft.read_safetensors, path)
    assert error is None or isinstance(error, ArtifactError), repr(error)
    assert peak <= 8 * path.stat().st_size + FLOOR


def test_safetensors_float64_beyond_float32_is_named_as_such(tmp_path):
    path = _safetensors(tmp_path / "w.safetensors",
                        {"prompt_embeddings": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}},
                        np.array([1.0, 1e300]).tobytes())
    with pytest.raises(ArtifactError, match=r"values up to 1e\+300 are out of the float32 range"):
        fp_peft.read_safetensors(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "prompt_tuning_init",
           "prompt_tuning_init_text", "num_transformer_submodules", "task_type", "base_model_name_or_path",
           "prefix_projection")


def _adapter(folder, config, task=None):
    folder.mkdir(exist_ok=True)
    (folder / fp_peft.ADAPTER_CONFIG).write_text(json.dumps(config))
    _safetensors(folder / fp_peft.ADAPTER_WEIGHTS,
                 {"prompt_embeddings": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, bytes(32))
    if task is not None:
        (folder / fp_peft.TASK_FILE).write_text(json.dumps(task))
    return folder


def test_peft_prompt_tuning_init_of_the_wrong_type_is_an_artifact_error(tmp_path):
    folder = _adapter(tmp_path / "a", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 4,
                                       "prompt_tuning_init": ["TEXT"]})
    with pytest.raises(ArtifactError, match=r"prompt_tuning_init must be one of \['RANDOM', 'SAMPLE_VOCAB', 'TEXT'\]"):
        fp_peft.read_peft_adapter(folder)


@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=len(_FIELDS)),
    peft_type=st.sampled_from(["PROMPT_TUNING", "PREFIX_TUNING"]),
    task=st.none() | st.dictionaries(st.sampled_from(["type", "num_labels", "label_names", "pooling", "verbalizer"]), _JSON),
)
@example(fields={"prompt_tuning_init": ["TEXT"]}, peft_type="PROMPT_TUNING", task=None)
@example(fields={}, peft_type="PROMPT_TUNING", task={"type": "sequence_classification", "num_labels": 2**40})
def test_peft_config_fields_of_any_json_type_raise_artifact_errors_only(tmp_path, fields, peft_type, task):
    config = {"peft_type": peft_type, "num_virtual_tokens": 2, "token_dim": 4, "num_layers": 1,
              "num_attention_heads": 1, **fields}
    folder = _adapter(tmp_path / "a", config, task)
    try:
        fp_peft.read_peft_adapter(folder)
    except ArtifactError:
        pass


# ----------------------------------------------------------------------------- data files


def _jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("label", [10**7, 2**62, limits.MAX_CLASSES])
def test_huge_integer_labels_are_refused_before_the_class_table_exists(tmp_path, label):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": label}])
    _assert_refused(lambda: load_text_file(path), path.stat().st_size, DataError,
                    f"line 2: label {label} is too large: integer labels are class indices below 65536")


def test_integer_labels_up_to_the_cap_still_work(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": limits.MAX_CLASSES - 1}])
    assert load_text_file(path).num_labels == limits.MAX_CLASSES


def test_null_text_and_a_single_label_say_what_is_wrong(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": None, "label": 0}])
    with pytest.raises(DataError, match="line 1: 'text' is null; expected a string"):
        load_text_file(path)
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "spam"}])
    with pytest.raises(DataError, match=r"only one distinct label \('spam'\); .* at least two"):
        load_text_file(path)
    assert load_text_file(path, label_names=["ham", "spam"]).num_labels == 2


_LABEL = st.one_of(st.integers(-3, 70_000), st.integers(0, 2**63), st.text(max_size=4), st.none(), st.booleans(),
                   st.floats(allow_nan=False))


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({"text": st.one_of(st.text(max_size=8), st.none(), st.integers()),
                                               "label": _LABEL}), min_size=1, max_size=6))
@example(records=[{"text": "a", "label": 0}, {"text": "b", "label": 10**7}])
def test_data_files_raise_data_errors_only_and_stay_small(tmp_path, records):
    path = _jsonl(tmp_path / "d.jsonl", records)
    error, peak = _peak(load_text_file, path)
    assert error is None or isinstance(error, DataError), repr(error)
    # The class table of up to 65,536 names ("0".."65535") is the one allocation beyond the file.
    assert peak <= 8 * path.stat().st_size + 8 * FLOOR


# ----------------------------------------------------------------------------- wire messages


def test_a_message_of_empty_containers_is_refused_before_msgpack_builds_it():
    inner = b"\xdd" + (65536).to_bytes(4, "big") + b"\x90" * 65536  # an array of 65,536 empty arrays
    data = b"\xdc" + (32).to_bytes(2, "big") + inner * 32  # 2 MiB, 2 million objects
    _assert_refused(lambda: decode(data), len(data), WireError, "msgpack objects, too many for its")


@FUZZ
@given(depth=st.integers(1, 2000), length=st.integers(1, 65536), kind=st.sampled_from([b"\xdd", b"\xdf"]))
def test_declared_container_lengths_are_backed_by_bytes(depth, length, kind):
    data = (kind + length.to_bytes(4, "big")) * depth  # each level declares `length` entries, none present
    _assert_refused(lambda: decode(data), len(data), WireError)


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=4) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=40,
)


@FUZZ
@given(value=_PLAIN, junk=st.binary(max_size=64))
def test_any_msgpack_value_or_bytes_decode_to_a_message_or_a_wire_error(value, junk):
    for data in (msgpack.packb(value), junk, msgpack.packb(value) + junk):
        error, peak = _peak(decode, data)
        assert error is None or isinstance(error, WireError), repr(error)
        assert peak <= 8 * len(data) + FLOOR


def _message(**fields):
    base = {"format": "fedprompt.wire", "version": 1, "kind": "update", "round": 1, "fingerprint": None,
            "meta": None, "tree": None}
    return {**base, **fields}


def test_duplicate_map_keys_are_refused():
    pairs = list(_message().items()) + [("kind", "control")]
    data = bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)
    assert msgpack.unpackb(data)["kind"] == "control"  # msgpack itself keeps the last
    with pytest.raises(WireError, match="the key 'kind' more than once"):
        decode(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_meta_is_refused_both_ways(value):
    with pytest.raises(WireError, match=r"meta/x/0: .* is not finite"):
        decode(msgpack.packb(_message(meta={"x": [value]})))
    with pytest.raises(WireError, match="not finite"):
        encode({}, kind="update", meta={"x": [value]})


# ----------------------------------------------------------------------------- TOML and texts


def test_a_toml_config_over_the_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"rounds = 3\n" + b"#" * limits.MAX_TOML_BYTES)
    _assert_refused(lambda: read_toml(path), 0, ConfigError, "over the limit of 1048576", floor=64 << 10)
    path.write_bytes(b"rounds = 3\n")
    assert read_toml(path) == {"rounds": 3}


class _RecordingTokenizer:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "inner", tokenizer)
        object.__setattr__(self, "lengths", [])

    def __call__(self, texts, **kwargs):
        self.lengths.extend(len(text) for text in texts)
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


@pytest.fixture(scope="module")
def word_backbone(tmp_path_factory):
    """The tiny BERT with a word-level tokenizer: "w3".."w99" are ids 3..99."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("backbone") / "bert"
    shutil.copytree(FIXTURES / "bert", folder, ignore=shutil.ignore_patterns("golden.npz"))
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{f"w{i}": i for i in range(3, 100)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return fedprompt.load_backbone(folder)


def test_a_huge_text_is_cut_before_tokenizing_with_the_same_tokens(word_backbone):
    max_length = 16
    normal = " ".join(f"w{3 + i % 90}" for i in range(200))  # 200 words, 778 characters: over the cut
    huge = normal + " w5" * 1_000_000  # 3.8 MB
    expected = word_backbone.tokenizer([normal], padding="max_length", truncation=True, max_length=max_length,
                                       return_tensors="np")["input_ids"]
    recorder = _RecordingTokenizer(word_backbone.tokenizer)
    word_backbone.tokenizer = recorder
    try:
        out = word_backbone.tokenize([normal, huge], max_length)
    finally:
        word_backbone.tokenizer = recorder.inner
    assert recorder.lengths == [limits.max_text_chars(max_length)] * 2  # both cut, to 512 characters
    np.testing.assert_array_equal(out["input_ids"], np.concatenate([expected, expected]))
