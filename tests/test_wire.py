"""The wire codec and the prompt artifact: round trips, exact sizes, hostile input."""

from __future__ import annotations

import os
from typing import NamedTuple

import hypothesis.strategies as st
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fedprompt.errors import ConfigError, FedPromptError, WireError
from fedprompt.wire import artifact
from fedprompt.wire.artifact import load_prompt, save_prompt, write_atomic
from fedprompt.wire.codec import (
    MAX_DEPTH,
    Message,
    check_message,
    check_template,
    decode,
    encode,
    encoded_size,
)

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.int32, np.uint8, np.int64, np.float64, np.bool_]


def _array(dtype, shape, seed=0):
    values = np.random.default_rng(seed).normal(size=shape) * 10
    return values.astype(dtype)


def _assert_same_tree(got, want):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            _assert_same_tree(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for got_item, want_item in zip(got, want):
            _assert_same_tree(got_item, want_item)
    elif want is None:
        assert got is None
    else:
        want = np.asarray(want)
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()  # bit-exact, NaN payloads included


def _raw_message(tree, **header):
    """A message packed by hand, for inputs ``encode`` would never make."""
    message = {"format": "fedprompt.wire", "version": 1, "kind": "update", "round": 1, "fingerprint": None, "meta": None}
    message.update(header)
    message["tree"] = tree
    return msgpack.packb(message, use_bin_type=True)


def _leaf(dtype="float32", shape=(2,), data=None):
    """A leaf map; by default two float32 zeros."""
    if data is None:
        data = bytes(4 * int(np.prod(shape)))
    return {"dtype": dtype, "shape": list(shape), "data": data}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_each_dtype(dtype):
    tree = {"x": _array(dtype, (3, 5)), "scalar": _array(dtype, ()), "empty": _array(dtype, (0, 4))}
    message = decode(encode(tree, kind="update", round=7, fingerprint="abc"))
    assert message == Message("update", 7, "abc", None, message.tree)
    _assert_same_tree(message.tree, tree)


def test_round_trip_nested_dicts_lists_none_and_meta():
    tree = {
        "prompt": {"embeddings": _array(np.float32, (20, 8))},
        "layers": [_array(np.float16, (2, 3)), (_array(np.int8, (4,)), {"deep": [[_array(np.int32, (1, 1))]]})],
        "nothing": None,
        "empty_dict": {},
        "empty_list": [],
    }
    meta = {"method": "prompt", "config": {"P": 20, "lr": 0.5, "tags": ("a", "b")}, "np": np.float32(0.25), "blob": b"\x00"}
    message = decode(encode(tree, kind="prompt", meta=meta))
    _assert_same_tree(message.tree, tree)
    config = {"P": 20, "lr": 0.5, "tags": ["a", "b"]}
    assert message.meta == {"method": "prompt", "config": config, "np": 0.25, "blob": b"\x00"}
    assert message.round is None and message.fingerprint is None


def test_round_trip_jax_arrays_and_odd_layouts():
    tree = {
        "bf16": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4),
        "f32": jnp.linspace(-1, 1, 6, dtype=jnp.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "big_endian": np.arange(5, dtype=">f4"),
        "nan_kept": np.array([np.nan, np.inf, -0.0], np.float32),
    }
    got = decode(encode(tree, kind="update")).tree
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(got["f32"], np.asarray(tree["f32"]))
    np.testing.assert_array_equal(got["transposed"], tree["transposed"])
    assert got["big_endian"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got["big_endian"], np.arange(5))
    assert got["nan_kept"].tobytes() == tree["nan_kept"].tobytes()


def test_decoded_arrays_are_writable_copies():
    data = encode({"w": np.zeros(4, np.float32)}, kind="update")
    leaf = decode(data).tree["w"]
    leaf[0] = 1.0  # would raise on a read-only view of the message bytes
    assert leaf.flags.owndata or leaf.base is not None


def test_bytes_are_little_endian_raw_data():
    raw = msgpack.unpackb(encode({"w": np.array([1.0, 2.0], np.float32)}, kind="update"))
    assert raw["tree"]["w"] == {"dtype": "float32", "shape": [2], "data": np.array([1.0, 2.0], "<f4").tobytes()}
    assert list(raw) == ["format", "version", "kind", "round", "fingerprint", "meta", "tree"]
    assert raw["format"] == "fedprompt.wire" and raw["version"] == 1


# ----------------------------------------------------------------------------- sizes


def test_encoded_size_is_len_of_encode():
    tree = {"prompt": np.zeros((20, 384), np.float32), "head": {"w": np.zeros((384, 26), np.float32)}}
    kwargs = {"kind": "update", "round": 3, "fingerprint": "f" * 64, "meta": {"examples": 512}}
    assert encoded_size(tree, **kwargs) == len(encode(tree, **kwargs))


@pytest.mark.parametrize(
    ("tree", "payload"),
    [
        ({"prompt": np.zeros((20, 384), np.float32)}, 20 * 384 * 4),
        ({"prompt": np.zeros((20, 384), ml_dtypes.bfloat16)}, 20 * 384 * 2),
        (
            {
                "prompt": np.zeros((20, 384), np.float32),
                "head": {"w": np.zeros((384, 26), np.float32), "b": np.zeros(26, np.float32)},
            },
            (20 * 384 + 384 * 26 + 26) * 4,
        ),
    ],
)
def test_overhead_is_small(tree, payload):
    size = encoded_size(tree, kind="update", round=12, fingerprint="0" * 64)
    assert payload < size < payload + 300


# ----------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "tree",
    [
        {1: np.zeros(2)},
        {"x": np.array(["a", "b"])},
        {"x": np.array([object()], dtype=object)},
        {"x": np.zeros(2, np.complex64)},
        {"x": np.zeros(2, dtype=[("a", "<f4"), ("b", "<f4")])},
        {"x": object()},
    ],
    ids=["int-key", "str-array", "object-array", "complex", "structured", "object"],
)
def test_encode_refuses_what_cannot_travel(tree):
    with pytest.raises(WireError, match="x|key"):
        encode(tree, kind="update")


