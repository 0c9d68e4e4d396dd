"""The class-means head: client statistics, the Gaussian head, and its place before round one."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client import class_means
from fedprompt.client.local import init_trainable
from fedprompt.config import RunConfig
from fedprompt.data.partition import dirichlet_partition
from fedprompt.errors import ConfigError
from fedprompt.prompts import materialize
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data
from fedprompt.tasks import pool
from fedprompt.wire import codec

LABELS = 3
PROMPT = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)


def _encoded(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, LABELS, n).astype(np.int32)
    ids = rng.integers(5, 100, (n, 8)).astype(np.int32)
    ids[:, :3] = 10 + 20 * labels[:, None]  # the label shows in the tokens: a learnable task
    mask = np.ones_like(ids)
    mask[::3, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _features(backbone, prompt, rows):
    out = backbone.apply(backbone.weights, rows["input_ids"], rows["attention_mask"],
                         materialize(PROMPT, prompt, backbone.config), rows.get("token_type_ids"))
    return np.asarray(pool(out, "mean"), np.float64)


def _reference_statistics(features, labels):
    onehot = np.eye(LABELS)[labels]
    return onehot.T @ features, onehot.T @ (features**2).sum(1), onehot.sum(0)


def test_client_statistics_are_the_per_class_sums_of_its_real_rows():
    backbone = tiny_backbone("bert")
    task = SequenceClassification(LABELS).resolve(backbone)
    trainable = init_trainable(backbone, PROMPT, task, jax.random.key(0))
    rows = _encoded(20)
    n = 13  # rows 13..19 are padding and must not count
    stats = jax.jit(class_means.make_class_statistics(backbone, PROMPT, task, max_examples=64, batch_size=4))(
        trainable, backbone.weights, rows, n, jax.random.key(1))
    real = {k: v[:n] for k, v in rows.items()}
    sums, squares, counts = _reference_statistics(_features(backbone, trainable["prompt"], real), real["labels"])
    np.testing.assert_allclose(np.asarray(stats.sums), sums, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.squares), squares, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(stats.counts), counts)
    # a cap below the real rows: exactly that many distinct real rows, drawn by the key
    capped = class_means.make_class_statistics(backbone, PROMPT, task, max_examples=5, batch_size=2)
    few = capped(trainable, backbone.weights, rows, n, jax.random.key(1))
    assert float(np.sum(few.counts)) == 5
    other = capped(trainable, backbone.weights, rows, n, jax.random.key(2))
    assert not np.allclose(np.asarray(few.sums), np.asarray(other.sums))


def test_head_is_the_gaussian_classifier_of_the_statistics():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(LABELS, 5)) * 2
    labels = np.array([0] * 30 + [1] * 20 + [2] * 10)
    features = means[labels] + rng.normal(size=(60, 5))
    head = class_means.class_means_head(class_means.ClassStatistics(*_reference_statistics(features, labels)))
    # numpy reference: LDA with one isotropic variance and smoothed log priors
    counts = np.bincount(labels, minlength=LABELS).astype(np.float64)
    mu = np.stack([features[labels == c].mean(0) for c in range(LABELS)])
    variance = ((features - mu[labels]) ** 2).sum() / features.size
    prior = np.log((counts + 1) / (counts.sum() + LABELS))
    reference = (features @ mu.T - 0.5 * (mu**2).sum(1)) / variance + prior
    logits = features @ np.asarray(head["w"], np.float64) + np.asarray(head["b"], np.float64)
    differences = lambda z: z - z[:, :1]  # the softmax sees logit differences only
    np.testing.assert_allclose(differences(logits), differences(reference), rtol=1e-4, atol=1e-3)
    # a class nobody saw: zero weights and the lowest bias
    unseen = class_means.class_means_head(class_means.ClassStatistics(
        *_reference_statistics(features[labels < 2], labels[labels < 2])))
    assert np.all(np.asarray(unseen["w"])[:, 2] == 0) and float(unseen["b"][2]) == float(np.min(unseen["b"]))
    with pytest.raises(ValueError, match="no example"):
        class_means.class_means_head(class_means.ClassStatistics(np.zeros((2, 3)), np.zeros(2), np.zeros(2)))


def test_lda_head_is_the_shrunk_covariance_discriminant_and_beats_the_isotropic_one_on_skewed_noise():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(LABELS, 6))
    labels = rng.integers(0, LABELS, 600)
    mix = rng.normal(size=(6, 6)) * np.array([3.0, 2.0, 0.3, 0.3, 0.2, 0.1])  # correlated, anisotropic noise
    features = means[labels] + rng.normal(size=(600, 6)) @ mix.T
    sums, squares, counts = _reference_statistics(features, labels)
    stats = class_means.ClassStatistics(sums, squares, counts, features.T @ features)
    head = class_means.class_means_head(stats, shrinkage=0.1)
    mu = sums / counts[:, None]
    within = sum(np.outer(f - mu[c], f - mu[c]) for f, c in zip(features, labels)) / len(labels)
    shrunk = 0.9 * within + 0.1 * np.trace(within) / 6 * np.eye(6)
    precision = np.linalg.inv(shrunk)
    prior = np.log((counts + 1) / (counts.sum() + LABELS))
    reference = features @ precision @ mu.T - 0.5 * np.einsum("cd,de,ce->c", mu, precision, mu) + prior
    logits = features @ np.asarray(head["w"], np.float64) + np.asarray(head["b"], np.float64)
    differences = lambda z: z - z[:, :1]
    np.testing.assert_allclose(differences(logits), differences(reference), rtol=1e-3, atol=1e-3)
    isotropic = class_means.class_means_head(class_means.ClassStatistics(sums, squares, counts))
    accuracy = lambda h: np.mean((features @ np.asarray(h["w"]) + np.asarray(h["b"])).argmax(1) == labels)
    assert accuracy(head) > accuracy(isotropic) + 0.05


def test_client_covariance_is_the_sum_of_its_rows_outer_products():
    backbone = tiny_backbone("bert")
    task = SequenceClassification(LABELS).resolve(backbone)
    trainable = init_trainable(backbone, PROMPT, task, jax.random.key(0))
    rows = _encoded(20)
    stats = jax.jit(class_means.make_class_statistics(backbone, PROMPT, task, max_examples=64, batch_size=4,
                                                      covariance=True))(trainable, backbone.weights, rows, 13,
                                                                        jax.random.key(1))
    features = _features(backbone, trainable["prompt"], {k: v[:13] for k, v in rows.items()})
    np.testing.assert_allclose(np.asarray(stats.scatter), features.T @ features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.trace(np.asarray(stats.scatter)), float(np.sum(stats.squares)), rtol=1e-5)


def _simulation(head_init, *, block=None):
    encoded = _encoded()
    parts = dirichlet_partition(encoded["labels"], 5, 0.5, seed=0)
    sim = FederatedSimulation.build(
        tiny_backbone("bert"), PROMPT, SequenceClassification(LABELS), algorithms.fedavg(), optax.adam(0.05),
        build_client_data(encoded, parts, LABELS), clients_per_round=3, local_steps=2, batch_size=4,
        head_init=head_init, head_init_examples=8, client_block=block,
    )
    return sim, encoded


def test_simulation_starts_from_the_head_of_every_clients_statistics():
    sim, encoded = _simulation("class_means", block=2)
    random_start = sim.plan.init_params()
    state, _ = sim.init()
    # reference: each client alone, through the client-side call a SuperNode makes
    data = sim.client_data
    per_client = [jax.jit(sim.plan.class_statistics)(random_start, {k: v[i] for k, v in data.columns.items()},
                                                      int(data.sizes[i]), sim.plan.keys.head_statistics(i))
                  for i in range(data.num_clients)]
    assert [float(np.sum(s.counts)) for s in per_client] == [float(min(8, n)) for n in data.sizes]
    total = class_means.combine(jax.tree.map(lambda *xs: np.stack(xs), *per_client))
    expected = class_means.class_means_head(total)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                 state.params["head"], expected)
    jax.tree.map(np.testing.assert_array_equal, state.params["prompt"], random_start["prompt"])
    # the head alone already classifies this task; a random head does not
    assert sim.evaluate(state.params, encoded)["eval_accuracy"] > sim.evaluate(random_start, encoded)["eval_accuracy"] + 0.2
    # the one-time upload is the encoded statistics, counted exactly
    stats = jax.tree.map(np.asarray, per_client[0])
    up = len(codec.encode(dict(stats._asdict()), kind=class_means.STATISTICS_KIND, fingerprint=sim.backbone.fingerprint))
    assert sim.setup_bytes()["bytes_up"] == up
    plain, _ = _simulation("random")
    assert plain.setup_bytes() == {"bytes_up": 0, "bytes_down": 0}
    jax.tree.map(np.testing.assert_array_equal, plain.init()[0].params, random_start)


@pytest.mark.parametrize("overrides", [{"dp": "central", "dp_noise_multiplier": 1.0}, {"secagg": True}])
def test_class_means_are_refused_where_they_would_bypass_a_protection(overrides):
    with pytest.raises(ConfigError, match="class means in the clear"):
        RunConfig(head_init="class_means", **overrides)
    with pytest.raises(ConfigError, match="head_init"):
        RunConfig(head_init="zeros")
