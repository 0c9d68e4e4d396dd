"""Run folders: one run's outputs in one folder, never lost to another run or to a failure.

A run folder holds the files of one federated run (:data:`RUN_FILES`: ``config.json``,
``metrics.jsonl``, the round checkpoints, ``summary.json``, ``prompt.fpp``, ``curves.png``).
:func:`open_run_folder` guards the folder for either runtime (it imports neither):

* **Another run is refused.** A folder that already holds a run's files is opened only with
  ``overwrite`` (replace that run) or ``resume`` (continue it); otherwise
  :class:`~fedprompt.errors.RunFolderError` names both options.
* **One run at a time.** The folder is locked while it is open: ``DIR/.lock`` holds the
  owner's pid under an exclusive ``flock``. A second run on the same folder is refused with
  ``DIR is in use by another run (pid N)``. The operating system drops the lock when its
  process dies (even by ``kill -9``), so a lock file left behind by a dead process is taken
  over, with a warning.
* **A failure leaves the previous state whole.** With ``overwrite``, the previous run's files
  are moved aside to ``DIR/.previous`` (renames, nothing is copied) and deleted only when the
  new run has finished. If the new run fails before it has anything to resume, its files are
  removed and the previous ones moved back, so the folder is exactly as it was. Once the new
  run has a durable checkpoint (the caller says so with :meth:`RunFolder.keep_on_failure`), a
  failure keeps its files for a resume, and the previous run stays whole in ``DIR/.previous``
  until the resumed run finishes.

The files themselves are written by their owners, each atomically (a temporary file, fsync,
rename: :func:`fedprompt.wire.artifact.write_atomic`); ``metrics.jsonl`` grows line by line.

Example:
  >>> import tempfile, pathlib
  >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
  >>> with open_run_folder(folder) as run:
  ...     _ = (run.path / "config.json").write_text("{}")
  >>> sorted(p.name for p in folder.iterdir())
  ['config.json']
  >>> open_run_folder(folder)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  fedprompt.errors.RunFolderError: ... holds another run (config.json); pass --overwrite to replace it or --resume to continue it
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

from fedprompt.errors import RunFolderError
from fedprompt.wire.artifact import _fsync_directory  # makes the renames of moved files durable

__all__ = ["LOCK_FILE", "PREVIOUS_FOLDER", "RUN_FILES", "RunFolder", "check_run_folder", "open_run_folder"]

LOCK_FILE = ".lock"
PREVIOUS_FOLDER = ".previous"
RUN_FILES: tuple[str, ...] = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.msgpack",
    "checkpoint.prev.msgpack",
    "summary.json",
    "prompt.fpp",
    "curves.png",
    "global_state.msgpack",
)


class RunFolder:
    """An open, locked run folder (made by :func:`open_run_folder`; use it as a context manager).

    Attributes:
      path: the folder.
      previous: ``path/.previous`` while it holds the run being replaced, else ``None``.
    """

    def __init__(self, path: Path, lock_fd: int, run_files: tuple[str, ...], *, created: bool, resumable: bool,
                 moved_aside: bool) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._run_files = run_files
        self._created = created
        self._resumable = resumable
        self._moved_aside = moved_aside
        self.previous = path / PREVIOUS_FOLDER if (path / PREVIOUS_FOLDER).is_dir() else None

    def keep_on_failure(self) -> None:
        """Keep this run's files if it fails from now on (call it once the run has a durable
        checkpoint to resume from, or anything else worth keeping).

        Before this call a failure removes the new run's files and puts the previous run back.
        A resumed run's files are kept from the start.
        """
        self._resumable = True

    def close(self, *, failed: bool = False) -> None:
        """Release the folder: after success, delete the replaced run; after a failure, see the module doc.

        Closing twice is harmless.
        """
        if self._lock_fd is None:
            return
        try:
            if not failed:
                if self.previous is not None:
                    shutil.rmtree(self.previous, ignore_errors=True)
                    self.previous = None
            elif not self._resumable:
                _remove(self.path, _held(self.path, self._run_files))
                if self._moved_aside:
                    _move(self.path / PREVIOUS_FOLDER, self.path, _held(self.path / PREVIOUS_FOLDER, self._run_files))
                    _remove_empty(self.path / PREVIOUS_FOLDER)
                    self.previous = None
        finally:
            _release(self.path, self._lock_fd)
            self._lock_fd = None
            if self._created:
                _remove_empty(self.path)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)


def check_run_folder(path: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False,
                     run_files: Iterable[str] = RUN_FILES) -> Path:
    """Raise what :func:`open_run_folder` would raise for these settings, creating nothing.

    For a check before slow work (loading a backbone): a folder that is a file, cannot be
    written, is in use, or holds another run fails in milliseconds instead of after the load.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      RunFolderError: as :func:`open_run_folder`.
    """
    folder = Path(path)
    files = tuple(run_files)
    _check_options(overwrite, resume)
    if not folder.exists():
        if resume:
            raise RunFolderError(f"{folder} holds no run to resume (the folder does not exist)")
        _check_writable(folder)
        return folder
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a run folder; choose another --out")
    _check_writable(folder)
    lock = folder / LOCK_FILE
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError as err:
            raise RunFolderError(f"cannot open the lock file {lock}: {err.strerror}") from None
        try:
            _lock(folder, fd)
        finally:
            os.close(fd)  # closing drops a probe lock
    _check_contents(folder, files, overwrite=overwrite, resume=resume)
    return folder


def open_run_folder(path: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False,
                    run_files: Iterable[str] = RUN_FILES) -> RunFolder:
    """Create (if needed), lock and prepare a run folder for a new or a resumed run.

    Args:
      path: the folder; its parents are created.
      overwrite: replace the run the folder holds. Its files move to ``path/.previous`` and
        are deleted when the new run closes the folder without a failure.
      resume: continue the run the folder holds (it must hold one); a failure never removes
        its files.
      run_files: the file names that make up a run (default :data:`RUN_FILES`). Other files
        in the folder are never touched.

    Returns:
      The open :class:`RunFolder`; close it (or leave its ``with`` block) when the run ends.

    Raises:
      RunFolderError: ``path`` is a file or cannot be created or written; another run holds
        the lock; the folder holds another run and neither ``overwrite`` nor ``resume`` is
        set; ``resume`` without a run to resume; both ``overwrite`` and ``resume``.
    """
    folder = Path(path)
    files = tuple(run_files)
    _check_options(overwrite, resume)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a run folder; choose another --out")
    created = not folder.exists()
    if resume and created:
        raise RunFolderError(f"{folder} holds no run to resume (the folder does not exist)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if created:
            _remove_empty(folder)
        raise RunFolderError(f"cannot create the run folder {folder}: {err.strerror}") from None
    fd = _acquire(folder, fd)
    try:
        _restore_interrupted_restore(folder, files)
        _check_contents(folder, files, overwrite=overwrite, resume=resume)
        moved_aside = False
        held = _held(folder, files)
        if overwrite and held:
            previous = folder / PREVIOUS_FOLDER
            if previous.exists():  # left by an overwriting run that never finished: replaced by the newer files
                shutil.rmtree(previous)
            previous.mkdir()
            _move(folder, previous, held)
            moved_aside = True
        return RunFolder(folder, fd, files, created=created, resumable=resume, moved_aside=moved_aside)
    except BaseException:
        _release(folder, fd)
        if created:
            _remove_empty(folder)
        raise


# ----------------------------------------------------------------------------- checks


def _check_options(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise RunFolderError("--overwrite and --resume exclude each other: a run either replaces or continues")


def _check_writable(folder: Path) -> None:
    """The nearest existing folder at or above ``folder`` must be writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"cannot create the run folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        reason = "read-only file system" if read_only else "permission denied"
        raise RunFolderError(f"cannot write the run folder {folder}: {existing} is not writable ({reason})")