def test_encode_refuses_deep_trees_and_bad_header():
    deep = np.zeros(1, np.float32)
    for _ in range(MAX_DEPTH + 1):
        deep = {"a": deep}
    with pytest.raises(WireError, match="deeper"):
        encode(deep, kind="update")
    with pytest.raises(WireError, match="kind"):
        encode({}, kind="")
    with pytest.raises(WireError, match="round"):
        encode({}, kind="update", round=-1)
    with pytest.raises(WireError, match="meta"):
        encode({}, kind="update", meta={"x": {1: 2}})
    with pytest.raises(WireError, match="plain"):
        encode({}, kind="update", meta={"x": {1, 2}})
    with pytest.raises(WireError, match="meta must be a dict"):
        encode({}, kind="update", meta=[1])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- hostile input


def test_oversized_message_is_refused_before_parsing():
    data = encode({"w": np.zeros(1000, np.float32)}, kind="update")
    assert decode(data, max_bytes=len(data)).tree["w"].shape == (1000,)
    with pytest.raises(WireError, match="over the limit"):
        decode(data, max_bytes=len(data) - 1)
    with pytest.raises(WireError, match="over the limit"):
        decode(b"\x00" * (64 * 1024 * 1024 + 1))


@pytest.mark.parametrize(
    "data",
    [
        _raw_message({"w": msgpack.ExtType(5, b"abcd")}),
        _raw_message(msgpack.ExtType(1, b"")),
        _raw_message({}, meta={"when": msgpack.Timestamp(1, 0)}),
        b"\xd6\xff\x00\x00\x00\x01",  # fixext 4 of type -1: a timestamp
        b"\xc7\x00\x05",  # ext 8 of length 0
    ],
    ids=["ext-leaf", "empty-ext-tree", "timestamp", "bare-timestamp", "empty-ext"],
)
def test_extension_types_are_refused(data):
    with pytest.raises(WireError):
        decode(data)


def test_deep_nesting_is_refused():
    tree = _leaf()
    for _ in range(MAX_DEPTH + 1):
        tree = [tree]
    with pytest.raises(WireError, match="deeper"):
        decode(_raw_message(tree))
    meta: object = 1
    for _ in range(MAX_DEPTH + 2):
        meta = {"m": meta}
    with pytest.raises(WireError, match="deeper"):
        decode(_raw_message({}, meta=meta))
    with pytest.raises(WireError):
        decode(b"\x91" * 100_000 + b"\xc0")  # beyond msgpack's own stack


