"""Local training: frozen backbone, heads and losses against references, compiled memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from conftest import tiny_backbone

import fedprompt
from fedprompt import CausalLM, PromptConfig, SequenceClassification
from fedprompt.client.local import init_trainable, iterate_batches, local_train, make_eval_step, make_loss_fn, make_train_step
from fedprompt.errors import ConfigError, EmptyBatchError, InputError
from fedprompt.prompts import materialize


def _classification_data(bb, n=24, t=8, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, bb.config.vocab_size, size=(n, t)).astype(np.int32)
    y = (ids[:, 0] % labels).astype(np.int32)  # learnable from the first token
    mask = np.ones_like(ids)
    mask[::3, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("name, method", [("bert", "prompt"), ("bert", "prefix"), ("llama", "prompt"), ("gpt2", "prefix")])
def test_backbone_is_bitwise_unchanged_and_prompt_learns(name, method):
    bb = tiny_backbone(name)
    before = jax.tree.map(np.array, bb.weights)
    cfg = PromptConfig(method=method, num_virtual_tokens=4, init="random", random_std=0.5)
    task = SequenceClassification(num_labels=3)
    data = _classification_data(bb)
    trainable = init_trainable(bb, cfg, task, jax.random.key(0))
    start = jax.tree.map(np.array, trainable)
    trained, _, history = local_train(bb, cfg, task, trainable, data, optax.adam(3e-2), epochs=6, batch_size=8, key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, bb.weights))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trained["prompt"], start["prompt"])
    assert all(v > 0 for v in jax.tree.leaves(moved)), "every prompt leaf must receive gradient updates"
    assert float(history[-1].loss) < float(history[0].loss)


def test_gradients_only_for_the_trainable_pytree():
    bb = tiny_backbone("bert")
    cfg = PromptConfig(num_virtual_tokens=2, init="random")
    task = SequenceClassification(num_labels=3)
    loss_fn = make_loss_fn(bb, cfg, task)
    trainable = init_trainable(bb, cfg, task, jax.random.key(0))
    batch = _classification_data(bb, n=4)
    weight_grads = jax.grad(lambda w: loss_fn(trainable, w, batch)[0])(bb.weights)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(weight_grads))


def test_classification_loss_matches_numpy_reference():
    bb = tiny_backbone("bert")
    cfg = PromptConfig(num_virtual_tokens=3, init="random")
    task = SequenceClassification(num_labels=3, pooling="mean")
    trainable = init_trainable(bb, cfg, task, jax.random.key(4))
    batch = _classification_data(bb, n=6)
    batch["example_mask"] = np.array([1, 1, 1, 1, 0, 0], np.float32)
    loss, metrics = make_loss_fn(bb, cfg, task)(trainable, bb.weights, batch)
    out = bb.forward(batch["input_ids"], batch["attention_mask"], materialize(cfg, trainable["prompt"], bb.config))
    hidden = np.asarray(out.hidden)[:, 3:]
    m = batch["attention_mask"][..., None]
    pooled = (hidden * m).sum(1) / m.sum(1)
    logits = pooled @ np.asarray(trainable["head"]["w"]) + np.asarray(trainable["head"]["b"])
    ce = -_log_softmax(logits)[np.arange(6), batch["labels"]]
    np.testing.assert_allclose(float(loss), ce[:4].mean(), rtol=1e-5)
    assert float(metrics["examples"]) == 4


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_pooling_picks_the_right_token(pooling):
    bb = tiny_backbone("gpt2")
    ids = np.array([[11, 12, 13, 14], [21, 22, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    out = bb.forward(ids, mask, fedprompt.SoftPrompt(jnp.ones((2, bb.width))))
    pooled = np.asarray(fedprompt.tasks.pool(out, pooling))
    hidden = np.asarray(out.hidden)
    want = hidden[:, 2] if pooling == "cls" else np.stack([hidden[0, 2 + 3], hidden[1, 2 + 1]])
    np.testing.assert_array_equal(pooled, want)


def test_verbalizer_scores_label_words_with_the_frozen_lm_head():
    bb = tiny_backbone("qwen2")
    task = SequenceClassification(num_labels=2, verbalizer=(7, 9)).resolve(bb)
    ids = np.array([[11, 12, 13], [21, 22, 0]], np.int32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    out = bb.forward(ids, mask)
    logits = np.asarray(task.logits({}, out))
    full = np.asarray(out.logits)
    np.testing.assert_array_equal(logits, np.stack([full[0, 2, [7, 9]], full[1, 1, [7, 9]]]))
    with pytest.raises(ConfigError, match="decoder"):
        SequenceClassification(num_labels=2, verbalizer=(1, 2)).resolve(tiny_backbone("bert"))


def test_causal_lm_loss_counts_completion_tokens_only():
    bb = tiny_backbone("llama")
    cfg = PromptConfig(num_virtual_tokens=2, init="random")
    trainable = init_trainable(bb, cfg, CausalLM(), jax.random.key(0))
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]], np.int32)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], np.int32)
    loss_mask = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]], np.int32)  # padding is excluded by mask
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
    loss, _ = make_loss_fn(bb, cfg, CausalLM())(trainable, bb.weights, batch)
    out = bb.forward(ids, mask, materialize(cfg, trainable["prompt"], bb.config))
    logp = _log_softmax(np.asarray(out.logits, np.float64)[:, 2:])
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if loss_mask[b, t] and mask[b, t]]
    assert len(terms) == 5
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


def test_causal_lm_memorizes_a_sequence_through_the_prompt():
    bb = tiny_backbone("llama")
    cfg = PromptConfig(num_virtual_tokens=4, init="random")
    ids = np.tile(np.array([[3, 14, 15, 92, 65, 35, 89, 79]], np.int32), (4, 1))
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    trainable = init_trainable(bb, cfg, CausalLM(), jax.random.key(0))
    _, _, history = local_train(bb, cfg, CausalLM(), trainable, data, optax.adam(1e-1), epochs=40, batch_size=4, key=jax.random.key(0))
    assert float(history[-1].loss) < 0.5 * float(history[0].loss)


def test_padded_batches_equal_unpadded_mean():
    bb = tiny_backbone("bert")
    cfg = PromptConfig(num_virtual_tokens=2, init="random")
    task = SequenceClassification(num_labels=3)
    trainable = init_trainable(bb, cfg, task, jax.random.key(0))
    data = _classification_data(bb, n=5)
    eval_step = make_eval_step(bb, cfg, task)
    (padded,) = list(iterate_batches(data, 8))
    np.testing.assert_array_equal(padded["example_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    full = eval_step(trainable, {**data, "example_mask": np.ones(5, np.float32)}, bb.weights)
    np.testing.assert_allclose(float(eval_step(trainable, padded, bb.weights).loss), float(full.loss), rtol=1e-6)
    with pytest.raises(EmptyBatchError):
        next(iterate_batches({k: v[:0] for k, v in data.items()}, 4))
    with pytest.raises(InputError):
        next(iterate_batches({"input_ids": data["input_ids"], "labels": data["labels"][:2]}, 4))


def test_bf16_compute_trains_a_float32_prompt():
    bb32 = tiny_backbone("llama")
    bb16 = fedprompt.load_backbone(bb32.path, compute_dtype=jnp.bfloat16)
    cfg = PromptConfig(num_virtual_tokens=3, init="random")
    task = SequenceClassification(num_labels=3)
    trainable = init_trainable(bb32, cfg, task, jax.random.key(0))
    batch = _classification_data(bb32, n=8)
    l32, _ = make_loss_fn(bb32, cfg, task)(trainable, bb32.weights, batch)
    l16, _ = make_loss_fn(bb16, cfg, task)(trainable, bb16.weights, batch)
    np.testing.assert_allclose(float(l16), float(l32), rtol=5e-2)
    opt = optax.sgd(0.1)
    step = make_train_step(bb16, cfg, task, opt)
    new, _, _ = step(jax.tree.map(jnp.array, trainable), opt.init(trainable), batch, bb16.weights)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    assert bb16.forward(batch["input_ids"]).hidden.dtype == jnp.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_compiled_train_step_holds_no_weight_gradients(minilm, method):
    """XLA's memory analysis: our step needs far less than the weights; a full-gradient step needs more."""
    cfg = PromptConfig(method=method, num_virtual_tokens=20, init="random")
    task = SequenceClassification(num_labels=4)
    trainable = init_trainable(minilm, cfg, task, jax.random.key(0))
    opt = optax.adam(1e-3)
    batch = {
        "input_ids": np.ones((2, 16), np.int32),
        "attention_mask": np.ones((2, 16), np.int32),
        "labels": np.zeros(2, np.int32),
    }
    ours = fedprompt.compiled_memory(make_train_step(minilm, cfg, task, opt), trainable, opt.init(trainable), batch, minilm.weights)
    def full_grad_step(embeddings, weights, batch):
        # The reference: the same forward differentiated w.r.t. the weights as well.
        def loss(both):
            module = nnx.merge(minilm.graphdef, both[1])
            embeds = module.embed_tokens(batch["input_ids"])
            embeds = jnp.concatenate([jnp.broadcast_to(both[0], (2, *both[0].shape)), embeds], axis=1)
            return module(embeds, jnp.ones(embeds.shape[:2], jnp.int32)).mean()

        return jax.grad(loss)((embeddings, weights))

    full = fedprompt.compiled_memory(jax.jit(full_grad_step), jnp.zeros((20, minilm.width)), minilm.weights, batch)
    weights = minilm.weight_bytes()
    assert ours["outputs"] + ours["temporaries"] < 0.25 * weights, ours
    assert full["outputs"] + full["temporaries"] > weights, full


