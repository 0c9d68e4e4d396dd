"""Run outputs: metrics lines, the summary, the curves PNG and the progress bar."""

from __future__ import annotations

import io
import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fedprompt.federation.report import (
    MetricsWriter,
    Progress,
    format_bytes,
    format_duration,
    plot_curves,
    read_metrics,
    to_json_value,
    write_summary,
)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- JSON


def test_to_json_value_converts_numpy_and_jax_scalars():
    record = {
        "f32": np.float32(0.5),
        "bf16": np.array(1.5, ml_dtypes.bfloat16),
        "i64": np.int64(7),
        "bool": np.bool_(True),
        "jax": jnp.asarray(0.25),
        "jax_int": jnp.asarray(3, jnp.int32),
        "vector": np.array([1, 2]),
        "nan": float("nan"),
        "inf": np.float32(np.inf),
        "nested": {"t": (1, np.float64(-np.inf))},
    }
    got = to_json_value(record)
    assert got == {
        "f32": 0.5,
        "bf16": 1.5,
        "i64": 7,
        "bool": True,
        "jax": 0.25,
        "jax_int": 3,
        "vector": [1, 2],
        "nan": None,
        "inf": None,
        "nested": {"t": [1, None]},
    }
    assert type(got["i64"]) is int and type(got["f32"]) is float and type(got["bool"]) is bool
    with pytest.raises(TypeError, match=r"record\.bad"):
        to_json_value({"bad": object()}, where="record")


def test_metrics_writer_writes_json_lines_and_flushes_each(tmp_path):
    writer = MetricsWriter(tmp_path)  # a folder: metrics.jsonl inside it
    assert writer.path == tmp_path / "metrics.jsonl"
    writer.write({"round": 1, "eval_accuracy": np.float32(0.5), "train_loss": float("nan")})
    # Readable before close: a killed run keeps what it wrote.
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1, "eval_accuracy": 0.5, "train_loss": null}\n'
    writer.write({"round": 2, "eval_accuracy": jnp.asarray(0.75), "train_loss": np.inf, "bytes_up": np.int64(30_000)})
    writer.close()
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"round": 1, "eval_accuracy": 0.5, "train_loss": None},
        {"round": 2, "eval_accuracy": 0.75, "train_loss": None, "bytes_up": 30000},
    ]
    with pytest.raises(ValueError, match="closed"):
        writer.write({"round": 3})


def test_metrics_writer_appends_and_read_metrics_skips_a_cut_last_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"round": 1})
    with MetricsWriter(path) as writer:
        writer.write({"round": 2})
    with open(path, "a") as file:
        file.write('{"round": 3, "eval_acc')  # killed mid-line
    assert read_metrics(path) == [{"round": 1}, {"round": 2}]