@pytest.mark.parametrize(
    ("leaf", "match"),
    [
        (_leaf(data=b"\x00" * 7), "7 data bytes, expected 8"),
        (_leaf(data=b"\x00" * 9), "9 data bytes"),
        (_leaf(shape=(0,), data=b"\x00"), "expected 0"),
        (_leaf(dtype="object", data=b"\x00" * 16), "not allowed"),
        (_leaf(dtype="V8", data=b"\x00" * 16), "not allowed"),
        (_leaf(dtype="<f4"), "not allowed"),
        (_leaf(dtype="complex64", data=b"\x00" * 16), "not allowed"),
        (_leaf(dtype=7), "not allowed"),
        ({"dtype": "float32", "shape": [-2], "data": b""}, "dimension"),
        ({"dtype": "float32", "shape": [True], "data": b"\x00" * 4}, "dimension"),
        ({"dtype": "float32", "shape": [2.0], "data": b"\x00" * 8}, "dimension"),
        ({"dtype": "float32", "shape": 2, "data": b"\x00" * 8}, "shape"),
        ({"dtype": "float32", "shape": [1] * 33, "data": b"\x00" * 4}, "shape"),
        ({"dtype": "float32", "shape": [0, 2**40], "data": b""}, "dimension"),
        ({"dtype": "float32", "shape": [0] + [2**31 - 1] * 31, "data": b""}, "cannot build|dimension"),
        ({"dtype": "float32", "shape": [2], "data": b"\x00" * 8, "extra": 1}, "exactly the keys"),
        ({"dtype": "float32", "shape": [2]}, "expected a map"),
        ({"w": 1.5}, "expected a map"),
        ({"w": "text"}, "expected a map"),
    ],
)
def test_malformed_leaves_are_refused(leaf, match):
    with pytest.raises(WireError, match=match):
        decode(_raw_message({"prompt": leaf}))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        (msgpack.packb({"format": "fedprompt.wire"}), "missing"),
        (_raw_message({}, extra=1), "unexpected"),
        (_raw_message({}, format="other"), "not a fedprompt.wire"),
        (_raw_message({}, version=2), "version"),
        (_raw_message({}, version=True), "version"),
        (_raw_message({}, kind=""), "kind"),
        (_raw_message({}, kind=3), "kind"),
        (_raw_message({}, round=-1), "round"),
        (_raw_message({}, round=1.0), "round"),
        (_raw_message({}, round=False), "round"),
        (_raw_message({}, fingerprint=b"ab"), "fingerprint"),
        (_raw_message({}, meta=[1]), "meta"),
        (msgpack.packb({1: 2}), "msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "msgpack"),
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),
        (b"\xa3\xff\xfe\xfd", "msgpack"),  # invalid UTF-8 in a str
        (b"\xdd\xff\xff\xff\xff", "msgpack"),  # an array claiming 4 billion entries
        (b"\xc6\x7f\xff\xff\xff", "msgpack"),  # a 2 GiB bin in a 5-byte message
    ],
)
def test_malformed_messages_are_refused(data, match):
    with pytest.raises(WireError, match=match):
        decode(data)


def test_decode_refuses_non_bytes():
    with pytest.raises(WireError):
        decode("not bytes")  # type: ignore[arg-type]


def test_wire_error_is_a_fedprompt_value_error():
    assert issubclass(WireError, FedPromptError) and issubclass(WireError, ValueError)


VALID = encode(
    {"prompt": {"embeddings": _array(np.float32, (4, 3))}, "head": [_array(ml_dtypes.bfloat16, (3, 2)), None]},
    kind="update",
    round=5,
    fingerprint="ab" * 8,
    meta={"examples": 64, "loss": 0.25, "name": "client-3"},
)


def _decode_only_wire_errors(data: bytes) -> None:
    try:
        decode(data, max_bytes=4096)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_wire_error(data):
    _decode_only_wire_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_after_a_map_header_raise_only_wire_error(tail):
    _decode_only_wire_errors(b"\x87" + tail)  # a 7-entry map, like a real message


