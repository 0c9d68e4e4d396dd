"""The prompt artifact (schema v2) and PEFT adapters, against PEFT's own files and outputs.

The fixtures under tests/fixtures/peft/ were written once by tests/make_peft_golden.py with
torch + transformers + PEFT 0.21.2; nothing here imports torch or peft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import struct
import tempfile
import types
import warnings

import jax
import numpy as np
import pytest
from conftest import FIXTURES, tiny_backbone
from hypothesis import given, settings
from hypothesis import strategies as st

import fedprompt
from fedprompt.errors import ArtifactError, ConfigError, FedPromptError, PromptMismatchError, WireError
from fedprompt.prompts import Prefix, PromptConfig, SoftPrompt, materialize
from fedprompt.wire import peft as fp_peft
from fedprompt.wire.artifact import SCHEMA_VERSION, load_prompt, save_prompt
from fedprompt.wire.codec import decode, encode

PEFT = FIXTURES / "peft"
REPORT = json.loads((PEFT / "report.json").read_text())
CASES = sorted(REPORT["cases"])


def _case(name):
    """(fixture backbone, PEFT task type) of a case folder name."""
    task_type = "SEQ_CLS" if name.endswith("seq_cls") else "FEATURE_EXTRACTION" if name.endswith("features") else "CAUSAL_LM"
    return name.split("_")[0], task_type


def _artifact_from_peft(name, tmp_path, storage="float32"):
    """PEFT's adapter -> fedprompt params -> an .fpp (with the SEQ_CLS classifier as the head)."""
    fixture, task_type = _case(name)
    backbone = tiny_backbone(fixture)
    adapter = fp_peft.read_peft_adapter(PEFT / name)
    params = {"prompt": adapter.params, "head": {}}
    task = None
    if task_type == "SEQ_CLS":
        tensors = fp_peft.read_safetensors(PEFT / name / fp_peft.ADAPTER_WEIGHTS)
        params["head"] = {"w": tensors["base_model.classifier.weight"].T.copy(), "b": tensors["base_model.classifier.bias"]}
        task = fedprompt.SequenceClassification(num_labels=3, pooling="cls")
    path = save_prompt(tmp_path / f"{name}.fpp", params, config=adapter.prompt_config, backbone=backbone, task=task, storage=storage)
    return load_prompt(path, backbone=backbone), adapter, task_type


# ----------------------------------------------------------------------------- PEFT semantics


