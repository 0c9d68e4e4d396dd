"""Crash-safe, checksummed round checkpoints of a federated run.

After every round the whole server-side state is written to ``checkpoint.msgpack`` in the run
folder, atomically (a temporary file, fsync, rename): the global prompt, the server
optimizer's state, SCAFFOLD's control variates (server and every client's), the round number,
and any extra pytree state (for example adaptive clipping). Randomness needs no saving: every
round's client sampling and PRNG keys are derived from ``(seed, round)``. A run killed at any
moment (even ``kill -9``) therefore resumes from its last completed round and ends with exactly
the prompt and metrics of an uninterrupted run.

The file is a 48-byte header followed by the msgpack payload::

    b"FPCKPT2\\n" | completed rounds (uint64, little-endian) | sha256(rounds + payload) | payload

The checksum is verified before the payload is parsed, so a damaged file (flipped bits, a
torn copy) is refused with :class:`~fedprompt.errors.CheckpointError` rather than resumed
from; a file far larger than the state it should hold is refused before it is read. The
checkpoint of the round before stays beside it as ``checkpoint.prev.msgpack`` (a hard link
to the old file, so nothing is copied) until the new one is on disk; when the latest is
damaged, the error says whether that previous one is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from fedprompt.errors import CheckpointError
from fedprompt.wire.artifact import write_atomic

CHECKPOINT_FILE = "checkpoint.msgpack"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.msgpack"
CONFIG_FILE = "config.json"
FORMAT = "fedprompt.checkpoint"
VERSION = 2
MAGIC = b"FPCKPT2\n"
_HEADER = struct.Struct("<8sQ32s")
_CHUNK = 1 << 20


def config_digest(config: dict[str, Any]) -> str:
    """A digest of the settings that determine a run's results (output folder excluded)."""
    relevant = {k: v for k, v in config.items() if k not in ("out",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(folder: str | Path, *, completed_rounds: int, state: Any, config: dict[str, Any]) -> Path:
    """Write the state after ``completed_rounds`` rounds to ``folder/checkpoint.msgpack`` atomically.

    The checkpoint it replaces becomes ``folder/checkpoint.prev.msgpack``; the new file is
    flushed to disk (fsync) before it takes the place of the old one.
    """
    folder = Path(folder)
    payload = serialization.msgpack_serialize({
        "format": FORMAT,
        "version": VERSION,
        "completed_rounds": int(completed_rounds),
        "config_digest": config_digest(config),
        "state": serialization.to_state_dict(jax.device_get(state)),
    })
    header = _HEADER.pack(MAGIC, int(completed_rounds), _digest(int(completed_rounds), payload))
    path = folder / CHECKPOINT_FILE
    if path.is_file():
        _keep_previous(path, folder / PREVIOUS_CHECKPOINT_FILE)
    return write_atomic(path, header + payload)


def load_checkpoint(folder: str | Path, *, template: Any, config: dict[str, Any]) -> tuple[int, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
      folder: the run folder.
      template: a state of the same structure (e.g. a freshly initialized one). A file larger
        than about twice the template's bytes is refused before it is read.
      config: the run's settings; they must be the ones the checkpoint was written with.

    Returns:
      ``(completed_rounds, state)``.

    Raises:
      CheckpointError: missing, oversized or damaged file (checksum mismatch), other settings,
        or another state structure.
    """
    path = Path(folder) / CHECKPOINT_FILE
    leaves = jax.tree.leaves(template)
    limit = 2 * sum(np.asarray(leaf).nbytes for leaf in leaves) + 256 * len(leaves) + (1 << 16)
    rounds, data = _read_verified(path, limit=limit)
    try:
        payload = serialization.msgpack_restore(data)
    except Exception as err:  # noqa: BLE001 - msgpack raises several types on damaged input
        raise CheckpointError(f"{path} is damaged: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fedprompt checkpoint of version {VERSION}")
    if payload.get("completed_rounds") != rounds:
        raise CheckpointError(f"{path} is damaged: its header and payload disagree on the completed rounds")
    if payload.get("config_digest") != config_digest(config):
        raise CheckpointError(f"{path} was written by a run with other settings; resume with the same configuration")
    try:
        state = serialization.from_state_dict(template, payload["state"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not match this run's state structure: {err}") from None
    shapes_ok = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), template, state)
    if not all(jax.tree.leaves(shapes_ok)):
        raise CheckpointError(f"{path} holds arrays of other shapes than this run's state")
    return rounds, state


def completed_rounds(folder: str | Path) -> int:
    """How many rounds the checkpoint in ``folder`` has completed (0 when there is none).

    The file's checksum is verified (reading it in chunks, so memory stays bounded).

    Raises:
      CheckpointError: the checkpoint is damaged.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    return _verify(path)


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


# ----------------------------------------------------------------------------- file format


def _digest(rounds: int, payload: bytes) -> bytes:
    hasher = hashlib.sha256(struct.pack("<Q", rounds))
    hasher.update(payload)
    return hasher.digest()


def _keep_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` the current ``path`` (a hard link where possible), atomically."""
    link = previous.with_name(f".{previous.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.link(path, link)
    except OSError:  # no hard links here (some network and FAT file systems): copy
        write_atomic(previous, path.read_bytes())
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def _read_header(path: Path, file) -> tuple[int, bytes]:
    header = file.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise CheckpointError(f"{path} is damaged: shorter than a checkpoint's header{_previous_note(path)}")
    if not header.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a fedprompt checkpoint of version {VERSION}{_previous_note(path)}")
    _, rounds, digest = _HEADER.unpack(header)
    return rounds, digest


def _verify(path: Path) -> int:
    """The completed rounds of a checkpoint whose checksum holds (read in chunks)."""
    try:
        with open(path, "rb") as file:
            rounds, digest = _read_header(path, file)
            hasher = hashlib.sha256(struct.pack("<Q", rounds))
            while chunk := file.read(_CHUNK):
                hasher.update(chunk)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    if hasher.digest() != digest:
        raise CheckpointError(f"{path} is corrupted (checksum mismatch){_previous_note(path)}")
    return rounds


def _read_verified(path: Path, *, limit: int) -> tuple[int, bytes]:
    """``(completed rounds, payload)`` of a checkpoint of at most ``limit`` payload bytes, verified."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint to resume from in {path.parent} ({path.name} is missing)") from None
    if size - _HEADER.size > limit:
        raise CheckpointError(f"{path} is {size:,} bytes, more than a checkpoint of this run's state can be "
                              f"({limit:,} bytes): it is not this run's checkpoint")
    try:
        with open(path, "rb") as file:
            rounds, digest = _read_header(path, file)
            payload = file.read(limit + 1)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    if _digest(rounds, payload) != digest:
        raise CheckpointError(f"{path} is corrupted (checksum mismatch){_previous_note(path)}")
    return rounds, payload


def _previous_note(path: Path) -> str:
    """Says whether the previous round's checkpoint beside ``path`` exists and is intact."""
    previous = path.with_name(PREVIOUS_CHECKPOINT_FILE)
    if path.name != CHECKPOINT_FILE or not previous.is_file():
        return ""
    try:
        rounds = _verify(previous)
    except CheckpointError:
        return f"; the previous round's checkpoint {previous} is damaged too"
    return (f"; the previous round's checkpoint {previous} (round {rounds}) is intact: "
            f"rename it to {CHECKPOINT_FILE} to resume from there")