def test_write_summary_is_atomic_json(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_summary(path, {"final_accuracy": np.float32(0.8125), "diverged": float("nan"), "rounds": 30})
    text = path.read_text()
    assert json.loads(text) == {"final_accuracy": 0.8125, "diverged": None, "rounds": 30}
    assert text.startswith('{\n  "final_accuracy"') and text.endswith("}\n")

    def failing_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        write_summary(path, {"final_accuracy": 0.1})
    assert path.read_text() == text
    assert os.listdir(tmp_path) == ["summary.json"]
    monkeypatch.undo()
    with pytest.raises(TypeError):
        write_summary(path, {"bad": object()})
    assert path.read_text() == text


# ----------------------------------------------------------------------------- curves


def _synthetic_metrics(rounds=12):
    metrics = []
    for r in range(1, rounds + 1):
        metrics.append(
            {
                "round": r,
                "eval_accuracy": 0.9 - 0.6 * np.exp(-r / 4) if r % 2 == 0 else None,  # evaluated every 2 rounds
                "eval_loss": 2.5 * np.exp(-r / 5) + 0.3 if r % 2 == 0 else None,
                "train_loss": np.float32(2.0 * np.exp(-r / 4) + 0.2),
                "bytes_up": 8 * 50_000,
                "bytes_down": 8 * 50_000,
            }
        )
    metrics[3]["train_loss"] = float("nan")  # skipped, not drawn
    return metrics


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_curves_writes_a_png(tmp_path):
    path = plot_curves(
        _synthetic_metrics(),
        tmp_path / "curves.png",
        baselines={"centralized_accuracy": 0.92, "local_only_accuracy": 0.41},
        title="FedAvg, soft prompt, MiniLM, 8 clients",
    )
    data = path.read_bytes()
    width, height = _png_size(data)
    assert (width, height) == (1100, 800)
    assert len(data) > 10_000
    assert os.listdir(tmp_path) == ["curves.png"]


def test_plot_curves_handles_empty_and_zero_byte_runs(tmp_path):
    data = plot_curves([], tmp_path / "empty.png").read_bytes()
    assert _png_size(data) == (1100, 800)
    data = plot_curves([{"round": 1, "eval_accuracy": 0.5, "train_loss": 1.0}], tmp_path / "nobytes.png").read_bytes()
    assert _png_size(data) == (1100, 800)


# ----------------------------------------------------------------------------- progress


def test_format_bytes_and_duration():
    assert format_bytes(512) == "512 B"
    assert format_bytes(30_720) == "30.72 KB"
    assert format_bytes(1_234_567) == "1.23 MB"
    assert format_bytes(456_000_000) == "456.0 MB"
    assert format_bytes(4e12) == "4000.0 GB"
    assert format_duration(12.4) == "0:12"
    assert format_duration(3725) == "1:02:05"


def test_progress_is_quiet_when_not_a_tty():
    stream = io.StringIO()
    with Progress(5, stream=stream) as progress:
        progress.update(1, accuracy=0.5, cumulative_bytes=1000)
        progress.update(2, accuracy=0.6, cumulative_bytes=2000)
    assert stream.getvalue() == ""


def test_progress_draws_one_line_on_a_tty():
    stream, clock = FakeTTY(), FakeClock()
    progress = Progress(5, stream=stream, clock=clock)
    clock.now += 6.0
    progress.update(1, accuracy=0.5, cumulative_bytes=400_000)
    clock.now += 6.0
    progress.update(2, accuracy=0.8123, cumulative_bytes=1_230_000)
    progress.close()
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    last = text.rsplit("\r", 1)[1].rstrip()
    assert last == "round 2/5 [########------------] | acc 0.8123 | 1.23 MB sent | 0:12 elapsed | ~0:18 left"
    assert "round 1/5" in text and "400.0 KB sent" in text


def test_progress_enabled_overrides_isatty():
    stream = io.StringIO()
    progress = Progress(3, stream=stream, enabled=True, clock=FakeClock())
    progress.update(3)
    progress.close()
    assert stream.getvalue() == "\rround 3/3 [####################] | 0:00 elapsed\n"
    tty = FakeTTY()
    Progress(3, stream=tty, enabled=False).update(1)
    assert tty.getvalue() == ""


def _write_run(folder, records):
    folder.mkdir()
    with MetricsWriter(folder / "metrics.jsonl") as writer:
        for record in records:
            writer.write(record)


def test_compare_runs_table_plot_and_cli(tmp_path, capsys):
    from fedprompt.cli import main
    from fedprompt.federation.report import compare_runs

    grad = [{"round": r, "eval_accuracy": a, "bytes_up": 8 * 1000, "bytes_down": 8 * 2000, "clients": 8, "seconds": 2.0,
             "sampled": 8, "largest_down": 2000 + r} for r, a in ((1, 0.3), (2, 0.6), (3, 0.5))]
    zo = [{"round": r, "eval_accuracy": 0.1 * r, "bytes_up": 7 * 250, "bytes_down": 8 * 2000, "clients": 7, "seconds": 1.0}
          for r in (1, 2, 3)]
    rows = compare_runs({"grad": grad, "zo": zo})
    assert rows[0] == {"run": "grad", "rounds": 3, "final_accuracy": 0.5, "best_accuracy": 0.6, "bytes_up": 24_000,
                       "bytes_down": 48_000, "bytes_up_per_client_round": 1000.0, "bytes_down_per_client_round": 2000.0,
                       "largest_down": 2003, "seconds": 6.0}
    assert rows[1]["bytes_down_per_client_round"] is None and rows[1]["largest_down"] is None  # records without them
    assert rows[1]["bytes_up_per_client_round"] == 250.0 and rows[1]["final_accuracy"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no rounds"):
        compare_runs({"empty": []})

    _write_run(tmp_path / "grad", grad)
    _write_run(tmp_path / "zo", zo)
    png = tmp_path / "compare.png"
    assert main(["compare", str(tmp_path / "grad"), str(tmp_path / "zo"), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "grad" in out and "1.00 KB" in out and "250 B" in out and "2.00 KB" in out  # up, and down per client
    assert out.splitlines()[2].split()[-2] == "-"  # the zo run's records do not say who was sent what
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(tmp_path / "grad"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["bytes_up"] == 24_000
    assert main(["compare", str(tmp_path / "grad"), "--labels", "a,b"]) == 2
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