@pytest.mark.parametrize("name", CASES)
def test_peft_adapter_reproduces_peft_outputs(name):
    """Importing PEFT's saved adapter and running our forward gives PEFT's outputs to 1e-4."""
    fixture, _ = _case(name)
    backbone = tiny_backbone(fixture)
    config, params = fp_peft.import_peft(PEFT / name)
    golden = np.load(PEFT / name / "outputs.npz")
    prompt = materialize(config, params, backbone.config)
    out = backbone.forward(golden["input_ids"], golden["attention_mask"], prompt)
    mask = np.asarray(out.attention_mask, bool)  # virtual tokens (soft prompt) first, then the text
    if "logits" in golden:
        got, want = np.asarray(out.logits), golden["logits"]
    else:
        got, want = np.asarray(out.hidden), golden["hidden"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert config.num_virtual_tokens == 3
    if "prefix" in name:
        assert isinstance(prompt, Prefix) and config.method == "prefix"
        assert prompt.keys.shape == (backbone.config.num_layers, 3, backbone.config.num_kv_heads, backbone.config.head_dim)
    else:
        assert isinstance(prompt, SoftPrompt) and prompt.embeddings.shape == (3, backbone.width)


@pytest.mark.parametrize("name", CASES)
def test_export_writes_the_files_peft_writes(name, tmp_path):
    """fedprompt's export of PEFT's prompt: the same config fields and a byte-identical weights file."""
    artifact, adapter, task_type = _artifact_from_peft(name, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SEQ_CLS head warning
        out = fp_peft.export_peft(artifact, tmp_path / "ours", base_model_name_or_path=adapter.base_model_name_or_path,
                                  task_type=task_type)
    ours = json.loads((out / fp_peft.ADAPTER_CONFIG).read_text())
    theirs = json.loads((PEFT / name / fp_peft.ADAPTER_CONFIG).read_text())
    assert set(ours) == set(theirs)
    for key in theirs:
        if key == "modules_to_save" and theirs[key] is not None:
            assert set(ours[key]) == set(theirs[key])  # PEFT 0.21 lists the classifier names twice
        elif key == "prefix_projection":
            assert ours[key] is False  # PEFT saved the projected prefix; ours says it is plain
        elif key == "encoder_hidden_size":
            assert ours[key] == ours["token_dim"]
        else:
            assert ours[key] == theirs[key], key
    weights = (out / fp_peft.ADAPTER_WEIGHTS).read_bytes()
    assert weights == (PEFT / name / fp_peft.ADAPTER_WEIGHTS).read_bytes()
    # ... and it is the export that PEFT loaded with PeftModel.from_pretrained when the fixtures were made.
    entry = REPORT["cases"][name]
    assert entry["peft_loaded_fedprompt_export"] is True
    assert entry["max_abs_diff_vs_peft_adapter"] < 1e-6
    assert hashlib.sha256(weights).hexdigest() == entry["export_weights_sha256"]
    assert ours == entry["export_config"]


def test_report_covers_both_methods_and_task_types():
    kinds = {(json.loads((PEFT / n / fp_peft.ADAPTER_CONFIG).read_text())["peft_type"],
              json.loads((PEFT / n / fp_peft.ADAPTER_CONFIG).read_text())["task_type"]) for n in CASES}
    assert {("PROMPT_TUNING", "CAUSAL_LM"), ("PREFIX_TUNING", "CAUSAL_LM"), ("PROMPT_TUNING", "SEQ_CLS"),
            ("PREFIX_TUNING", "SEQ_CLS"), ("PROMPT_TUNING", "FEATURE_EXTRACTION"), ("PREFIX_TUNING", "FEATURE_EXTRACTION")} <= kinds
    assert json.loads((PEFT / "gpt2_prefix_projection" / fp_peft.ADAPTER_CONFIG).read_text())["prefix_projection"] is True
    assert REPORT["peft_version"] == fp_peft.PEFT_VERSION


def test_llama_prefix_uses_pefts_grouped_query_layout():
    config = json.loads((PEFT / "llama_prefix" / fp_peft.ADAPTER_CONFIG).read_text())
    cfg = tiny_backbone("llama").config
    assert cfg.num_kv_heads < cfg.num_heads
    assert config["num_attention_heads"] == cfg.num_kv_heads and config["token_dim"] == cfg.num_kv_heads * cfg.head_dim


def test_reparameterized_prefix_is_folded_on_export(tmp_path):
    backbone = tiny_backbone("gpt2")
    config = PromptConfig(method="prefix", num_virtual_tokens=4, reparameterize=True, reparam_hidden=8)
    params = fedprompt.init_prompt(config, backbone, jax.random.key(3))
    path = save_prompt(tmp_path / "r.fpp", params, config=config, backbone=backbone, task=fedprompt.CausalLM(), storage="float32")
    artifact = load_prompt(path, backbone=backbone)
    assert artifact.prompt_config.reparameterize
    fp_peft.export_peft(artifact, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / fp_peft.ADAPTER_CONFIG).read_text())
    assert saved["prefix_projection"] is False and saved["task_type"] == "CAUSAL_LM"
    config2, params2 = fp_peft.import_peft(tmp_path / "out")
    ids = np.array([[5, 6, 7, 8]], np.int32)
    a = backbone.forward(ids, None, materialize(config, params, backbone.config)).logits
    b = backbone.forward(ids, None, materialize(config2, params2, backbone.config)).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_export_round_trips_head_and_task(tmp_path):
    backbone = tiny_backbone("bert")
    rng = np.random.default_rng(0)
    trainable = {"prompt": {"embeddings": rng.normal(size=(3, 32)).astype(np.float32)},
                 "head": {"w": rng.normal(size=(32, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}}
    path = save_prompt(tmp_path / "c.fpp", trainable, config=PromptConfig(num_virtual_tokens=3), backbone=backbone,
                       task=fedprompt.SequenceClassification(4), label_names=["a", "b", "c", "d"], storage="float32")
    fp_peft.export_peft(load_prompt(path), tmp_path / "out")
    adapter = fp_peft.read_peft_adapter(tmp_path / "out")
    assert adapter.task_type == "FEATURE_EXTRACTION" and adapter.extra_tensors == ()
    np.testing.assert_array_equal(adapter.params["embeddings"], trainable["prompt"]["embeddings"])
    np.testing.assert_array_equal(adapter.head["w"], trainable["head"]["w"])
    np.testing.assert_array_equal(adapter.head["b"], trainable["head"]["b"])
    assert adapter.task.label_names == ("a", "b", "c", "d") and adapter.task.pooling == "mean"
    with pytest.warns(UserWarning, match="pooler"):
        fp_peft.export_peft(load_prompt(path), tmp_path / "seq", task_type="SEQ_CLS")
    assert fp_peft.read_peft_adapter(tmp_path / "seq").extra_tensors == ("base_model.classifier.bias", "base_model.classifier.weight")
    with pytest.raises(ConfigError, match="CAUSAL_LM needs a decoder"):
        fp_peft.export_peft(load_prompt(path), tmp_path / "lm", task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="task_type must be"):
        fp_peft.export_peft(load_prompt(path), tmp_path / "x", task_type="LORA")


# ----------------------------------------------------------------------------- hostile adapters


def _copy_case(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    for f in (fp_peft.ADAPTER_CONFIG, fp_peft.ADAPTER_WEIGHTS):
        (folder / f).write_bytes((PEFT / name / f).read_bytes())
    return folder


def test_import_refuses_other_methods_and_bad_files(tmp_path):
    folder = _copy_case("gpt2_prefix", tmp_path)
    config = json.loads((folder / fp_peft.ADAPTER_CONFIG).read_text())
    for change, match in [
        ({"peft_type": "LORA"}, "peft_type 'LORA' is not supported"),
        ({"peft_type": "P_TUNING"}, "not supported"),
        ({"num_transformer_submodules": 2}, "encoder-decoder"),
        ({"num_virtual_tokens": 4}, "expected"),
        ({"num_layers": "2"}, "num_layers must be a positive integer"),
        ({"token_dim": 31}, "not divisible"),
    ]:
        (folder / fp_peft.ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(ArtifactError, match=match):
            fp_peft.import_peft(folder)
    (folder / fp_peft.ADAPTER_CONFIG).write_text("[1, 2")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        fp_peft.import_peft(folder)
    (folder / fp_peft.ADAPTER_CONFIG).write_text(json.dumps(config))
    (folder / fp_peft.ADAPTER_WEIGHTS).rename(folder / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="pickle"):
        fp_peft.import_peft(folder)
    with pytest.raises(ArtifactError, match="not a folder"):
        fp_peft.import_peft(tmp_path / "missing")


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01", "too short"),
        (struct.pack("<Q", 2**40), "header length"),
        (_safetensors({"prompt_embeddings": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "dtype"),
        (_safetensors({"prompt_embeddings": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)), "declares 8 bytes of data, but its shape and dtype need 16"),
        (_safetensors({"prompt_embeddings": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
        (_safetensors({"prompt_embeddings": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                      np.array([np.nan], np.float32).tobytes()), "not finite"),
        (_safetensors({"prompt_embeddings": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, bytes(4)), "shape"),
        (struct.pack("<Q", 3) + b"\xff\xfe\x00", "not valid JSON"),
    ],
)
def test_hostile_safetensors_raise_artifact_error(tmp_path, blob, match):
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ArtifactError, match=match):
        fp_peft.read_safetensors(path)


def test_bfloat16_and_float16_adapters_are_read():
    import ml_dtypes

    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    for name, dtype in (("BF16", ml_dtypes.bfloat16), ("F16", np.float16)):
        raw = data.astype(dtype).tobytes()
        blob = _safetensors({"__metadata__": {"format": "pt"}, "t": {"dtype": name, "shape": [2, 3], "data_offsets": [0, len(raw)]}}, raw)
        path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        path.write_bytes(blob)
        got = fp_peft.read_safetensors(path)["t"]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got.astype(np.float32), data)


# ----------------------------------------------------------------------------- the artifact


def _demo_trainable(seed=0, p=20, d=384, c=26):
    rng = np.random.default_rng(seed)
    return {"prompt": {"embeddings": rng.normal(size=(p, d)).astype(np.float32)},
            "head": {"w": (rng.normal(size=(d, c)) / np.sqrt(d)).astype(np.float32), "b": rng.normal(size=c).astype(np.float32) * 0.1}}


def _save_demo(path, storage="float16", **kwargs):
    defaults = dict(config=PromptConfig(num_virtual_tokens=20), backbone_name="minilm", fingerprint="f" * 32,
                    label_names=[f"noun.{i}" for i in range(26)], training={"rounds": 15, "clients": 16, "algorithm": "fedavg",
                                                                              "privacy_epsilon": None})
    return save_prompt(path, _demo_trainable(), storage=storage, **{**defaults, **kwargs})


def test_default_demo_prompt_is_under_64_kb(tmp_path):
    sizes = {s: _save_demo(tmp_path / f"{s}.fpp", storage=s).stat().st_size for s in ("float32", "float16", "int8")}
    defaults = dict(config=PromptConfig(num_virtual_tokens=20), backbone_name="minilm", fingerprint="f" * 32,
                    label_names=[f"noun.{i}" for i in range(26)])
    default = save_prompt(tmp_path / "default.fpp", _demo_trainable(), **defaults).stat().st_size
    fp16 = save_prompt(tmp_path / "fp16.fpp", _demo_trainable(), storage="float16", **defaults).stat().st_size
    assert sizes["float32"] > 64 * 1024  # why float16 is the default
    assert default == fp16 and sizes["float16"] < 40 * 1024
    assert sizes["int8"] < 24 * 1024


@pytest.mark.parametrize("storage, tolerance", [("float32", 0.0), ("float16", 2e-3), ("int8", None)])
def test_storage_round_trip(tmp_path, storage, tolerance):
    trainable = _demo_trainable()
    artifact = load_prompt(_save_demo(tmp_path / "p.fpp", storage=storage))
    assert artifact.storage == storage
    for got, want in ((artifact.params["embeddings"], trainable["prompt"]["embeddings"]), (artifact.head["w"], trainable["head"]["w"])):
        assert got.dtype == np.float32 and got.shape == want.shape
        if storage == "int8":  # per-row scales: the error is at most half a step of each row
            step = np.max(np.abs(want), axis=-1, keepdims=True) / 127
            assert np.all(np.abs(got - want) <= step / 2 + 1e-7)
        else:
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance)
        assert artifact.tensors["prompt/embeddings"]["storage"] == storage


def test_float16_keeps_out_of_range_leaves_exact(tmp_path):
    trainable = _demo_trainable()
    trainable["prompt"]["embeddings"][0, 0] = 1e6
    path = save_prompt(tmp_path / "p.fpp", trainable, config=PromptConfig(num_virtual_tokens=20), backbone_name="m", fingerprint="f")
    artifact = load_prompt(path)
    assert artifact.tensors["prompt/embeddings"]["storage"] == "float32" and artifact.tensors["head/w"]["storage"] == "float16"
    np.testing.assert_array_equal(artifact.params["embeddings"], trainable["prompt"]["embeddings"])


def test_schema_fields(tmp_path):
    backbone = tiny_backbone("gpt2")
    config = PromptConfig(method="prefix", num_virtual_tokens=2, random_std=0.02)
    trainable = fedprompt.init_trainable(backbone, config, fedprompt.SequenceClassification(3), jax.random.key(0))
    path = save_prompt(tmp_path / "p.fpp", jax.device_get(trainable), config=config, backbone=backbone,
                       task=fedprompt.SequenceClassification(3), label_names=["x", "y", "z"],
                       training={"rounds": 3, "clients": 4, "algorithm": "fedadam", "privacy_epsilon": 2.5},
                       metadata={"note": "hello"})
    artifact = load_prompt(path, backbone=backbone)
    assert artifact.schema_version == SCHEMA_VERSION == 2 and artifact.method == "prefix"
    assert artifact.prompt_config == config
    assert artifact.backbone.fingerprint == backbone.fingerprint == artifact.fingerprint
    assert artifact.backbone.model_type == "gpt2" and artifact.backbone.num_kv_heads == 4 and artifact.backbone.is_decoder
    assert artifact.task.label_names == ("x", "y", "z") and artifact.task.pooling == "last" and artifact.task.num_labels == 3
    assert artifact.training == {"rounds": 3, "clients": 4, "algorithm": "fedadam", "privacy_epsilon": 2.5}
    assert artifact.metadata == {"note": "hello"} and artifact.created.endswith("Z")
    assert artifact.checksum == "sha256:" + hashlib.sha256(decode(path.read_bytes()).tree["content"].tobytes()).hexdigest()
    described = artifact.describe()
    assert described["tensors"]["prompt/keys"]["shape"] == [2, 2, 4, 8] and described["file_bytes"] == path.stat().st_size
    json.dumps(described)  # JSON-able
    task = artifact.task.to_task()
    assert isinstance(task, fedprompt.SequenceClassification) and task.num_labels == 3


def test_legacy_call_of_run_py_still_writes_a_complete_schema(tmp_path):
    """run.py's call (method=, config=dict, backbone_name=, fingerprint=, metadata=...) keeps working."""
    trainable = _demo_trainable(p=4)
    path = save_prompt(tmp_path / "p.fpp", trainable, method="prompt", config=dataclasses.asdict(PromptConfig(num_virtual_tokens=4)),
                       backbone_name="minilm", fingerprint="ab",
                       metadata={"label_names": [str(i) for i in range(26)], "algorithm": "fedavg", "rounds": 2, "clients": 4,
                                 "final_accuracy": 0.5})
    artifact = load_prompt(path)
    assert artifact.training == {"rounds": 2, "clients": 4, "algorithm": "fedavg", "privacy_epsilon": None, "final_accuracy": 0.5}
    assert artifact.task.num_labels == 26 and artifact.label_names[3] == "3" and artifact.metadata == {}
    with pytest.raises(ConfigError, match="reserved"):
        save_prompt(tmp_path / "q.fpp", trainable, config=PromptConfig(num_virtual_tokens=4), backbone_name="m", fingerprint="f",
                    metadata={"task": 1})
    with pytest.raises(ConfigError, match="disagrees"):
        save_prompt(tmp_path / "q.fpp", trainable, method="prefix", config=PromptConfig(num_virtual_tokens=4), backbone_name="m",
                    fingerprint="f")
    with pytest.raises(ConfigError, match="storage"):
        save_prompt(tmp_path / "q.fpp", trainable, config=PromptConfig(num_virtual_tokens=4), backbone_name="m", fingerprint="f",
                    storage="int4")
    with pytest.raises(ConfigError, match="do not fit"):
        save_prompt(tmp_path / "q.fpp", trainable, config=PromptConfig(num_virtual_tokens=5), backbone_name="m", fingerprint="f")
    bad = _demo_trainable(p=4)
    bad["head"]["b"][0] = np.nan
    with pytest.raises(WireError, match="not finite"):
        save_prompt(tmp_path / "q.fpp", bad, config=PromptConfig(num_virtual_tokens=4), backbone_name="m", fingerprint="f")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.fpp"]


def test_flipped_byte_is_a_checksum_error(tmp_path):
    path = _save_demo(tmp_path / "p.fpp")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"p\.fpp: checksum mismatch: the file is corrupted"):
        load_prompt(path)


def test_truncated_missing_and_foreign_files(tmp_path):
    path = _save_demo(tmp_path / "p.fpp")
    data = path.read_bytes()
    for cut in (0, 1, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="p.fpp"):
            load_prompt(path)
    with pytest.raises(ArtifactError, match="missing.fpp"):
        load_prompt(tmp_path / "missing.fpp")
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match="over the limit"):
        load_prompt(path, max_bytes=100)
    path.write_bytes(encode({"x": np.zeros(2, np.float32)}, kind="update", fingerprint="ab"))
    with pytest.raises(ArtifactError, match="not a prompt artifact"):
        load_prompt(path)
    # A file of the first format (no schema, no checksum) is refused with a clear message.
    path.write_bytes(encode({"embeddings": np.zeros((2, 4), np.float32)}, kind="prompt", fingerprint="ab",
                            meta={"method": "prompt", "prompt_config": {}, "backbone": "m", "created": "x"}))
    with pytest.raises(ArtifactError, match="schema version 2"):
        load_prompt(path)


def _reencode(path, mutate_envelope=None, mutate_content=None):
    """Rewrites an artifact with a changed envelope or content (content changes get a fresh checksum)."""
    envelope = decode(path.read_bytes())
    content = decode(envelope.tree["content"].tobytes())
    meta, tree = dict(content.meta), content.tree
    if mutate_content:
        meta, tree = mutate_content(meta, tree)
    blob = encode(tree, kind=content.kind, fingerprint=content.fingerprint, meta=meta)
    env_meta = {**envelope.meta, "checksum": "sha256:" + hashlib.sha256(blob).hexdigest()}
    fingerprint = envelope.fingerprint
    if mutate_envelope:
        env_meta, fingerprint = mutate_envelope(env_meta, fingerprint)
    path.write_bytes(encode({"content": np.frombuffer(blob, np.uint8)}, kind="prompt", fingerprint=fingerprint, meta=env_meta))


@pytest.mark.parametrize(
    "envelope, content, match",
    [
        (lambda m, f: ({**m, "schema_version": 3}, f), None, "unsupported schema version 3"),
        (lambda m, f: ({**m, "checksum": "md5:x"}, f), None, "no valid checksum"),
        (lambda m, f: (m, "other"), None, "fingerprint"),
        (None, lambda m, t: ({**m, "method": "prefix"}, t), "disagrees"),
        (None, lambda m, t: ({k: v for k, v in m.items() if k != "backbone"}, t), "'backbone' is missing"),
        (None, lambda m, t: ({**m, "prompt_config": {**m["prompt_config"], "num_virtual_tokens": -1}}, t), "invalid prompt config"),
        (None, lambda m, t: ({**m, "prompt_config": {**m["prompt_config"], "evil": 1}}, t), "unknown prompt config fields"),
        (None, lambda m, t: ({**m, "task": {"type": "sequence_classification", "num_labels": 26, "label_names": [1] * 26,
                                          "pooling": None, "verbalizer": None}}, t), "label_names"),
        (None, lambda m, t: ({**m, "task": {"type": "regression"}}, t), "unknown task type"),
        (None, lambda m, t: ({**m, "storage": "int4"}, t), "unknown storage"),
        (None, lambda m, t: (m, {**t, "prompt": {"embeddings": t["prompt"]["embeddings"][:5]}}), "do not fit"),
        (None, lambda m, t: (m, {**t, "head": {}}), r"declares .*head/w \(384, 26\).* but holds only"),
        (None, lambda m, t: (m, {**t, "prompt": {"embeddings": np.full((20, 384), np.inf, np.float16)}}), "not finite"),
        (None, lambda m, t: ({**m, "tensors": {}}, t), "no valid 'tensors' record"),
        (None, lambda m, t: (m, {k: v for k, v in t.items() if k != "scales"}), "exactly the keys"),
        (None, lambda m, t: ({**m, "backbone": {**m["backbone"], "hidden_size": True}}, t), "hidden_size"),
    ],
)
def test_malformed_schema_raises_artifact_error(tmp_path, envelope, content, match):
    path = _save_demo(tmp_path / "p.fpp")
    _reencode(path, envelope, content)
    with pytest.raises(ArtifactError, match=match):
        load_prompt(path)


def test_int8_scales_are_checked(tmp_path):
    path = _save_demo(tmp_path / "p.fpp", storage="int8")

    def drop_scale(meta, tree):
        return meta, {**tree, "scales": {"prompt": tree["scales"]["prompt"]}}

    _reencode(path, None, drop_scale)
    with pytest.raises(ArtifactError, match="head/w is int8 without a float32 scale"):
        load_prompt(path)


def test_fingerprint_mismatch_is_refused_unless_forced(tmp_path):
    gpt2, llama = tiny_backbone("gpt2"), tiny_backbone("llama")
    config = PromptConfig(num_virtual_tokens=2)
    params = {"embeddings": np.zeros((2, 32), np.float32)}
    path = save_prompt(tmp_path / "p.fpp", params, config=config, backbone=gpt2, task=fedprompt.CausalLM())
    with pytest.raises(PromptMismatchError, match="fingerprint"):
        load_prompt(path, backbone=llama)
    with pytest.warns(UserWarning, match="forced"):
        artifact = load_prompt(path, backbone=llama, force=True)
    assert artifact.backbone.name == "gpt2"
    # A shape mismatch is never forced.
    wider = types.SimpleNamespace(name="wider", fingerprint="other", path=None, is_decoder=True,
                                  config=dataclasses.replace(gpt2.config, hidden_size=64))
    with pytest.raises(PromptMismatchError, match="does not fit"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_prompt(path, backbone=wider, force=True)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_corruption_raises_only_library_errors(tmp_path_factory, data):
    """Flipped, inserted or deleted bytes anywhere never escape as anything but FedPromptError."""
    path = tmp_path_factory.mktemp("fuzz") / "p.fpp"
    blob = bytearray(_save_demo(path, storage=data.draw(st.sampled_from(["float16", "int8"]))).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            blob.insert(i, data.draw(st.integers(0, 255)))
        else:
            del blob[i]
    path.write_bytes(bytes(blob))
    try:
        load_prompt(path)
    except FedPromptError:
        pass


@settings(max_examples=40, deadline=None)
@given(meta=st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=5) | st.floats(allow_nan=False, allow_infinity=False),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=12))
def test_hostile_schema_values_raise_only_library_errors(tmp_path_factory, meta):
    """Any plain value in any schema field gives the library's error, never a crash.

    (Messages carry finite numbers only: NaN and infinities in meta are refused by the codec itself.)
    """
    path = tmp_path_factory.mktemp("schema") / "p.fpp"
    _save_demo(path)
    for field in ("prompt_config", "backbone", "task", "training", "tensors", "created", "method", "storage"):
        _reencode(path, None, lambda m, t, f=field: ({**m, f: meta}, t))
        try:
            load_prompt(path)
        except FedPromptError:
            pass
        _save_demo(path)
