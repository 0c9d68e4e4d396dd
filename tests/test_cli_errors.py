"""`fedprompt` on the command line: one-line errors and exit codes, Ctrl-C, progress and help.

Runs use the tiny BERT fixture (see tests/test_run_folder.py, whose finished run is shared).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run_folder import copy_run, snapshot, tiny  # noqa: F401 - `tiny` is a fixture

from fedprompt.cli import RUN_HELP, main, run_flags, run_flags_markdown
from fedprompt.config import RunConfig
from fedprompt.federation.run_folder import LOCK_FILE, PREVIOUS_FOLDER, open_run_folder
from fedprompt.simulation import checkpoint
from fedprompt.simulation import run as run_module


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- the run folder


def test_a_failed_run_does_not_touch_a_finished_one(tiny, tmp_path, capsys):
    out = copy_run(tiny, tmp_path / "run")
    before = snapshot(out)
    code, _, err = run_cli(capsys, *tiny.args(out, "--data", tiny.empty, "--overwrite"))
    assert code == 2 and one_line(err) == f"fedprompt: error: {tiny.empty}: no examples (empty file or data)"
    code, _, err = run_cli(capsys, *tiny.args(out))
    assert code == 2
    assert one_line(err).startswith(f"fedprompt: error: {out} holds another run (config.json, metrics.jsonl, ")
    assert err.rstrip().endswith("pass --overwrite to replace it or --resume to continue it")
    assert snapshot(out) == before


def test_a_second_run_on_the_same_folder_fails_with_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open_run_folder(out):
        code, _, err = run_cli(capsys, *tiny.args(out))
    assert code == 2 and one_line(err) == f"fedprompt: error: {out} is in use by another run (pid {os.getpid()})"


def test_out_on_a_file_or_a_read_only_file_system(tiny, tmp_path, capsys, monkeypatch):
    file = tmp_path / "file"
    file.write_text("x")
    code, _, err = run_cli(capsys, *tiny.args(file))
    assert code == 2 and one_line(err) == f"fedprompt: error: {file} is a file, not a run folder; choose another --out"
    code, _, err = run_cli(capsys, "export", tiny.finished / "prompt.fpp", "--format", "peft", "--out", file)
    assert code == 1 and one_line(err) == f"fedprompt: error: {file}: File exists"

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    code, _, err = run_cli(capsys, *tiny.args(tmp_path / "run"))
    assert code == 2 and "is not writable (read-only file system)" in one_line(err)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "write_atomic", _full_disk)  # config.json, the first file a run writes
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny.args(out))
    assert code == 1 and one_line(err) == f"fedprompt: error: No space left on device; {out} is as it was"
    assert not out.exists()


def test_a_full_disk_mid_run_keeps_both_runs_and_resume_finishes(tiny, tmp_path, capsys, monkeypatch):
    out = copy_run(tiny, tmp_path / "run")
    before = snapshot(out)
    save, calls = checkpoint.save_checkpoint, []

    def save_then_fill_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _full_disk()
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fill_up)
    code, _, err = run_cli(capsys, *tiny.args(out, "--overwrite", "--seed", "1"))
    assert code == 1
    assert one_line(err) == ("fedprompt: error: No space left on device; 1 completed round kept; "
                             f"continue with `fedprompt run --resume {out}`")
    assert snapshot(out / PREVIOUS_FOLDER) == before  # the finished run, whole
    assert checkpoint.completed_rounds(out) == 1 and json.loads((out / "config.json").read_text())["seed"] == 1

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    (out / LOCK_FILE).write_text("999999999\n")  # as left by a run killed with -9
    code, stdout, err = run_cli(capsys, "run", "--resume", out, "--no-progress")
    assert code == 0, err
    assert one_line(err) == (f"fedprompt: warning: {out / LOCK_FILE} was left by process 999999999, which is no "
                             "longer running; taking the folder over")
    assert "final accuracy" in stdout and not (out / PREVIOUS_FOLDER).exists() and not (out / LOCK_FILE).exists()
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1


def test_a_corrupted_checkpoint_is_refused_by_resume(tiny, tmp_path, capsys):
    out = copy_run(tiny, tmp_path / "run")
    path = out / checkpoint.CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])
    path.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "run", "--resume", out, "--no-progress")
    assert code == 2
    assert one_line(err).startswith(f"fedprompt: error: {path} is corrupted (checksum mismatch); the previous "
                                    f"round's checkpoint {out / checkpoint.PREVIOUS_CHECKPOINT_FILE} (round 1) is intact")


def test_ctrl_c_before_the_first_round_puts_the_previous_run_back(tiny, tmp_path, capsys, monkeypatch):
    out = copy_run(tiny, tmp_path / "run")
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "simulate", interrupted)
    code, _, err = run_cli(capsys, *tiny.args(out, "--overwrite"))
    assert code == 130
    assert one_line(err) == f"fedprompt: interrupted before the first round ended; {out} is as it was"
    assert snapshot(out) == before


def test_sigint_after_the_first_round_says_how_to_resume(tiny, tmp_path):
    """A real run (in a fresh process, as a user starts it): SIGINT after its first round."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    # A child inherits an ignored SIGINT (a test runner's worker may ignore it) and Python then
    # leaves it ignored: start the run as a terminal would, with SIGINT handled.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fedprompt.cli", *tiny.args(out, "--rounds", "100000")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, inherited)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            # the round's metrics line is written before its checkpoint: wait for the checkpoint
            if metrics.is_file() and metrics.read_text().count("\n") >= 1 and (out / "checkpoint.msgpack").is_file():
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a run of 100,000 rounds must not outlive a failed test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    done = checkpoint.completed_rounds(out)
    assert done >= 1
    # One line, no traceback, and no "PyTorch was not found" notice from transformers.
    assert err.splitlines() == [f"fedprompt: interrupted after round {done}; continue with `fedprompt run --resume {out}`"]
    assert not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- apply


