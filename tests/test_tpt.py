"""Test-time prompt tuning: views, the marginal-entropy objective, adaptation and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_backbone

from fedprompt import PromptConfig, SequenceClassification
from fedprompt.client.local import init_trainable, make_eval_step
from fedprompt.errors import ConfigError
from fedprompt.inference import tpt
from fedprompt.server import algorithms
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.data.partition import dirichlet_partition

LABELS = 3
CLS, SEP, MASK, PAD = 1, 2, 3, 0


def _batch(n=16, t=12, seed=0):
    """BERT-like rows: [CLS] tokens [SEP] then padding, with a special id 4 inside some rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, t), np.int32)
    mask = np.zeros((n, t), np.int32)
    for i in range(n):
        length = int(rng.integers(4, t + 1))
        ids[i, :length] = np.concatenate([[CLS], rng.integers(10, 100, length - 2), [SEP]])
        mask[i, :length] = 1
    ids[::3, 2] = 4
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 1] % LABELS).astype(np.int32)}


def test_masked_views_never_touch_special_tokens_or_padding():
    batch = _batch()
    augment = jax.jit(tpt.augment_views, static_argnums=(2, 3), static_argnames=("mask_token_id", "special_ids"))
    views = augment(jax.random.key(0), batch, 6, 0.5, mask_token_id=MASK, special_ids=(4,))
    ids, mask = np.asarray(views["input_ids"]), np.asarray(views["attention_mask"])
    assert ids.shape == (6, 16, 12) and np.asarray(views["labels"]).shape == (6, 16)
    np.testing.assert_array_equal(ids[0], batch["input_ids"])  # view 0 is the original
    np.testing.assert_array_equal(mask, np.broadcast_to(batch["attention_mask"], mask.shape))
    changed = ids != batch["input_ids"][None]
    protected = np.isin(batch["input_ids"], [CLS, SEP, 4]) | (batch["attention_mask"] == 0)
    assert not np.any(changed & protected[None])
    assert np.all(ids[changed] == MASK)
    droppable = (~protected).sum() * 5
    assert 0.4 < changed.sum() / droppable < 0.6  # ~ drop_prob of the droppable tokens


def test_deleted_views_keep_order_ends_and_right_padding():
    batch = _batch()
    views = jax.jit(tpt.augment_views, static_argnums=(2, 3))(jax.random.key(1), batch, 5, 0.4)  # no mask token: deleted
    ids, mask = np.asarray(views["input_ids"]), np.asarray(views["attention_mask"])
    np.testing.assert_array_equal(ids[0], batch["input_ids"])
    dropped_any = False
    for v in range(5):
        for i in range(16):
            original = batch["input_ids"][i][batch["attention_mask"][i] > 0]
            kept = ids[v, i][mask[v, i] > 0]
            n = len(kept)
            assert np.all(mask[v, i, :n] == 1) and np.all(mask[v, i, n:] == 0) and np.all(ids[v, i, n:] == PAD)
            assert kept[0] == CLS and kept[-1] == SEP  # first and last real tokens stay
            it = iter(original)
            assert all(token in it for token in kept)  # a subsequence, in order
            dropped_any |= n < len(original)
    assert dropped_any


def test_confidence_selection_keeps_tpt_fraction():
    assert tpt.kept_views(64, 0.1) == 6 and tpt.kept_views(8, 0.1) == 1 and tpt.kept_views(8, 0.5) == 4


@pytest.fixture(scope="module")
def trained():
    backbone = tiny_backbone("bert")
    config = PromptConfig(num_virtual_tokens=2, init="random", random_std=0.5)
    task = SequenceClassification(LABELS)
    return backbone, config, task, init_trainable(backbone, config, task, jax.random.key(0))


def test_adaptation_lowers_the_marginal_entropy_and_moves_only_the_prompt(trained):
    backbone, config, task, params = trained
    batch = _batch(n=8, t=10)
    kwargs = {"num_views": 8, "confidence_quantile": 0.25, "drop_prob": 0.2, "mask_token_id": MASK}
    key = jax.random.key(2)
    adapted = tpt.tpt_adapt(backbone, config, task, params, batch, key=key, steps=3, lr=5e-2, **kwargs)
    objective = jax.jit(tpt.make_tpt_objective(backbone, config, task, **kwargs))
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}  # the objective never reads labels
    views_key = jax.random.split(key, 3)[0]  # the views of the first step
    before = float(objective(params["prompt"], params["head"], backbone.weights, unlabeled, views_key))
    after = float(objective(adapted["prompt"], params["head"], backbone.weights, unlabeled, views_key))
    assert after < before - 0.01, (before, after)
    jax.tree.map(np.testing.assert_array_equal, adapted["head"], params["head"])
    assert float(jnp.abs(adapted["prompt"]["embeddings"] - params["prompt"]["embeddings"]).max()) > 0