def _check_contents(folder: Path, files: tuple[str, ...], *, overwrite: bool, resume: bool) -> None:
    held = _held(folder, files)
    if resume and not held:
        raise RunFolderError(f"{folder} holds no run to resume (none of {', '.join(files[:2])}, ...)")
    if held and not (overwrite or resume):
        names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise RunFolderError(f"{folder} holds another run ({names}); "
                             "pass --overwrite to replace it or --resume to continue it")


def _held(folder: Path, files: tuple[str, ...]) -> list[str]:
    return [name for name in files if (folder / name).exists()]


# ----------------------------------------------------------------------------- lock


def _acquire(folder: Path, fd: int) -> int:
    """Lock ``folder/.lock`` (opened as ``fd``) for this process and record its pid there."""
    lock = folder / LOCK_FILE
    while True:
        try:
            stale = _lock(folder, fd)
            opened = os.fstat(fd)
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            break
        os.close(fd)  # its holder removed the file while we locked it: lock the new one
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    if stale is not None and stale != os.getpid():
        warnings.warn(f"{lock} was left by process {stale}, which is no longer running; taking the folder over",
                      stacklevel=3)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock(folder: Path, fd: int) -> int | None:
    """``flock`` ``fd`` exclusively without waiting; returns the pid recorded in it (if any)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"cannot lock {folder / LOCK_FILE}: {err.strerror}") from None
        pid = _recorded_pid(fd)
        raise RunFolderError(f"{folder} is in use by another run (pid {pid if pid is not None else 'unknown'})") from None
    return _recorded_pid(fd)


def _recorded_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _release(folder: Path, fd: int) -> None:
    """Remove the lock file, then drop the lock (a waiting opener re-checks the file it locked)."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- moving files


def _move(source: Path, target: Path, names: Iterable[str]) -> None:
    for name in names:
        os.replace(source / name, target / name)
    _fsync_directory(source)
    _fsync_directory(target)


def _remove(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


def _restore_interrupted_restore(folder: Path, files: tuple[str, ...]) -> None:
    """A ``.previous`` beside no run files: a failed run's clean-up stopped half way; finish it."""
    previous = folder / PREVIOUS_FOLDER
    if previous.is_dir() and not _held(folder, files):
        _move(previous, folder, _held(previous, files))
        _remove_empty(previous)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
