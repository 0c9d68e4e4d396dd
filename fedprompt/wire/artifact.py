"""The prompt artifact (``.fpp``): a trained prompt, saved as one wire message.

An ``.fpp`` file is exactly what :func:`fedprompt.wire.codec.encode` makes of the prompt's
parameters with ``kind="prompt"`` and the backbone's fingerprint, its ``meta`` holding

* ``method``: ``"prompt"`` or ``"prefix"``;
* ``prompt_config``: the prompt configuration, as a dict;
* ``backbone``: the backbone's name or path;
* ``created``: when it was written, ISO-8601 in UTC;
* any further metadata the caller adds.

Files are written atomically (a temporary file in the same folder, fsync, ``os.replace``):
a crash leaves either the old file or the new one, never half of one. Reading a file checks
it as hostile input, like a message from the network.

Example:
  >>> import numpy as np, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "prompt.fpp")
  >>> _ = save_prompt(path, {"embeddings": np.zeros((20, 384), np.float32)}, method="prompt",
  ...                 config={"num_virtual_tokens": 20}, backbone_name="minilm", fingerprint="ab12")
  >>> params, meta = load_prompt(path)
  >>> params["embeddings"].shape, meta["method"], meta["fingerprint"]
  ((20, 384), 'prompt', 'ab12')
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedprompt.errors import ConfigError, WireError
from fedprompt.wire.codec import DEFAULT_MAX_BYTES, decode, encode

__all__ = ["PROMPT_KIND", "SUFFIX", "load_prompt", "save_prompt", "write_atomic"]

PROMPT_KIND = "prompt"
SUFFIX = ".fpp"

_RESERVED_META = ("method", "prompt_config", "backbone", "created")


def save_prompt(
    path: str | os.PathLike[str],
    params: Any,
    *,
    method: str,
    config: Mapping[str, Any],
    backbone_name: str,
    fingerprint: str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a prompt artifact atomically.

    Args:
        path: The file to write (conventionally ending in ``.fpp``); replaced if it exists.
        params: The prompt's parameters, a pytree of arrays (see
            :func:`fedprompt.wire.codec.encode`).
        method: The prompt method, ``"prompt"`` or ``"prefix"``.
        config: The prompt configuration as plain data (e.g. ``dataclasses.asdict(config)``).
        backbone_name: The backbone's name or path.
        fingerprint: The backbone's fingerprint.
        metadata: More plain data for ``meta``; its keys may not be ``method``,
            ``prompt_config``, ``backbone`` or ``created``.

    Returns:
        The path written.

    Raises:
        ConfigError: ``metadata`` uses a reserved key.
        WireError: The parameters or metadata cannot be encoded.
        OSError: The file cannot be written (the target is then left as it was).
    """
    extra = dict(metadata or {})
    clashes = [key for key in _RESERVED_META if key in extra]
    if clashes:
        raise ConfigError(f"metadata may not set the reserved keys {clashes}")
    meta = {
        "method": method,
        "prompt_config": dict(config),
        "backbone": backbone_name,
        "created": _utc_now_iso(),
        **extra,
    }
    data = encode(params, kind=PROMPT_KIND, fingerprint=fingerprint, meta=meta)
    return write_atomic(path, data)


def load_prompt(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Any, dict[str, Any]]:
    """Reads and checks a prompt artifact.

    Args:
        path: The ``.fpp`` file.
        max_bytes: The largest file accepted.

    Returns:
        ``(params, meta)``: the parameters (dicts, lists and numpy arrays; tuples come back as
        lists, see :func:`fedprompt.wire.codec.check_template`) and the metadata, with the
        backbone's ``fingerprint`` added.

    Raises:
        WireError: The file is missing, unreadable, too large, or not a valid prompt artifact;
            the message names the path.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise WireError(f"{path}: the file is {size} bytes, over the limit of {max_bytes}")
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise WireError(f"{path}: cannot read the prompt artifact: {exc.strerror or exc}") from exc
    try:
        message = decode(data, max_bytes=max_bytes)
    except WireError as exc:
        raise WireError(f"{path}: not a valid prompt artifact: {exc}") from exc
    return message.tree, _checked_meta(message, path)


def _checked_meta(message: Any, path: Path) -> dict[str, Any]:
    if message.kind != PROMPT_KIND:
        raise WireError(f"{path}: not a prompt artifact (kind {message.kind!r})")
    if not isinstance(message.fingerprint, str):
        raise WireError(f"{path}: the prompt artifact has no backbone fingerprint")
    meta = message.meta
    if not isinstance(meta, dict):
        raise WireError(f"{path}: the prompt artifact has no metadata")
    expected_types = {"method": str, "prompt_config": dict, "backbone": str, "created": str}
    for key, kind in expected_types.items():
        if not isinstance(meta.get(key), kind):
            raise WireError(f"{path}: metadata field {key!r} is missing or not a {kind.__name__}")
    return {**meta, "fingerprint": message.fingerprint}


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk (fsync) and the
    file is renamed over ``path`` (``os.replace``). On any error the temporary file is removed
    and ``path`` is left as it was. The new file's permissions follow the umask.

    Args:
        path: The file to write.
        data: Its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: The file cannot be written.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable, where the platform allows it (POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
