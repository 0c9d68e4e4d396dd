"""The library's exception types.

Every error raised at a boundary (files, checkpoints, configuration, user input) is a
subclass of :class:`FedPromptError`, so callers can catch the library's errors in one place
while still telling them apart.
"""

from __future__ import annotations


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