@st.composite
def mutated_messages(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        index = draw(st.integers(0, max(0, len(data) - 1)))
        if operation == "flip" and data:
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and data:
            data[index] = draw(st.integers(0, 255))
        elif operation == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[index : index + draw(st.integers(1, 8))]
        else:
            del data[index:]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(mutated_messages())
def test_mutated_messages_raise_only_wire_error(data):
    _decode_only_wire_errors(data)


def _containers_of(children):
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    _containers_of,
    max_leaves=12,
)
FIELDS = ["format", "version", "kind", "round", "fingerprint", "meta", "tree", "dtype", "shape", "data"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), PLAIN, max_size=3))
def test_well_formed_msgpack_with_wrong_fields_raises_only_wire_error(replacements):
    header = {key: value for key, value in replacements.items() if key not in ("tree", "dtype", "shape", "data")}
    leaf = {**_leaf(), **{key: replacements[key] for key in ("dtype", "shape", "data") if key in replacements}}
    tree = replacements.get("tree", {"prompt": leaf})
    _decode_only_wire_errors(_raw_message(tree, **header))


# ----------------------------------------------------------------------------- templates


class _Prefix(NamedTuple):
    keys: np.ndarray
    values: np.ndarray


def _template():
    return {
        "prompt": _Prefix(np.zeros((2, 4, 1, 3), np.float32), np.zeros((2, 4, 1, 3), np.float32)),
        "head": {"w": np.zeros((3, 5), np.float32), "b": np.zeros(5, np.float32), "ids": np.zeros(2, np.int32)},
    }


def test_check_template_accepts_and_rebuilds_containers():
    template = _template()
    tree = decode(encode(template, kind="update")).tree
    assert isinstance(tree["prompt"], list)
    checked = check_template(tree, template)
    assert isinstance(checked["prompt"], _Prefix)
    assert checked["head"]["w"] is tree["head"]["w"]


def _mutate(template, change):
    tree = decode(encode(template, kind="update")).tree
    change(tree)
    return tree


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t["head"].pop("b"), r"head: missing keys \['b'\], unexpected keys \[\]"),
        (lambda t: t["head"].update(extra=np.zeros(1, np.float32)), r"unexpected keys \['extra'\]"),
        (lambda t: t["head"].update(bias=t["head"].pop("b")), r"missing keys \['b'\], unexpected keys \['bias'\]"),
        (lambda t: t["head"].update(w=np.zeros((5, 3), np.float32)), r"head/w: expected shape \(3, 5\), got \(5, 3\)"),
        (lambda t: t["head"].update(w=np.zeros((3, 5), np.float16)), r"head/w: expected dtype float32, got float16"),
        (lambda t: t["head"].update(w=np.zeros((3, 5), ml_dtypes.bfloat16)), "expected dtype float32, got bfloat16"),
        (lambda t: t["head"]["b"].__setitem__(2, np.nan), r"head/b: 1 of 5 values are not finite"),
        (lambda t: t["prompt"][1].__setitem__((0, 0, 0, 0), -np.inf), r"prompt/values: 1 of 24 values are not finite"),
        (lambda t: t["prompt"].pop(), r"prompt: expected a sequence of 2, got 1"),
        (lambda t: t.update(prompt={"keys": 1}), "prompt: expected a sequence"),
        (lambda t: t["head"].update(w={"x": np.zeros(1)}), "head/w: expected an array, got a map"),
        (lambda t: t.update(head=[1]), "head: expected a map"),
    ],
)
def test_check_template_names_the_leaf_and_problem(change, match):
    with pytest.raises(WireError, match=match):
        check_template(_mutate(_template(), change), _template())


def test_check_template_nan_in_bfloat16_and_none_subtrees():
    template = {"x": np.zeros(3, ml_dtypes.bfloat16), "none": None}
    tree = {"x": np.array([0, np.nan, 1], ml_dtypes.bfloat16), "none": None}
    with pytest.raises(WireError, match="x: 1 of 3 values are not finite"):
        check_template(tree, template)
    with pytest.raises(WireError, match="none: expected nothing"):
        check_template({"x": np.zeros(3, ml_dtypes.bfloat16), "none": np.zeros(1)}, template)


