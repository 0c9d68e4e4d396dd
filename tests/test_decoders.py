"""Decoder backbones (GPT-2 and the Llama family) against Hugging Face golden outputs.

The fixtures in ``tests/fixtures/{gpt2,llama,qwen2,mistral}/`` are tiny random models written by
``tests/make_golden.py`` with transformers (eager attention, float32); this file never imports
torch. Each architecture is checked on a plain forward, a PEFT-style soft prompt and a
PEFT-style deep prefix (a pre-filled key/value cache), on the unpadded positions only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fedprompt.backbones.base import FrozenWeight
from fedprompt.backbones.gpt2 import GPT2, GPT2Config
from fedprompt.backbones.llama import Llama, LlamaConfig, rope_inv_freq
from fedprompt.errors import CheckpointError, ConfigError, SequenceTooLongError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
ARCHS = ("gpt2", "llama", "qwen2", "mistral")
TOL = dict(atol=1e-4, rtol=1e-4)


def _classes(name: str):
    return (GPT2Config, GPT2) if name == "gpt2" else (LlamaConfig, Llama)


@functools.cache
def _raw(name: str) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    with np.load(folder / "golden.npz") as z:
        golden = {k: z[k] for k in z.files}
    return config, tensors, golden


@functools.cache
def _model(name: str, dtype=jnp.float32):
    raw_cfg, tensors, _ = _raw(name)
    config_cls, module_cls = _classes(name)
    config = config_cls.from_hf(raw_cfg)
    return module_cls.from_hf(config, tensors, dtype=dtype)


def _golden(name: str) -> dict[str, np.ndarray]:
    return _raw(name)[2]


def _prefix(g: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """Hugging Face's cache layout [L, B, H_kv, P, hd] -> fedprompt's [L, B, P, H_kv, hd]."""
    return (
        jnp.asarray(g["prefix_keys"]).transpose(0, 1, 3, 2, 4),
        jnp.asarray(g["prefix_values"]).transpose(0, 1, 3, 2, 4),
    )


def _prompted(model, g: dict[str, np.ndarray]) -> tuple[jax.Array, np.ndarray]:
    """Soft prompt prepended to the word embeddings, mask extended by ones (PEFT prompt tuning)."""
    words = model.embed_tokens(g["input_ids"])
    b = words.shape[0]
    prompt = jnp.broadcast_to(jnp.asarray(g["prompt"])[None], (b, *g["prompt"].shape))
    mask = np.concatenate([np.ones((b, g["prompt"].shape[0]), np.int32), g["attention_mask"]], axis=1)
    return jnp.concatenate([prompt, words], axis=1), mask


def _close(actual, expected, mask, **tol) -> None:
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float32)[valid], expected[valid], **(tol or TOL))


def _roughly(actual, expected, mask, rel: float = 0.05, max_abs: float = 0.5) -> None:
    """bf16 check: relative L2 error and worst element (bf16 keeps 8 mantissa bits)."""
    valid = np.asarray(mask).astype(bool)
    a, e = np.asarray(actual, dtype=np.float32)[valid], expected[valid]
    assert np.all(np.isfinite(a))
    assert np.linalg.norm(a - e) <= rel * np.linalg.norm(e)
    assert np.abs(a - e).max() <= max_abs


# --------------------------------------------------------------------------------------------
# Golden comparisons
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_plain_forward_matches_hf(name):
    model, g = _model(name), _golden(name)
    hidden = model(model.embed_tokens(g["input_ids"]), g["attention_mask"])
    _close(hidden, g["hidden"], g["attention_mask"])
    _close(model.lm_head(hidden), g["logits"], g["attention_mask"])


@pytest.mark.parametrize("name", ARCHS)
def test_soft_prompt_matches_hf(name):
    model, g = _model(name), _golden(name)
    embeds, mask = _prompted(model, g)
    hidden = model(embeds, mask)
    _close(hidden, g["prompt_hidden"], mask)
    _close(model.lm_head(hidden), g["prompt_logits"], mask)


@pytest.mark.parametrize("name", ARCHS)
def test_deep_prefix_matches_hf(name):
    model, g = _model(name), _golden(name)
    hidden = model(model.embed_tokens(g["input_ids"]), g["attention_mask"], prefix=_prefix(g))
    _close(hidden, g["prefix_hidden"], g["attention_mask"])
    _close(model.lm_head(hidden), g["prefix_logits"], g["attention_mask"])


def test_mistral_fixture_exercises_the_sliding_window():
    """Window 4 < 8 tokens: dropping the window must change the output, so the match is meaningful."""
    raw_cfg, tensors, g = _raw("mistral")
    config = LlamaConfig.from_hf(raw_cfg)
    assert config.sliding_windows == (4, 4)
    unwindowed = Llama.from_hf(dataclasses.replace(config, sliding_windows=(None, None)), tensors)
    ids, mask = g["input_ids"], g["attention_mask"]
    valid = mask.astype(bool)
    plain = np.asarray(unwindowed(unwindowed.embed_tokens(ids), mask))
    assert np.abs(plain - g["hidden"])[valid].max() > 1e-2
    # With a prefix, the prefix keys count against the window (HF's mask on absolute positions):
    # the windowed model matches the golden while an unwindowed one does not.
    pref = np.asarray(unwindowed(unwindowed.embed_tokens(ids), mask, prefix=_prefix(g)))
    assert np.abs(pref - g["prefix_hidden"])[valid].max() > 1e-2


# --------------------------------------------------------------------------------------------
# dtype, jit, frozen weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_bfloat16_forward_is_close_to_float32(name):
    model, g = _model(name), _golden(name)
    embeds, mask = _prompted(model, g)
    hidden = model(embeds.astype(jnp.bfloat16), mask, prefix=None)
    logits = model.lm_head(hidden)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
    _roughly(hidden, g["prompt_hidden"], mask)
    _roughly(logits, g["prompt_logits"], mask)
    # bf16-stored weights also work, and the prefix path casts to the compute dtype.
    model16 = _model(name, jnp.bfloat16)
    ids, m = g["input_ids"], g["attention_mask"]
    pk, pv = _prefix(g)
    hidden = model16(model16.embed_tokens(ids), m, prefix=(pk.astype(jnp.bfloat16), pv.astype(jnp.bfloat16)))
    assert hidden.dtype == jnp.bfloat16
    _roughly(hidden, g["prefix_hidden"], m)


@pytest.mark.parametrize("name", ARCHS)
def test_jit_forward_equals_eager(name):
    model, g = _model(name), _golden(name)
    graphdef, weights = nnx.split(model)

    @jax.jit
    def forward(weights, ids, mask, prefix):
        m = nnx.merge(graphdef, weights)
        return m.lm_head(m(m.embed_tokens(ids), mask, prefix=prefix))

    ids, mask = jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])
    prefix = _prefix(g)
    eager = model.lm_head(model(model.embed_tokens(ids), mask, prefix=prefix))
    jitted = forward(weights, ids, mask, prefix)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)
    _close(jitted, g["prefix_logits"], g["attention_mask"])


@pytest.mark.parametrize("name", ARCHS)
def test_all_weights_are_frozen(name):
    model = _model(name)
    everything = nnx.state(model)
    frozen = nnx.state(model, FrozenWeight)
    n_all = len(jax.tree_util.tree_leaves(everything))
    assert n_all > 0 and n_all == len(jax.tree_util.tree_leaves(frozen))


# --------------------------------------------------------------------------------------------
# Checkpoint names and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("gpt2", "transformer.h.1.mlp.c_fc.weight"),
        ("llama", "model.layers.0.self_attn.k_proj.weight"),
        ("llama", "lm_head.weight"),
        ("qwen2", "model.layers.1.self_attn.q_proj.bias"),
        ("mistral", "model.norm.weight"),
    ],
)
def test_missing_tensor_names_it(name, missing):
    raw_cfg, tensors, _ = _raw(name)
    config_cls, module_cls = _classes(name)
    broken = {k: v for k, v in tensors.items() if k != missing}
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        module_cls.from_hf(config_cls.from_hf(raw_cfg), broken)


def test_misshapen_tensor_is_a_checkpoint_error():
    raw_cfg, tensors, _ = _raw("qwen2")
    broken = dict(tensors)
    broken["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match="up_proj"):
        Llama.from_hf(LlamaConfig.from_hf(raw_cfg), broken)


@pytest.mark.parametrize(("name", "outer"), [("gpt2", "transformer."), ("mistral", "model.")])
def test_names_without_outer_prefix_are_accepted(name, outer):
    raw_cfg, tensors, g = _raw(name)
    config_cls, module_cls = _classes(name)
    stripped = {k[len(outer) :] if k.startswith(outer) else k: v for k, v in tensors.items()}
    model = module_cls.from_hf(config_cls.from_hf(raw_cfg), stripped)
    hidden = model(model.embed_tokens(g["input_ids"]), g["attention_mask"])
    _close(hidden, g["hidden"], g["attention_mask"])


def test_gpt2_lm_head_must_be_tied():
    raw_cfg, tensors, _ = _raw("gpt2")
    config = GPT2Config.from_hf(raw_cfg)
    wte = tensors["transformer.wte.weight"]
    # An equal lm_head.weight and the old causal-mask buffers are accepted and ignored.
    extra = {"lm_head.weight": wte.copy(), "transformer.h.0.attn.bias": np.ones((1, 1, 64, 64))}
    GPT2.from_hf(config, {**tensors, **extra})
    with pytest.raises(CheckpointError, match="lm_head"):
        GPT2.from_hf(config, {**tensors, "lm_head.weight": wte + 1.0})


def test_gpt2_unsupported_activation_is_config_error():
    raw_cfg = _raw("gpt2")[0]
    with pytest.raises(ConfigError, match="relu"):
        GPT2Config.from_hf({**raw_cfg, "activation_function": "relu"})
    assert GPT2Config.from_hf({**raw_cfg, "activation_function": "gelu"}).gelu_approximate is False
    assert GPT2Config.from_hf(raw_cfg).gelu_approximate is True


def test_gpt2_config_fields():
    c = GPT2Config.from_hf(_raw("gpt2")[0])
    assert (c.model_type, c.is_decoder, c.pad_token_id) == ("gpt2", True, None)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_positions) == (4, 4, 8, 64)
    assert c.intermediate_size == 64


def test_gpt2_sequence_beyond_position_table():
    model = _model("gpt2")
    ids = np.zeros((1, 65), np.int32)
    with pytest.raises(SequenceTooLongError):
        model(model.embed_tokens(ids), np.ones_like(ids))


def test_llama_unsupported_activation_is_config_error():
    with pytest.raises(ConfigError, match="gelu"):
        LlamaConfig.from_hf({**_raw("llama")[0], "hidden_act": "gelu"})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
        {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    ],
)
def test_unknown_rope_type_is_config_error(rope):
    with pytest.raises(ConfigError, match="rope type"):
        LlamaConfig.from_hf({**_raw("llama")[0], **rope})


def test_llama3_rope_needs_its_factors():
    raw_cfg = _raw("llama")[0]
    params = {k: v for k, v in raw_cfg["rope_parameters"].items() if k != "low_freq_factor"}
    with pytest.raises(ConfigError, match="low_freq_factor"):
        LlamaConfig.from_hf({**raw_cfg, "rope_parameters": params})


def test_transformers_v4_rope_spelling_is_equivalent():
    """``rope_theta`` + ``rope_scaling`` (v4) and ``rope_parameters`` (v5) give the same model."""
    v5 = _raw("llama")[0]
    params = dict(v5["rope_parameters"])
    theta = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=theta, rope_scaling={"type": rope_type, **params})
    assert LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v5)
    c = LlamaConfig.from_hf(v5)
    assert (c.rope_type, c.rope_factor, c.rope_original_max_positions) == ("llama3", 8.0, 16)
    # Plain v4 config (no scaling) and defaults.
    plain = {k: v for k, v in v5.items() if k != "rope_parameters"}
    assert LlamaConfig.from_hf({**plain, "rope_theta": 500000.0}).rope_theta == 500000.0
    assert LlamaConfig.from_hf(plain).rope_type == "default"


def test_llama3_inverse_frequencies():
    """Reference values of Llama 3.1's rescaling for head_dim 8, factor 8, original length 16."""
    c = LlamaConfig.from_hf(_raw("llama")[0])
    base = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)  # wavelengths 6.3, 63, 628, 6283
    wavelen = 2 * np.pi / base
    smooth = (16 / wavelen[0] - 1.0) / (4.0 - 1.0)  # the one wavelength between 16/4 and 16/1
    expected = np.array([(1 - smooth) * base[0] / 8 + smooth * base[0], base[1] / 8, base[2] / 8, base[3] / 8])
    np.testing.assert_allclose(rope_inv_freq(c), expected, rtol=1e-6)