def test_apply_honours_top_with_json_and_warns_of_cut_texts(tiny, capsys):
    prompt = tiny.finished / "prompt.fpp"
    bb = ("--backbone", tiny.backbone)  # a prompt records its backbone's name, not its folder
    code, out, err = run_cli(capsys, "apply", prompt, *bb, "--text", "w5 w20 w40", "--top", "2", "--json")
    assert code == 0 and err == ""
    probabilities = json.loads(out)[0]["probabilities"]
    assert len(probabilities) == 2
    code, out, err = run_cli(capsys, "apply", prompt, *bb, "--text", "w5 w20 w40", "--json")
    every = json.loads(out)[0]["probabilities"]
    assert len(every) == 4 and probabilities == dict(list(every.items())[:2])
    long_text = " ".join(f"w{i}" for i in range(5, 25))
    code, out, err = run_cli(capsys, "apply", prompt, *bb, "--text", "w5", "--text", long_text, "--max-length", "6")
    assert code == 0
    assert one_line(err) == "fedprompt: warning: text 2 has 20 tokens and was cut to 6 (--max-length)"


def test_apply_generate_on_an_encoder_says_it_cannot_generate(tiny, capsys):
    code, _, err = run_cli(capsys, "apply", tiny.finished / "prompt.fpp", "--backbone", tiny.backbone, "--text", "w5",
                           "--generate")
    assert code == 2
    assert one_line(err) == f"fedprompt: error: --generate needs a decoder backbone: '{tiny.backbone.name}' is an encoder and cannot generate text"


# ----------------------------------------------------------------------------- help


def test_help_is_plain_text_and_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text
    for command in ("run", "compare", "info", "inspect", "apply", "export", "import", "bench train-step"):
        assert f"\n  {command} " in text


def test_run_help_has_a_flag_with_its_default_for_every_setting(capsys):
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    flags = run_flags()
    assert [f.field for f in flags] == fields and set(RUN_HELP) == set(fields)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in flags:
        assert f.flag in text
        if f.type is not bool and f.default is not None:
            assert f"{f.help} (default: {f.default})" in text, f.flag
    assert "--rounds N federated rounds (default: 60)" in text and "--overwrite" in text
    table = run_flags_markdown().splitlines()
    assert len(table) == len(fields) + 2 and "| `--rounds` | `60` | federated rounds |" in table
    assert all(row.count(" | ") == 2 for row in table)  # bars inside a cell are escaped
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert run_flags_markdown() in readme, "README's table of run flags is not the CLI's: paste run_flags_markdown()"


# ----------------------------------------------------------------------------- progress


def test_progress_notes_print_above_the_bar_on_a_terminal():
    import io

    from fedprompt.federation.report import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, now = Terminal(), [0.0]
    progress = Progress(2, stream=stream, lines=True, clock=lambda: now[0])
    progress.note("loading backbone tiny")
    now[0] = 3.0
    progress.update(1, accuracy=0.5)
    progress.note("a note")
    progress.update(2, accuracy=0.75)
    progress.close()
    bar = "round 1/2 [##########----------] | acc 0.5000 | 0:03 elapsed | ~0:03 left"
    assert stream.getvalue().split("\n") == [
        "loading backbone tiny",
        # the note overwrites the bar's line (padded to its width); the next round draws a new bar
        f"\r{bar}\ra note" + " " * (len(bar) - len("a note")),
        "\rround 2/2 [####################] | acc 0.7500 | 0:03 elapsed",
        "",
    ]