def test_check_message_compares_header_fields():
    message = decode(encode({}, kind="update", round=3, fingerprint="ab"))
    assert check_message(message, kind="update", round=3, fingerprint="ab") is message
    with pytest.raises(WireError, match="expected round 4"):
        check_message(message, kind="update", round=4)
    with pytest.raises(WireError, match="expected fingerprint"):
        check_message(message, fingerprint="cd")


# ----------------------------------------------------------------------------- artifact


def _save(path, params=None, **kwargs):
    params = params if params is not None else {"embeddings": _array(np.float32, (20, 16))}
    defaults = {
        "method": "prompt",
        "config": {"num_virtual_tokens": 20, "init": "random"},
        "backbone_name": "minilm",
        "fingerprint": "f" * 64,
    }
    return save_prompt(path, params, **{**defaults, **kwargs})


def test_artifact_round_trip(tmp_path):
    params = {"prompt": {"embeddings": _array(np.float32, (20, 16))},
              "head": {"w": _array(ml_dtypes.bfloat16, (16, 4)), "b": _array(np.float32, (4,))}}
    path = _save(tmp_path / "p.fpp", params, metadata={"rounds": 30, "accuracy": 0.75}, storage="float32")
    loaded = load_prompt(path)
    _assert_same_tree(loaded.trainable(), params)
    assert loaded.method == "prompt" and loaded.backbone.name == "minilm" and loaded.fingerprint == "f" * 64
    assert loaded.prompt_config.num_virtual_tokens == 20 and loaded.prompt_config.init == "random"
    assert loaded.training["rounds"] == 30 and loaded.metadata == {"accuracy": 0.75}
    assert loaded.task.num_labels == 4
    assert loaded.created.endswith("Z") and loaded.created[:2] == "20"
    assert decode(path.read_bytes()).kind == "prompt"


def test_artifact_metadata_cannot_override_reserved_keys(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        _save(tmp_path / "p.fpp", metadata={"method": "other"})
    assert not list(tmp_path.iterdir())


def test_truncated_or_missing_artifact_raises_wire_error(tmp_path):
    path = _save(tmp_path / "p.fpp")
    data = path.read_bytes()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(WireError, match="p.fpp"):
            load_prompt(path)
    with pytest.raises(WireError, match="missing.fpp"):
        load_prompt(tmp_path / "missing.fpp")
    with pytest.raises(WireError, match="over the limit"):
        path.write_bytes(data)
        load_prompt(path, max_bytes=100)


def test_artifact_of_the_wrong_kind_raises_wire_error(tmp_path):
    path = tmp_path / "update.fpp"
    path.write_bytes(encode({"x": np.zeros(2, np.float32)}, kind="update", fingerprint="ab"))
    with pytest.raises(WireError, match="not a prompt artifact"):
        load_prompt(path)
    path.write_bytes(encode({"x": np.zeros(2, np.float32)}, kind="prompt", fingerprint="ab", meta={"method": "prompt"}))
    with pytest.raises(WireError, match="schema version"):
        load_prompt(path)


def test_save_is_atomic_when_the_encoder_fails(tmp_path, monkeypatch):
    path = _save(tmp_path / "p.fpp")
    before = path.read_bytes()

    def failing_encode(*args, **kwargs):
        raise WireError("boom")

    monkeypatch.setattr(artifact, "encode", failing_encode)
    with pytest.raises(WireError, match="boom"):
        _save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.fpp"]


def test_save_is_atomic_when_writing_fails_midway(tmp_path, monkeypatch):
    path = _save(tmp_path / "p.fpp")
    before = path.read_bytes()
    seen = []

    def failing_fsync(fd):
        seen.append(sorted(os.listdir(tmp_path)))  # the temporary file exists at this point
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        _save(path, {"embeddings": np.ones((20, 16), np.float32)})
    assert len(seen[0]) == 2 and seen[0][0].startswith(".p.fpp.") and seen[0][0].endswith(".tmp")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.fpp"]
    with pytest.raises(OSError):
        write_atomic(tmp_path / "new.bin", b"data")
    assert sorted(os.listdir(tmp_path)) == ["p.fpp"]


def test_fuzz_target_survives_a_short_run():
    """The standalone fuzz target (tests/fuzz_wire_decoder.py) on 300 seeded inputs."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fuzz_wire_decoder", Path(__file__).with_name("fuzz_wire_decoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for data in module._mutations(np.random.default_rng(1), 300):
        module.target(data)
