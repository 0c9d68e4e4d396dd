"""The library's exception types.

Every error raised at a boundary (files, checkpoints, configuration, user input) is a
subclass of :class:`FedPromptError`, so callers can catch the library's errors in one place
while still telling them apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FedPromptError(Exception):
    """Base class of every error fedprompt raises on bad input."""


class ConfigError(FedPromptError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown option)."""


class CheckpointError(FedPromptError):
    """A checkpoint folder cannot be loaded: missing files, missing or misshapen tensors."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture (``model_type``) is not one fedprompt implements."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A backbone name or hub id could not be resolved to files on this machine."""


class PromptMismatchError(FedPromptError, ValueError):
    """A prompt does not fit the backbone it is applied to (width, layers, heads, fingerprint)."""


class SequenceTooLongError(FedPromptError, ValueError):
    """The input, once the virtual tokens are added, exceeds the backbone's maximum length."""


class EmptyBatchError(FedPromptError, ValueError):
    """A batch holds no examples (or no unmasked tokens) where at least one is needed."""


class InputError(FedPromptError, ValueError):
    """Input arrays have the wrong rank, dtype or shape."""


class DataError(FedPromptError, ValueError):
    """A data file or in-memory data set is malformed."""


class WireError(FedPromptError, ValueError):
    """A message from another party is malformed, oversized or does not match what was expected."""


class SecureAggregationError(FedPromptError):
    """Secure aggregation cannot complete (fewer than the threshold of clients left, a bad share
    or message); nothing is published."""


class ArtifactError(WireError):
    """A prompt artifact (``.fpp``) or adapter folder is corrupted, malformed or of an unsupported schema."""


class OutOfMemoryError(FedPromptError, MemoryError):
    """A compiled program did not fit the device's memory; the message says what to lower."""


class RunFolderError(FedPromptError):
    """A run folder cannot be used: it is a file, not writable, in use by another run, or holds
    another run that was neither overwritten (``--overwrite``) nor resumed (``--resume``)."""


def run_command(command: Callable[[], int], *, prog: str = "fedprompt") -> int:
    """Runs a command-line command; every error becomes one line on stderr and an exit status.

    Returns the command's status; 2 for bad input (a :class:`FedPromptError`), 1 for an
    operating-system error (a full disk, a read-only or missing folder) and 130 for Ctrl-C.
    """
    try:
        return command()
    except FedPromptError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{prog}: {one_line(err) or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An exception's message and notes on one line; an OSError as ``file: reason``."""
    if isinstance(err, OSError) and err.strerror:
        names = [str(name) for name in (err.filename, err.filename2) if name is not None]
        text = f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    else:
        text = str(err)
    parts = [part for part in (text, *getattr(err, "__notes__", ())) if part]
    return " ".join("; ".join(parts).split())
