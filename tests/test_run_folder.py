"""Run folders (refusal, lock, overwrite that keeps the previous run until the new one is done),
checksummed checkpoints, and `fedprompt.run` checking everything before it touches --out.

The end-to-end cases use the tiny BERT fixture with a word-level tokenizer; one finished run
is made once per test run (:func:`tiny`) and copied where a test needs one.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, with_word_tokenizer

import fedprompt
from fedprompt.config import RunConfig
from fedprompt.errors import CheckpointError, RunFolderError
from fedprompt.federation.run_folder import LOCK_FILE, PREVIOUS_FOLDER, RUN_FILES, check_run_folder, open_run_folder
from fedprompt.server import algorithms
from fedprompt.simulation import checkpoint
from fedprompt.simulation import run as run_module

LABELS = ("ant", "bee", "cat", "dog")


@dataclasses.dataclass(frozen=True)
class Tiny:
    root: Path
    backbone: Path
    data: Path
    empty: Path
    finished: Path  # a finished 2-round run: never modified, copy it (see `copy_run`)
    log: str  # what that run printed (not a terminal: one line per round)

    def args(self, out: Path, *extra: str) -> list[str]:
        """`fedprompt run` arguments of a cheap run into ``out``."""
        return ["run", "--backbone", str(self.backbone), "--data", str(self.data), "--rounds", "2", "--clients", "2",
                "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "4", "--max-length", "8",
                "--virtual-tokens", "2", "--partition", "iid", "--out", str(out), "--no-progress", *extra]

    def config(self, out: Path, **changes) -> RunConfig:
        values = {"backbone": str(self.backbone), "data": str(self.data), "rounds": 2, "clients": 2,
                  "clients_per_round": 2, "local_steps": 1, "batch_size": 4, "max_length": 8, "num_virtual_tokens": 2,
                  "partition": "iid", "out": str(out)}
        return RunConfig(**{**values, **changes})


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    backbone = with_word_tokenizer(FIXTURES / "bert", root / "bert")
    rows = [{"text": f"w{5 + i % 7} w{20 + i % 5} w{40 + (i % 4) * 10}", "label": LABELS[i % 4]} for i in range(48)]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    empty = root / "empty.jsonl"
    empty.write_text("")
    tiny = Tiny(root, backbone, data, empty, root / "finished", "")
    stream = io.StringIO()
    fedprompt.run(tiny.config(tiny.finished), stream=stream)
    return dataclasses.replace(tiny, log=stream.getvalue())


def copy_run(tiny: Tiny, dest: Path) -> Path:
    shutil.copytree(tiny.finished, dest)
    return dest


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the folder API


def test_a_folder_holding_a_run_is_refused_unless_overwritten_or_resumed(tmp_path):
    folder = tmp_path / "run"
    with open_run_folder(folder) as run:
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        (run.path / "config.json").write_text("{}")
        (run.path / "notes.txt").write_text("mine")  # not a run file: never touched
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]  # lock released and removed
    for opener in (check_run_folder, open_run_folder):
        with pytest.raises(RunFolderError, match=r"holds another run \(config.json\); pass --overwrite .* --resume"):
            opener(folder)
    with pytest.raises(RunFolderError, match="exclude each other"):
        open_run_folder(folder, overwrite=True, resume=True)
    with pytest.raises(RunFolderError, match="holds no run to resume"):
        open_run_folder(tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        check_run_folder(tmp_path / "file")
    with pytest.raises(RunFolderError, match="is a file"):
        check_run_folder(tmp_path / "file" / "run")


def test_overwrite_keeps_the_previous_run_until_the_new_one_finishes(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    old = {"config.json": b"old config", "metrics.jsonl": b'{"round": 1}\n', "summary.json": b"old summary"}
    for name, data in old.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("mine")

    # A failure before the new run can be resumed: the folder is exactly as it was.
    with pytest.raises(OSError):
        with open_run_folder(folder, overwrite=True) as run:
            assert snapshot(folder / PREVIOUS_FOLDER) == old and run.previous == folder / PREVIOUS_FOLDER
            (folder / "config.json").write_bytes(b"new config")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert snapshot(folder) == {**old, "notes.txt": b"mine"}

    # A failure after the new run has a checkpoint: its files stay for --resume, the old run stays whole aside.
    with pytest.raises(KeyboardInterrupt):
        with open_run_folder(folder, overwrite=True) as run:
            (folder / "config.json").write_bytes(b"new config")
            (folder / "checkpoint.msgpack").write_bytes(b"round 1")
            run.keep_on_failure()
            raise KeyboardInterrupt
    assert snapshot(folder / PREVIOUS_FOLDER) == old
    assert (folder / "checkpoint.msgpack").read_bytes() == b"round 1"
    with pytest.raises(RunFolderError, match="holds another run"):
        check_run_folder(folder)

    # The resumed run finishes: the old run is deleted only now.
    with open_run_folder(folder, resume=True):
        assert (folder / PREVIOUS_FOLDER).is_dir()
        (folder / "summary.json").write_bytes(b"new summary")
    assert snapshot(folder) == {"config.json": b"new config", "checkpoint.msgpack": b"round 1",
                                "summary.json": b"new summary", "notes.txt": b"mine"}


def test_a_failed_run_in_a_new_folder_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "run"
    with pytest.raises(ValueError):
        with open_run_folder(folder):
            (folder / "config.json").write_text("{}")
            raise ValueError("bad")
    assert not folder.exists()


def test_a_second_run_on_the_folder_is_refused_with_the_holders_pid(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with open_run_folder(folder):
        for opener in (check_run_folder, open_run_folder):
            with pytest.raises(RunFolderError, match=rf"{folder} is in use by another run \(pid {os.getpid()}\)"):
                opener(folder, overwrite=True)
    # Another process holding the lock (as a run does: flock on .lock, its pid inside).
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{{os.getpid()}}\\n".encode())
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {holder.pid}\)"):
            open_run_folder(folder)
    finally:
        holder.communicate("", timeout=30)
    # The holder died: the lock it left is taken over, with a warning.
    with pytest.warns(UserWarning, match=rf"left by process {holder.pid}, which is no longer running"):
        with open_run_folder(folder):
            assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_read_only_folder_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(RunFolderError, match=r"cannot write the run folder .*run: .* is not writable \(read-only file system\)"):
        check_run_folder(tmp_path / "run")


def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(path, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(RunFolderError, match="cannot create the run folder .*: Read-only file system"):
        open_run_folder(tmp_path / "run")


def test_run_files_name_every_file_a_run_writes(tiny):
    written = {p.name for p in tiny.finished.iterdir()}
    assert written == {"config.json", "metrics.jsonl", "checkpoint.msgpack", "checkpoint.prev.msgpack", "summary.json",
                       "prompt.fpp", "curves.png"}
    assert written <= set(RUN_FILES)
    assert {checkpoint.CHECKPOINT_FILE, checkpoint.PREVIOUS_CHECKPOINT_FILE, checkpoint.CONFIG_FILE} <= set(RUN_FILES)


# ----------------------------------------------------------------------------- checkpoints


def _state(value=1.0, size=(64, 32)):
    algo = algorithms.fedadam(0.1)
    state = algo.init({"prompt": {"embeddings": jnp.full(size, value)}})
    return algo.apply(state, {"prompt": {"embeddings": jnp.ones(size)}})


def test_flipped_bytes_in_a_checkpoint_are_refused_naming_the_file(tmp_path):
    config = {"seed": 0}
    checkpoint.save_checkpoint(tmp_path, completed_rounds=1, state=_state(0.5), config=config)
    checkpoint.save_checkpoint(tmp_path, completed_rounds=2, state=_state(0.25), config=config)
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    where = data.find(np.asarray(_state(0.25).params["prompt"]["embeddings"]).tobytes()[:256])  # the prompt's array
    assert where > 0
    data[where + 64: where + 128] = bytes(b ^ 0x5A for b in data[where + 64: where + 128])
    path.write_bytes(bytes(data))
    message = (rf"{path} is corrupted \(checksum mismatch\); the previous round's checkpoint "
               rf"{tmp_path / checkpoint.PREVIOUS_CHECKPOINT_FILE} \(round 1\) is intact")
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_checkpoint(tmp_path, template=_state(), config=config)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.completed_rounds(tmp_path)
    # The previous round's checkpoint is whole: renamed into place, it resumes from round 1.
    os.replace(tmp_path / checkpoint.PREVIOUS_CHECKPOINT_FILE, path)
    rounds, state = checkpoint.load_checkpoint(tmp_path, template=_state(), config=config)
    assert rounds == 1
    np.testing.assert_array_equal(state.params["prompt"]["embeddings"], _state(0.5).params["prompt"]["embeddings"])


def test_a_checkpoint_far_larger_than_the_state_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, completed_rounds=1, state=_state(size=(4, 8)), config={})
    with open(tmp_path / checkpoint.CHECKPOINT_FILE, "ab") as file:
        file.write(b"\0" * 1_000_000)
    monkeypatch.setattr(checkpoint.serialization, "msgpack_restore", lambda data: pytest.fail("parsed"))
    with pytest.raises(CheckpointError, match=r"is 1,\d{3},\d{3} bytes, more than a checkpoint of this run's state"):
        checkpoint.load_checkpoint(tmp_path, template=_state(size=(4, 8)), config={})


def test_a_checkpoint_of_the_old_format_is_refused(tmp_path):
    from flax import serialization

    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(serialization.msgpack_serialize(
        {"format": checkpoint.FORMAT, "version": 1, "completed_rounds": 1, "state": {}}))
    with pytest.raises(CheckpointError, match="not a fedprompt checkpoint of version 2"):
        checkpoint.completed_rounds(tmp_path)


# ----------------------------------------------------------------------------- fedprompt.run


def test_a_run_prints_its_slow_steps_and_a_line_per_round_off_a_terminal(tiny):
    lines = tiny.log.splitlines()
    assert lines[:3] == [f"loading backbone {tiny.backbone}", f"loading data from {tiny.data}",
                         "round 1/2: compiling, then training (the first round takes longest)"]
    metrics = [json.loads(line) for line in (tiny.finished / "metrics.jsonl").read_text().splitlines()]
    for line, m in zip(lines[3:], metrics, strict=True):
        assert line == (f"round {m['round']}/2: accuracy {m['eval_accuracy']:.4f}, loss {m['eval_loss']:.4f}, "
                        f"{m['seconds']:.1f} s")


def test_data_and_backbone_errors_leave_a_finished_run_whole(tiny, tmp_path):
    from fedprompt.errors import DataError, ModelNotFoundError

    out = copy_run(tiny, tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(DataError):
        fedprompt.run(tiny.config(out, data=str(tiny.empty)), overwrite=True, progress=False)
    with pytest.raises(ModelNotFoundError):
        fedprompt.run(tiny.config(out, backbone=str(tmp_path / "no-backbone")), overwrite=True, progress=False)
    with pytest.raises(RunFolderError, match="holds another run"):
        fedprompt.run(tiny.config(out), progress=False)
    assert snapshot(out) == before
    new = tmp_path / "new"
    with pytest.raises(DataError):
        fedprompt.run(tiny.config(new, data=str(tiny.empty)), progress=False)
    assert not new.exists()


def test_a_failure_inside_the_folder_puts_the_previous_run_back(tiny, tmp_path, monkeypatch):
    out = copy_run(tiny, tmp_path / "run")
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "simulate", full_disk)
    with pytest.raises(OSError) as caught:
        fedprompt.run(tiny.config(out), overwrite=True, progress=False)
    assert caught.value.__notes__ == [f"{out} is as it was"]
    assert snapshot(out) == before