@pytest.mark.slow
def test_minilm_soft_prompt_learns_wordnet_supersenses(minilm):
    """A real task: 26 noun supersenses from WordNet glosses; loss falls, accuracy beats the majority class."""
    from fedprompt.data.datasets import load_wordnet_supersenses

    train, test = load_wordnet_supersenses()
    rng = np.random.default_rng(0)
    train, test = train.subset(rng.choice(len(train), 384, replace=False)), test.subset(rng.choice(len(test), 192, replace=False))

    def encode(ds):
        return {**minilm.tokenize(list(ds.texts), 32, num_virtual=20), "labels": ds.labels}

    cfg = PromptConfig(num_virtual_tokens=20)
    task = SequenceClassification(num_labels=train.num_labels)
    trainable = init_trainable(minilm, cfg, task, jax.random.key(0))
    trained, _, history = local_train(
        minilm, cfg, task, trainable, encode(train), optax.adam(1e-2), epochs=2, batch_size=16, key=jax.random.key(1)
    )
    losses = np.array([float(m.loss) for m in history])
    assert losses[-8:].mean() < 0.6 * losses[:8].mean(), losses
    eval_step = make_eval_step(minilm, cfg, task)
    metrics = [eval_step(trained, b, minilm.weights) for b in iterate_batches(encode(test), 64)]
    accuracy = sum(float(m.accuracy * m.examples) for m in metrics) / len(test)
    majority = np.bincount(test.labels).max() / len(test)
    assert accuracy > majority + 0.15, (accuracy, majority)
