"""`fedprompt inspect / apply / export / import` on tiny fixture backbones (with a small word-level tokenizer)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FIXTURES, with_word_tokenizer

import fedprompt
from fedprompt.cli import main
from fedprompt.inference.generate import generate
from fedprompt.prompts import PromptConfig
from fedprompt.wire import peft as fp_peft
from fedprompt.wire.artifact import load_prompt, save_prompt

LABELS = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        "bert": with_word_tokenizer(FIXTURES / "bert", root / "bert"),
        "gpt2": with_word_tokenizer(FIXTURES / "gpt2", root / "gpt2"),
        "gpt2_other": with_word_tokenizer(FIXTURES / "gpt2", root / "gpt2_other", perturb=True),
    }


@pytest.fixture(scope="module")
def artifacts(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    bert = fedprompt.load_backbone(folders["bert"])
    config = PromptConfig(num_virtual_tokens=3)
    task = fedprompt.SequenceClassification(3)
    trainable = jax.device_get(fedprompt.init_trainable(bert, config, task, jax.random.key(0)))
    classify = save_prompt(root / "classify.fpp", trainable, config=config, backbone=bert, task=task, label_names=LABELS,
                           training={"rounds": 3, "clients": 4, "algorithm": "fedavg", "privacy_epsilon": 1.5}, storage="float32")
    gpt2 = fedprompt.load_backbone(folders["gpt2"])
    pconfig = PromptConfig(method="prefix", num_virtual_tokens=2, random_std=0.5)
    prefix = jax.device_get(fedprompt.init_prompt(pconfig, gpt2, jax.random.key(1)))
    lm = save_prompt(root / "lm.fpp", prefix, config=pconfig, backbone=gpt2, task=fedprompt.CausalLM())
    return {"classify": classify, "lm": lm, "bert": bert, "gpt2": gpt2}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_text_and_json(artifacts, capsys):
    code, out, _ = run_cli(capsys, "inspect", artifacts["classify"])
    assert code == 0
    assert "sequence classification, 3 labels (mean pooling + linear head): cat, dog, fish" in out
    assert "fedavg, 3 rounds, 4 clients, differential privacy epsilon = 1.5" in out
    assert f"fingerprint  {artifacts['bert'].fingerprint}" in out and "prompt/embeddings [3, 32] stored float32" in out
    code, out, _ = run_cli(capsys, "inspect", artifacts["lm"], "--json")
    described = json.loads(out)
    assert code == 0 and described["schema_version"] == 2 and described["method"] == "prefix"
    assert described["task"] == {"type": "causal_lm"} and described["storage"] == "float16"
    assert described["backbone"]["tokenizer_hash"] is not None
    assert described["tensors"]["prompt/keys"] == {"shape": [2, 2, 4, 8], "dtype": "float32", "storage": "float16"}


def test_apply_classifies_with_the_head(artifacts, folders, capsys):
    texts = ["w5 w6 w7", "w40 w41"]
    code, out, err = run_cli(capsys, "apply", artifacts["classify"], "--backbone", folders["bert"], "--text", texts[0],
                             "--text", texts[1], "--json")
    assert code == 0, err
    results = json.loads(out)
    bert = artifacts["bert"]
    artifact = load_prompt(artifacts["classify"], backbone=bert)
    batch = bert.tokenize(texts, 64 - 3, num_virtual=3)  # what apply uses: --max-length capped by the positions
    output = bert.forward(batch["input_ids"], batch["attention_mask"], artifact.materialize(bert.config))
    probs = np.asarray(jax.nn.softmax(artifact.task.to_task().resolve(bert).logits(artifact.head, output), -1))
    for result, row in zip(results, probs):
        assert result["label"] == LABELS[int(np.argmax(row))]
        np.testing.assert_allclose([result["probabilities"][n] for n in LABELS], row, atol=1e-6)
    code, out, _ = run_cli(capsys, "apply", artifacts["classify"], "--backbone", folders["bert"], "--text", texts[0],
                           "--top", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"{results[0]['label']}\tw5 w6 w7" and len(lines) == 3


def test_apply_generates_with_a_decoder(artifacts, folders, capsys):
    code, out, err = run_cli(capsys, "apply", artifacts["lm"], "--backbone", folders["gpt2"], "--text", "w5 w6 w7",
                             "--max-new-tokens", "6", "--json")
    assert code == 0, err
    result = json.loads(out)[0]
    gpt2 = artifacts["gpt2"]
    prompt = load_prompt(artifacts["lm"]).materialize(gpt2.config)
    want = generate(gpt2, prompt, np.array([[5, 6, 7]], np.int32), max_new_tokens=6, eos_token_id=0)[0]
    assert result["tokens"] == want.tolist()
    assert result["generated"] == gpt2.tokenizer.decode(want.tolist(), skip_special_tokens=True)


def test_corrupted_file_exits_2_with_a_checksum_message(artifacts, tmp_path):
    data = bytearray(artifacts["classify"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.fpp"
    bad.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "fedprompt.cli", "inspect", str(bad)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "fedprompt: error:" in done.stderr and "checksum mismatch: the file is corrupted" in done.stderr
    assert "Traceback" not in done.stderr


def test_wrong_backbone_is_refused_unless_forced(artifacts, folders, capsys):
    other = folders["gpt2_other"]
    code, _, err = run_cli(capsys, "apply", artifacts["lm"], "--backbone", other, "--text", "w5", "--max-new-tokens", "2")
    assert code == 2 and "fingerprint" in err and "--force" in err
    code, out, err = run_cli(capsys, "apply", artifacts["lm"], "--backbone", other, "--text", "w5", "--max-new-tokens", "2",
                             "--force")
    assert code == 0 and "fedprompt: warning:" in err and "forced" in err and out.startswith("w5")
    # A prompt that does not fit is refused even with --force.
    code, _, err = run_cli(capsys, "apply", artifacts["lm"], "--backbone", FIXTURES / "llama", "--text", "w5", "--force")
    assert code == 2 and "does not fit" in err


def test_export_then_import_round_trip(artifacts, folders, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", artifacts["classify"], "--format", "peft", "--out", tmp_path / "adapter")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "fedprompt_head.safetensors", "fedprompt_task.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["base_model_name_or_path"] == "bert"  # a name, never a local path
    code, out, err = run_cli(capsys, "import", tmp_path / "adapter", "--out", tmp_path / "back.fpp", "--storage", "float32",
                             "--backbone", folders["bert"])
    assert code == 0, err
    before, after = load_prompt(artifacts["classify"]), load_prompt(tmp_path / "back.fpp")
    np.testing.assert_array_equal(after.params["embeddings"], before.params["embeddings"])
    np.testing.assert_array_equal(after.head["w"], before.head["w"])
    assert after.task.label_names == tuple(LABELS) and after.fingerprint == before.fingerprint
    assert after.metadata["peft_task_type"] == "FEATURE_EXTRACTION"
    # SEQ_CLS: PEFT's classifier slot is filled, with a warning that it is not fedprompt's head.
    code, _, err = run_cli(capsys, "export", artifacts["classify"], "--format", "peft", "--out", tmp_path / "seq",
                           "--task-type", "SEQ_CLS", "--base-model", "my/bert")
    assert code == 0 and "fedprompt: warning:" in err and "pooler" in err
    assert json.loads((tmp_path / "seq" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/bert"


def test_import_of_pefts_own_adapter(tmp_path, capsys):
    code, out, err = run_cli(capsys, "import", FIXTURES / "peft" / "llama_prefix", "--out", tmp_path / "p.fpp",
                             "--backbone", FIXTURES / "llama")
    assert code == 0, err
    assert "PREFIX_TUNING adapter, 3 virtual tokens" in out
    artifact = load_prompt(tmp_path / "p.fpp", backbone=fedprompt.load_backbone(FIXTURES / "llama"))
    assert artifact.method == "prefix" and artifact.task.type == "causal_lm"
    config, params = fp_peft.import_peft(FIXTURES / "peft" / "llama_prefix")
    np.testing.assert_allclose(artifact.params["keys"], params["keys"], atol=2e-3)
    # The wrong backbone: the prefix does not fit GPT-2's heads.
    code, _, err = run_cli(capsys, "import", FIXTURES / "peft" / "llama_prefix", "--out", tmp_path / "q.fpp",
                           "--backbone", FIXTURES / "gpt2")
    assert code == 2 and "do not match" in err and not (tmp_path / "q.fpp").exists()
    code, _, err = run_cli(capsys, "import", tmp_path / "nothing", "--out", tmp_path / "q.fpp")
    assert code == 2 and "not a folder" in err
