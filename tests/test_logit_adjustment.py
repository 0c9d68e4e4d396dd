"""Logit-adjusted local training: the client's loss sees its own label prior, evaluation does not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client.federated import label_log_prior, make_client_update
from fedprompt.client.local import init_trainable, make_loss_fn
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError

LABELS = 4


def test_label_log_prior_counts_only_real_rows_with_add_one_smoothing():
    labels = np.array([0, 0, 1, 3, 3, 3, 2, 2], np.int32)
    got = np.asarray(label_log_prior(jnp.asarray(labels), 6, LABELS))
    counts = np.bincount(labels[:6], minlength=LABELS)  # rows 6, 7 are padding
    np.testing.assert_allclose(got, np.log((counts + 1) / (6 + LABELS)), rtol=1e-6)


def test_adjusted_update_is_the_update_of_the_shifted_loss():
    backbone = tiny_backbone("bert")
    prompt = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)
    task = SequenceClassification(LABELS).resolve(backbone)
    params = init_trainable(backbone, prompt, task, jax.random.key(0))
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(5, 100, (12, 6)).astype(np.int32), "attention_mask": np.ones((12, 6), np.int32),
            "labels": np.array([0, 0, 0, 0, 0, 1, 1, 2, 0, 3, 3, 3], np.int32)}
    n, tau = 9, 0.7
    loss_fn = make_loss_fn(backbone, prompt, task)
    options = dict(local_steps=3, batch_size=4)
    adjusted = make_client_update(loss_fn, optax.adam(0.05), logit_adjustment=tau, num_labels=LABELS, **options)
    # reference: the plain update of a loss whose logits get tau * log(prior) added, computed in numpy
    counts = np.bincount(data["labels"][:n], minlength=LABELS)
    offset = tau * np.log((counts + 1) / (n + LABELS))

    def shifted_loss(trainable, weights, batch):
        batch = {**batch, "logit_offset": jnp.broadcast_to(jnp.asarray(offset, jnp.float32), (4, LABELS))}
        return loss_fn(trainable, weights, batch)

    reference = make_client_update(shifted_loss, optax.adam(0.05), **options)
    key = jax.random.key(3)
    got = jax.jit(adjusted)(params, backbone.weights, data, n, key)
    want = jax.jit(reference)(params, backbone.weights, data, n, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 got.delta, want.delta)
    plain = jax.jit(make_client_update(loss_fn, optax.adam(0.05), **options))(params, backbone.weights, data, n, key)
    assert not np.allclose(np.asarray(plain.delta["head"]["b"]), np.asarray(got.delta["head"]["b"]))
    # the shift pulls the head's bias less towards the client's majority class (0) than plain training
    assert float(got.delta["head"]["b"][0]) < float(plain.delta["head"]["b"][0])


def test_logit_adjustment_settings_are_checked():
    with pytest.raises(ConfigError, match="logit_adjustment must be >= 0"):
        RunConfig(logit_adjustment=-1.0)
    with pytest.raises(ConfigError, match="gradient clients"):
        RunConfig(logit_adjustment=1.0, method="zo")
    with pytest.raises(ConfigError, match="needs num_labels"):
        make_client_update(lambda *a: None, optax.sgd(0.1), local_steps=1, batch_size=1, logit_adjustment=1.0)
