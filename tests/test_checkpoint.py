"""Round checkpoints: atomic round trip, refusal of other settings and damaged files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fedprompt.errors import CheckpointError
from fedprompt.server import algorithms
from fedprompt.simulation import checkpoint


def _state(value=1.0):
    algo = algorithms.fedadam(0.1)
    state = algo.init({"prompt": {"embeddings": jnp.full((2, 3), value)}})
    state = algo.apply(state, {"prompt": {"embeddings": jnp.ones((2, 3))}})
    return state, {"prompt": {"embeddings": jnp.zeros((4, 2, 3))}}


def test_round_trip_restores_every_array(tmp_path):
    config = {"seed": 0, "rounds": 3, "out": "a"}
    state = _state(0.5)
    checkpoint.save_checkpoint(tmp_path, completed_rounds=2, state=state, config=config)
    assert checkpoint.completed_rounds(tmp_path) == 2
    rounds, restored = checkpoint.load_checkpoint(tmp_path, template=_state(9.0), config={**config, "out": "b"})
    assert rounds == 2
    for a, b in zip(jax_leaves(state), jax_leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_other_settings_or_damage_are_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path, completed_rounds=1, state=_state(), config={"seed": 0})
    with pytest.raises(CheckpointError, match="other settings"):
        checkpoint.load_checkpoint(tmp_path, template=_state(), config={"seed": 1})
    wrong = (_state()[0], {"prompt": {"embeddings": jnp.zeros((5, 2, 3))}})
    with pytest.raises(CheckpointError, match="shapes"):
        checkpoint.load_checkpoint(tmp_path, template=wrong, config={"seed": 0})
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load_checkpoint(tmp_path, template=_state(), config={"seed": 0})
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_checkpoint(tmp_path / "nowhere", template=_state(), config={"seed": 0})
    with pytest.raises(CheckpointError, match="run folder"):
        checkpoint.read_config(tmp_path)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


