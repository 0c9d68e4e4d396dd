"""Crash-safe round checkpoints of a federated run.

After every round the whole server-side state is written to ``checkpoint.msgpack`` in the run
folder, atomically (a temporary file, fsync, rename): the global prompt, the server
optimizer's state, SCAFFOLD's control variates (server and every client's), the round number,
and any extra pytree state (for example adaptive clipping). Randomness needs no saving: every
round's client sampling and PRNG keys are derived from ``(seed, round)``. A run killed at any
moment (even ``kill -9``) therefore resumes from its last completed round and ends with exactly
the prompt and metrics of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from fedprompt.errors import CheckpointError
from fedprompt.wire.artifact import write_atomic

CHECKPOINT_FILE = "checkpoint.msgpack"
CONFIG_FILE = "config.json"
FORMAT = "fedprompt.checkpoint"
VERSION = 1


def config_digest(config: dict[str, Any]) -> str:
    """A digest of the settings that determine a run's results (output folder excluded)."""
    relevant = {k: v for k, v in config.items() if k not in ("out",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(folder: str | Path, *, completed_rounds: int, state: Any, config: dict[str, Any]) -> Path:
    """Write the state after ``completed_rounds`` rounds to ``folder/checkpoint.msgpack`` atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "completed_rounds": int(completed_rounds),
        "config_digest": config_digest(config),
        "state": serialization.to_state_dict(jax.device_get(state)),
    }
    return write_atomic(Path(folder) / CHECKPOINT_FILE, serialization.msgpack_serialize(payload))


def load_checkpoint(folder: str | Path, *, template: Any, config: dict[str, Any]) -> tuple[int, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
      folder: the run folder.
      template: a state of the same structure (e.g. a freshly initialized one).
      config: the run's settings; they must be the ones the checkpoint was written with.

    Returns:
      ``(completed_rounds, state)``.

    Raises:
      CheckpointError: missing or damaged file, other settings, or another state structure.
    """
    path = Path(folder) / CHECKPOINT_FILE
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint to resume from in {folder} ({CHECKPOINT_FILE} is missing)") from None
    except Exception as err:  # noqa: BLE001 - msgpack raises several types on damaged input
        raise CheckpointError(f"{path} is damaged: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fedprompt checkpoint of version {VERSION}")
    if payload.get("config_digest") != config_digest(config):
        raise CheckpointError(f"{path} was written by a run with other settings; resume with the same configuration")
    try:
        state = serialization.from_state_dict(template, payload["state"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not match this run's state structure: {err}") from None
    shapes_ok = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), template, state)
    if not all(jax.tree.leaves(shapes_ok)):
        raise CheckpointError(f"{path} holds arrays of other shapes than this run's state")
    return int(payload["completed_rounds"]), state


def completed_rounds(folder: str | Path) -> int:
    """How many rounds the checkpoint in ``folder`` has completed (0 when there is none)."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    try:
        return int(serialization.msgpack_restore(path.read_bytes())["completed_rounds"])
    except Exception as err:  # noqa: BLE001 - msgpack raises several types on damaged input
        raise CheckpointError(f"{path} is damaged: {err}") from None


def write_config(folder: str | Path, config: dict[str, Any]) -> Path:
    """Record the resolved settings of a run (``config.json``), for ``--resume``."""
    return write_atomic(Path(folder) / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())


def read_config(folder: str | Path) -> dict[str, Any]:
    """The settings a run folder was started with."""
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a run folder ({CONFIG_FILE} is missing)") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None