def test_evaluation_scores_before_and_after_per_batch(trained):
    backbone, config, task, params = trained
    data = _batch(n=12, t=10, seed=3)
    result = tpt.tpt_evaluate(
        backbone, config, task, params, data, key=jax.random.key(0), batch_size=8, steps=2, lr=5e-2, mask_token_id=MASK
    )
    assert result["examples"] == 12  # a full batch and a padded one; padding is not scored
    metrics = make_eval_step(backbone, config, task)(params, {**data, "example_mask": np.ones(12, np.float32)}, backbone.weights)
    assert abs(result["accuracy_before"] - float(metrics.accuracy)) < 1e-6
    assert abs(result["loss_before"] - float(metrics.loss)) < 1e-5
    assert result["entropy_after"] < result["entropy_before"]


def test_federated_adaptation_averages_prompt_changes_from_unlabeled_data(trained):
    backbone, config, task, params = trained
    data = _batch(n=16, t=10, seed=4)
    parts = dirichlet_partition(data["labels"], 2, 1.0, seed=0)
    program = tpt.make_tpt_program(
        backbone, config, task, params, local_steps=2, batch_size=4, num_views=4, lr=5e-2, mask_token_id=MASK
    )
    sim = FederatedSimulation.build(
        backbone, config, task, algorithms.fedavg(), optax.sgd(0.1), build_client_data(data, parts, LABELS),
        clients_per_round=2, local_steps=1, batch_size=1, program=program,
    )
    state, controls = sim.init()
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    scrambled = {**sim.client_data.columns, "labels": jnp.zeros_like(sim.client_data.columns["labels"])}
    ids, _ = sim.sample(0)
    a = sim.train_clients(state, controls, ids, 0)
    object.__setattr__(sim.client_data, "columns", scrambled)  # other labels: the same updates
    b = sim.train_clients(state, controls, ids, 0)
    jax.tree.map(np.testing.assert_array_equal, a.delta, b.delta)
    final, _, history = run_rounds(sim, 2, data, state=state, client_states=controls)
    jax.tree.map(np.testing.assert_array_equal, final.params["head"], params["head"])
    assert history[-1]["bytes_up"] > 0


def test_bad_settings_are_refused(trained):
    backbone, config, task, _ = trained
    with pytest.raises(ConfigError, match="confidence_quantile"):
        tpt.make_tpt_objective(backbone, config, task, confidence_quantile=0.0)
    with pytest.raises(ConfigError, match="drop_prob"):
        tpt.augment_views(jax.random.key(0), _batch(), 4, 1.0)
    with pytest.raises(ConfigError, match="steps"):
        tpt.make_tpt_adapt(backbone, config, task, steps=0)


def test_evaluation_over_test_clients_batches_each_clients_rows(trained):
    backbone, config, task, params = trained
    data = _batch(n=20, t=10, seed=4)
    kw = {"key": jax.random.key(1), "batch_size": 8, "steps": 1, "lr": 5e-2, "mask_token_id": MASK}
    plain = tpt.tpt_evaluate(backbone, config, task, params, data, **kw)
    # one client holding every row in order is the plain evaluation, adaptation included
    one = tpt.tpt_evaluate(backbone, config, task, params, data, clients=[np.arange(20)], **kw)
    assert one == plain
    # three skewed clients (one empty): every row scored once; the unadapted scores do not
    # depend on the grouping, the adapted ones do (other batches)
    parts = [np.array([0, 3, 5, 19]), np.array([], np.int64), np.setdiff1d(np.arange(20), [0, 3, 5, 19])]
    split = tpt.tpt_evaluate(backbone, config, task, params, data, clients=parts, **kw)
    assert split["examples"] == 20
    for name in ("accuracy_before", "loss_before", "entropy_before"):
        assert abs(split[name] - plain[name]) < 1e-5
    assert split["entropy_after"] < split["entropy_before"]
