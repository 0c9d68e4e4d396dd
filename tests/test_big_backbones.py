"""Big decoder backbones on bounded memory: bf16 weights with a float32 prompt, rematerialised
blocks, weights sharded over a device mesh, and abstract (shape-only) backbones.

The 8-device checks run in one subprocess (tests/sharding_worker.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported, so the rest
of the suite keeps its one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FIXTURES, tiny_backbone, xla_flags

import fedprompt
from fedprompt import CausalLM, PromptConfig, SequenceClassification
from fedprompt.backbones.abstract import ABSTRACT_CONFIGS, abstract_backbone
from fedprompt.backbones.backbone import REMAT_MIN_PARAMETERS
from fedprompt.cli import main
from fedprompt.client.local import init_trainable, make_loss_fn, make_train_step
from fedprompt.bench import ANALYSIS_COMPILER_OPTIONS, format_step_memory_report, step_memory_report
from fedprompt.errors import ConfigError, UnsupportedArchitectureError

WORKER = Path(__file__).parent / "sharding_worker.py"
TOLERANCE = 1e-5
#: These programs are tiny: compile them without LLVM's code optimisation (several times faster).
FAST = ANALYSIS_COMPILER_OPTIONS

#: A Llama-family config with more layers than the fixtures, for memory comparisons.
FOUR_LAYERS = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}


def _init(bb, cfg, task, seed: int = 0):
    """``init_trainable`` as one compiled program (cheaper than its ops one by one)."""
    return jax.jit(lambda key: init_trainable(bb, cfg, task, key), compiler_options=FAST)(jax.random.key(seed))


def _batch(bb, n: int = 4, t: int = 10, *, lm: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, bb.config.vocab_size, (n, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if lm:
        batch["loss_mask"] = (np.arange(t)[None] >= 3).astype(np.int32).repeat(n, 0)
    else:
        batch["labels"] = (ids[:, 0] % 3).astype(np.int32)
    return batch


@pytest.fixture(scope="module")
def eight_devices() -> dict[str, float]:
    flags = xla_flags("--xla_force_host_platform_device_count=8", "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"the 8-device worker failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ bf16 weights, float32 prompt


def test_bf16_weights_train_a_float32_prompt():
    bb32 = tiny_backbone("llama")
    bb16 = fedprompt.load_backbone(FIXTURES / "llama", dtype=jnp.bfloat16, with_tokenizer=False)
    assert {x.dtype for x in jax.tree.leaves(bb16.weights)} == {jnp.dtype(jnp.bfloat16)}
    assert bb16.compute_dtype == jnp.bfloat16 and bb16.weight_bytes() * 2 == bb32.weight_bytes()
    cfg = PromptConfig(num_virtual_tokens=3, init="random")
    task = SequenceClassification(num_labels=3)
    trainable = _init(bb16, cfg, task)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
    batch = _batch(bb16)
    # Plain SGD with lr 1: the update is minus the gradient, which must be float32 and non-zero.
    opt = optax.sgd(1.0)
    step = jax.jit(make_train_step(bb16, cfg, task, opt, jit=False), compiler_options=FAST)
    new, _, metrics = step(trainable, opt.init(trainable), batch, bb16.weights)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    assert float(jnp.abs(new["prompt"]["embeddings"] - trainable["prompt"]["embeddings"]).max()) > 0
    l32, _ = jax.jit(make_loss_fn(bb32, cfg, task), compiler_options=FAST)(trainable, bb32.weights, batch)
    np.testing.assert_allclose(float(metrics.loss), float(l32), rtol=5e-2)


# ------------------------------------------------------------------ rematerialisation


@pytest.mark.parametrize("name,method,lm", [("llama", "prefix", True), ("gpt2", "prompt", False)])
def test_remat_gradients_equal_plain_gradients(name, method, lm):
    bb = tiny_backbone(name)
    cfg = PromptConfig(method=method, num_virtual_tokens=3, init="random", random_std=0.5)
    task = CausalLM() if lm else SequenceClassification(num_labels=3)
    trainable = _init(bb, cfg, task, 1)
    batch = _batch(bb, lm=lm)
    out = {}
    for remat in (False, True):
        loss_fn = make_loss_fn(bb, cfg, task, remat=remat)
        grad_fn = jax.value_and_grad(lambda t, w, b: loss_fn(t, w, b)[0])
        out[remat] = jax.jit(grad_fn, compiler_options=FAST)(trainable, bb.weights, batch)
    (loss0, g0), (loss1, g1) = out[False], out[True]
    assert abs(float(loss0) - float(loss1)) <= TOLERANCE
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(a - b))) <= TOLERANCE
    assert float(jnp.abs(jax.tree.leaves(g0["prompt"])[0]).max()) > 1e-4  # a real gradient was compared


def test_remat_default_follows_the_parameter_count():
    assert not tiny_backbone("llama").resolve_remat()
    assert tiny_backbone("llama").resolve_remat(True)
    assert abstract_backbone("llama-7b").resolve_remat()  # 6.7e9 parameters
    assert not abstract_backbone("qwen2-0.5b").resolve_remat()  # below REMAT_MIN_PARAMETERS
    assert not abstract_backbone("llama-7b", remat=False).resolve_remat()
    assert abstract_backbone("qwen2-0.5b").num_parameters() < REMAT_MIN_PARAMETERS < abstract_backbone("llama-7b").num_parameters()
    with pytest.raises(ConfigError, match="remat"):
        tiny_backbone("llama").resolve_remat("yes")


# ------------------------------------------------------------------ abstract backbones


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_abstract_backbone_has_the_loaded_structure(name):
    loaded = tiny_backbone(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    abstract = abstract_backbone(config, dtype=jnp.float32)
    assert abstract.is_abstract and not loaded.is_abstract
    assert jax.tree.structure(abstract.weights) == jax.tree.structure(loaded.weights)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract.weights)] == [(x.shape, x.dtype) for x in jax.tree.leaves(loaded.weights)]
    assert abstract.graphdef == loaded.graphdef


def test_published_configs_have_their_parameter_counts():
    counts = {name: abstract_backbone(name).num_parameters() for name in ABSTRACT_CONFIGS}
    assert counts == {"llama-7b": 6_738_415_616, "llama-70b": 68_976_648_192, "qwen2-0.5b": 494_032_768}
    bb = abstract_backbone("llama-70b")
    assert bb.weight_bytes() == 2 * counts["llama-70b"]  # bfloat16 by default
    assert bb.weights["blocks"][0]["k_w"].get_value().shape == (8192, 1024)  # 8 KV heads of 128


def test_abstract_backbones_refuse_to_run_and_bad_configs():
    bb = abstract_backbone("qwen2-0.5b")
    with pytest.raises(ConfigError, match="abstract"):
        bb.forward(np.ones((1, 4), np.int32))
    with pytest.raises(ConfigError, match="unknown abstract backbone"):
        abstract_backbone("llama-8x7b")
    with pytest.raises(UnsupportedArchitectureError):
        abstract_backbone(json.loads((FIXTURES / "bert" / "config.json").read_text()))
    with pytest.raises(ConfigError, match="missing"):
        abstract_backbone({"model_type": "llama", "hidden_size": 8})


def test_remat_keeps_fewer_temporaries_and_the_report_bounds_hold():
    # The abstract bench path on a small config: compiled, never run; XLA's memory analysis.
    bb = abstract_backbone(FOUR_LAYERS)
    report = step_memory_report(bb, batch_size=2, tokens=124, num_virtual_tokens=4, compiler_options=FAST)
    rows = report["rows"]
    assert set(rows) == {"no_remat", "remat"} and report["weight_bytes_per_device"] == bb.weight_bytes()
    assert rows["remat"]["temporaries"] < 0.5 * rows["no_remat"]["temporaries"], {k: r["temporaries"] for k, r in rows.items()}
    for row in rows.values():
        # The weights (all read: the head is not, so leave it out) are arguments of the step.
        head = bb.config.hidden_size * bb.config.vocab_size * 2
        assert row["arguments"] >= bb.weight_bytes() - head
        assert row["peak"] >= row["arguments"] + row["temporaries"] - row["aliased"] > 0
    text = format_step_memory_report(report)
    assert "GiB" in text and "remat" in text and "XLA" in text
    with pytest.raises(ConfigError, match="task"):
        step_memory_report(bb, task="regression")


def test_bench_memory_abstract_errors(capsys):
    assert main(["bench", "memory", "--abstract", "llama-3b"]) == 2
    assert "unknown abstract backbone" in capsys.readouterr().err
    assert main(["bench", "memory", "--devices", "2"]) == 2
    assert "--abstract" in capsys.readouterr().err


# ------------------------------------------------------------------ sharded over 8 devices


@pytest.mark.parametrize("key", ["llama-prompt/model8", "qwen2-prefix/data2-model4-remat"])
def test_sharded_step_equals_the_single_device_step(eight_devices, key):
    assert eight_devices[f"step/{key}"] <= TOLERANCE
    # The weights were split: each device holds the closed-form share, well under the whole.
    held = eight_devices[f"step/{key}/held_bytes"]
    name = key.split("-")[0]
    assert held == eight_devices[f"step/{key}/closed_form_bytes"]
    assert held < 0.6 * eight_devices[f"weights/{name}"]
    assert eight_devices[f"step/{key}/sharded_leaves"] > 0


def test_abstract_sharded_step_holds_a_share_of_the_weights_per_device(eight_devices):
    total = eight_devices["abstract/weight_bytes"]
    per_device = eight_devices["abstract/closed_form_per_device"]
    assert per_device >= total / 8
    # XLA's per-device arguments: at least the device's share, far less than the whole.
    assert eight_devices["abstract/arguments_8"] >= per_device >= total / 8
    assert eight_devices["abstract/arguments_8"] < 0.5 * total
