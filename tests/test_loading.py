"""load_backbone: folders, sharded checkpoints, built-in names, hub ids, fingerprints, bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DECODERS, FIXTURES, TINY, tiny_backbone
from safetensors.numpy import load_file, save_file

import fedprompt
from fedprompt.errors import (
    CheckpointError,
    EmptyBatchError,
    FedPromptError,
    InputError,
    ModelNotFoundError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
)


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


@pytest.mark.parametrize("name", TINY)
def test_loaded_backbone_matches_golden(name):
    """Through the public loader, without a prompt, outputs equal transformers' to 1e-4."""
    bb = tiny_backbone(name)
    g = np.load(FIXTURES / name / "golden.npz")
    out = bb.forward(g["input_ids"], g["attention_mask"])
    keep = g["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(out.hidden)[keep], g["hidden"][keep], atol=1e-4, rtol=1e-4)
    if name in DECODERS:
        np.testing.assert_allclose(np.asarray(out.logits)[keep], g["logits"][keep], atol=1e-4, rtol=1e-4)
    else:
        assert out.logits is None


def test_sharded_checkpoint_loads_identically(tmp_path):
    folder = _copy("llama", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = fedprompt.load_backbone(folder)
    single = tiny_backbone("llama")
    assert sharded.fingerprint == single.fingerprint
    ids = np.arange(5, 13, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(sharded.forward(ids).logits), np.asarray(single.forward(ids).logits))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        fedprompt.load_backbone(folder)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    base = tiny_backbone("bert")
    assert fedprompt.load_backbone(FIXTURES / "bert").fingerprint == base.fingerprint
    changed_weight = _copy("bert", tmp_path / "w")
    tensors = load_file(changed_weight / "model.safetensors")
    tensors["encoder.layer.1.output.dense.weight"][0, 0] += 1e-3
    save_file(tensors, changed_weight / "model.safetensors")
    assert fedprompt.load_backbone(changed_weight).fingerprint != base.fingerprint
    changed_config = _copy("bert", tmp_path / "c")
    cfg = json.loads((changed_config / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (changed_config / "config.json").write_text(json.dumps(cfg))
    assert fedprompt.load_backbone(changed_config).fingerprint != base.fingerprint


def test_builtin_minilm_resolves_from_the_installed_package():
    folder, name = fedprompt.backbones.loading.resolve_checkpoint("minilm")
    assert name == "minilm" and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_unknown_names_and_uncached_hub_ids_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        fedprompt.load_backbone("some-org/some-model")
    with pytest.raises(ModelNotFoundError, match="built-in"):
        fedprompt.load_backbone("no_such_model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        fedprompt.load_backbone(tmp_path / "file.txt")


def test_bad_checkpoints_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        fedprompt.load_backbone(empty)
    folder = _copy("gpt2", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(UnsupportedArchitectureError, match="t5"):
        fedprompt.load_backbone(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(folder / "model.safetensors")
    missing = next(k for k in tensors if "h.1.mlp" in k)
    save_file({k: v for k, v in tensors.items() if k != missing}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        fedprompt.load_backbone(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        fedprompt.load_backbone(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        fedprompt.load_backbone(folder)


def test_bad_forward_inputs_give_library_errors():
    bb = tiny_backbone("bert")
    with pytest.raises(InputError, match="batch, tokens"):
        bb.forward(np.ones(4, np.int32))
    with pytest.raises(EmptyBatchError):
        bb.forward(np.ones((0, 4), np.int32))
    with pytest.raises(InputError, match="attention_mask"):
        bb.forward(np.ones((2, 4), np.int32), np.ones((2, 5), np.int32))
    limit = bb.config.max_positions
    with pytest.raises(SequenceTooLongError, match="virtual"):
        bb.forward(np.ones((1, limit - 2), np.int32), prompt=fedprompt.SoftPrompt(jnp.zeros((3, bb.width))))
    assert issubclass(SequenceTooLongError, FedPromptError)


def test_library_imports_without_torch():
    """With torch made unimportable, load MiniLM, tokenize and run a forward pass."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; import fedprompt; bb = fedprompt.load_backbone('minilm'); "
        "enc = bb.tokenize(['hello world'], 4); bb.forward(enc['input_ids'], enc['attention_mask']); "
        "print(enc['input_ids'].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[[101, 7592, 2088, 102]]", out.stderr