def test_llama_config_fields():
    c = LlamaConfig.from_hf(_raw("llama")[0])
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_positions) == (4, 2, 8, 64)
    assert (c.tie_word_embeddings, c.qkv_bias, c.o_bias, c.mlp_bias) == (False, False, False, False)
    assert c.sliding_windows == (None, None)
    q = LlamaConfig.from_hf(_raw("qwen2")[0])
    assert (q.tie_word_embeddings, q.qkv_bias, q.o_bias) == (True, True, False)
    assert q.sliding_windows == (None, None)
    # Explicit head_dim wins over hidden/heads.
    assert LlamaConfig.from_hf({**_raw("mistral")[0], "head_dim": 16}).head_dim == 16


def test_qwen2_sliding_window_only_when_enabled():
    raw_cfg = {k: v for k, v in _raw("qwen2")[0].items() if k != "layer_types"}
    assert LlamaConfig.from_hf({**raw_cfg, "sliding_window": 4}).sliding_windows == (None, None)
    on = {**raw_cfg, "use_sliding_window": True, "sliding_window": 4}
    assert LlamaConfig.from_hf({**on, "max_window_layers": 1}).sliding_windows == (None, 4)
    assert LlamaConfig.from_hf({**on, "layer_types": ["sliding_attention"] * 2}).sliding_windows == (4, 4)
    mistral = _raw("mistral")[0]
    assert LlamaConfig.from_hf({**mistral, "sliding_window": None}).sliding_windows == (None, None)


def test_unknown_model_type_is_config_error():
    with pytest.raises(ConfigError):
        LlamaConfig.from_hf({**_raw("llama")[0], "model_type": "gemma"})
