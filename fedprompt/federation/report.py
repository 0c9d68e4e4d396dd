"""The outputs of a federated run: metrics, summary, curves and a terminal progress bar.

* :class:`MetricsWriter`: ``metrics.jsonl``, one JSON object per round, flushed line by line
  so that a killed run keeps every round it finished; :func:`write_metrics` rewrites the
  file atomically (a resumed run keeps exactly its completed rounds).
* :func:`write_summary`: ``summary.json``, written atomically.
* :func:`plot_curves`: ``curves.png``, accuracy and loss against rounds and against the bytes
  sent (matplotlib's Agg backend; matplotlib is imported only when plotting).
* :class:`Progress`: a one-line progress bar on a terminal, or one log line per round
  elsewhere (``round 3/15: accuracy 0.6100, loss 1.2034, 14.8 s``), and notes on the slow
  steps before the first round (loading, compiling).
* :func:`compare_runs`, :func:`plot_comparison`: several runs side by side (``fedprompt
  compare``): a table of accuracy and bytes, and accuracy against rounds and upload.

A round's record uses these keys (all optional except ``round``; a missing or ``null`` value
is left out of the plots): ``round``, ``eval_accuracy``, ``eval_loss``, ``train_loss``,
``bytes_up`` and ``bytes_down`` (the bytes sent in that round, client to server and server to
clients, as counted by :func:`fedprompt.wire.codec.encoded_size`).

Numbers use decimal units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedprompt.wire.artifact import write_atomic

__all__ = [
    "METRICS_FILE",
    "MetricsWriter",
    "Progress",
    "compare_runs",
    "format_bytes",
    "format_duration",
    "plot_comparison",
    "plot_curves",
    "read_metrics",
    "to_json_value",
    "write_metrics",
    "write_summary",
]

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- JSON


def to_json_value(value: Any, *, where: str = "value") -> Any:
    """``value`` as plain JSON data.

    NumPy and JAX scalars (and 0-d arrays) become ``int``, ``float`` or ``bool``; larger arrays
    become nested lists; tuples become lists. NaN and infinities become ``None`` (JSON
    ``null``), since JSON has no spelling for them.

    Args:
        value: A number, string, ``None``, array, or a dict (str keys) or sequence of them.
        where: Names the value in error messages.

    Raises:
        TypeError: A value (or a dict key) that has no JSON form.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where}: JSON keys must be str, got {key!r}")
        return {key: to_json_value(item, where=f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item, where=f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        return _array_to_json(np.asarray(value), where)
    raise TypeError(f"{where}: a {type(value).__name__} has no JSON form")


def _array_to_json(array: np.ndarray, where: str) -> Any:
    if array.ndim:
        return [_array_to_json(item, f"{where}[{index}]") for index, item in enumerate(array)]
    kind = array.dtype.kind
    if kind == "b":
        return bool(array)
    if kind in "iu":
        return int(array)
    if kind == "f" or array.dtype.name == "bfloat16":
        return to_json_value(float(array))
    raise TypeError(f"{where}: an array of dtype {array.dtype} has no JSON form")


class MetricsWriter:
    """Appends one JSON object per line to a ``metrics.jsonl`` file, flushing every line.

    Values go through :func:`to_json_value`: NumPy and JAX scalars become plain numbers, and
    NaN or infinite values are written as ``null``.

    Args:
        path: The file to append to, or an existing folder (then ``metrics.jsonl`` in it).
            Its parent folders are created.

    Example:
      >>> import os, tempfile
      >>> with MetricsWriter(tempfile.mkdtemp()) as writer:
      ...     writer.write({"round": 1, "eval_accuracy": 0.5, "train_loss": float("nan")})
      >>> open(writer.path).read()
      '{"round": 1, "eval_accuracy": 0.5, "train_loss": null}\\n'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO | None = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends ``record`` as one line and flushes it to the operating system.

        Raises:
            TypeError: A value has no JSON form.
            ValueError: The writer is closed.
        """
        if self._file is None:
            raise ValueError(f"the metrics writer for {self.path} is closed")
        self._file.write(_metrics_line(record))
        self._file.flush()

    def close(self) -> None:
        """Closes the file; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _metrics_line(record: Mapping[str, Any]) -> str:
    return json.dumps(to_json_value(dict(record), where="record"), allow_nan=False) + "\n"


def write_metrics(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Replaces ``metrics.jsonl`` by exactly ``records``, atomically; a :class:`MetricsWriter`
    then appends to it.

    Raises:
        TypeError: A value has no JSON form (nothing is written then).
    """
    text = "".join(_metrics_line(record) for record in records)
    return write_atomic(path, text.encode("utf-8"))


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``metrics.jsonl`` in a folder).

    A last line cut short (a run killed while writing it) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise
    return records


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Writes ``summary`` as indented JSON, atomically (see :func:`fedprompt.wire.artifact.write_atomic`).

    Values go through :func:`to_json_value` (NaN and infinities become ``null``).

    Returns:
        The path written.

    Raises:
        TypeError: A value has no JSON form (nothing is written then).
    """
    text = json.dumps(to_json_value(dict(summary), where="summary"), indent=2, allow_nan=False)
    return write_atomic(path, (text + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- curves


def plot_curves(
    metrics: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    baselines: Mapping[str, float | None] | None = None,
    title: str | None = None,
) -> Path:
    """Draws a run's learning curves into a PNG file (``curves.png``).

    Four panels: eval accuracy against the round; eval and train loss against the round;
    eval accuracy against the cumulative bytes sent (``bytes_up + bytes_down``, MB, log
    scale); train loss against the cumulative bytes. Uses matplotlib's Agg backend through
    :class:`matplotlib.figure.Figure`, so no GUI backend and no global pyplot state.

    Args:
        metrics: The per-round records (see the module docstring).
        path: The PNG file; written atomically.
        baselines: Optional reference accuracies, drawn as dashed horizontal lines on both
            accuracy panels: ``centralized_accuracy`` and ``local_only_accuracy`` (``None``
            values are skipped).
        title: A short description of the run, for the figure's title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    records = list(metrics)
    cumulative_mb = _cumulative_megabytes(records)
    rounds = [record.get("round") for record in records]

    figure = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    (acc_round, loss_round), (acc_bytes, loss_bytes) = figure.subplots(2, 2)

    _plot_series(acc_round, rounds, records, "eval_accuracy", "eval accuracy", marker="o")
    _plot_series(loss_round, rounds, records, "eval_loss", "eval loss", marker="o")
    _plot_series(loss_round, rounds, records, "train_loss", "train loss", marker=".", color="tab:orange")
    _plot_series(acc_bytes, cumulative_mb, records, "eval_accuracy", "eval accuracy", marker="o")
    _plot_series(loss_bytes, cumulative_mb, records, "train_loss", "train loss", marker=".", color="tab:orange")

    for axes in (acc_round, acc_bytes):
        _draw_baselines(axes, baselines or {})
        axes.set_ylabel("accuracy")
    for axes in (loss_round, loss_bytes):
        axes.set_ylabel("loss")
    for axes in (acc_round, loss_round):
        axes.set_xlabel("round")
    for axes in (acc_bytes, loss_bytes):
        axes.set_xlabel("cumulative bytes sent (MB, up + down)")
        if any(x > 0 for x in cumulative_mb):
            axes.set_xscale("log")
            axes.xaxis.set_major_formatter(FuncFormatter(_plain_number))
            axes.xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    acc_round.set_title("accuracy by round")
    loss_round.set_title("loss by round")
    acc_bytes.set_title("accuracy by communication")
    loss_bytes.set_title("train loss by communication")
    return _finish(figure, (acc_round, loss_round, acc_bytes, loss_bytes), title, path)


def _finish(figure: Any, panels: Iterable[Any], title: str | None, path: str | os.PathLike[str]) -> Path:
    """Grids and legends on every panel, the title, then the PNG written atomically."""
    for axes in panels:
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue())


def compare_runs(runs: Mapping[str, Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: rounds, final and best eval accuracy, total bytes up and down, seconds.

    ``runs`` maps a label to a run's per-round records (as :func:`read_metrics` returns them).
    The bytes are sums over the rounds; ``bytes_up_per_client_round`` divides the upload by the
    clients that reported (``clients``) in each round, ``bytes_down_per_client_round`` the
    download by the clients sent a message (``sampled``); ``largest_down`` is the largest single
    message sent (None when the records do not say).
    """
    rows = []
    for label, metrics in runs.items():
        records = list(metrics)
        if not records:
            raise ValueError(f"run {label!r} has no rounds")
        accuracies = [a for a in (_finite_or_none(r.get("eval_accuracy")) for r in records) if a is not None]
        up = sum(int(r.get("bytes_up") or 0) for r in records)
        reports = sum(int(r.get("clients") or 0) for r in records)
        down = sum(int(r.get("bytes_down") or 0) for r in records)
        sent = sum(int(r.get("sampled") or 0) for r in records)
        largest = [int(r["largest_down"]) for r in records if r.get("largest_down") is not None]
        rows.append({
            "run": label,
            "rounds": int(records[-1].get("round", len(records))),
            "final_accuracy": accuracies[-1] if accuracies else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_per_client_round": up / reports if reports else None,
            "bytes_down_per_client_round": down / sent if sent else None,
            "largest_down": max(largest) if largest else None,
            "seconds": sum(float(r.get("seconds") or 0.0) for r in records),
        })
    return rows


def plot_comparison(runs: Mapping[str, Iterable[Mapping[str, Any]]], path: str | os.PathLike[str], *,
                    title: str | None = None) -> Path:
    """Draws several runs' eval accuracy against the round and against the cumulative bytes
    sent by the clients (MB, log scale) into one PNG file; ``runs`` maps labels to records."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    by_round, by_bytes = figure.subplots(1, 2)
    for label, metrics in runs.items():
        records = list(metrics)
        uploaded = _cumulative_megabytes(records, keys=("bytes_up",))
        _plot_series(by_round, [r.get("round") for r in records], records, "eval_accuracy", label, marker="o")
        _plot_series(by_bytes, uploaded, records, "eval_accuracy", label, marker="o")
    by_round.set_xlabel("round")
    by_bytes.set_xlabel("cumulative bytes sent by the clients (MB)")
    by_bytes.set_xscale("log")
    by_bytes.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    for axes, name in ((by_round, "accuracy by round"), (by_bytes, "accuracy by upload")):
        axes.set_ylabel("eval accuracy")
        axes.set_title(name)
    return _finish(figure, (by_round, by_bytes), title, path)


def _cumulative_megabytes(records: list[Mapping[str, Any]], keys: tuple[str, ...] = ("bytes_up", "bytes_down")) -> list[float]:
    total = 0
    cumulative = []
    for record in records:
        for key in keys:
            total += _finite_or_none(record.get(key)) or 0
        cumulative.append(total / 1e6)
    return cumulative


def _plot_series(axes: Any, xs: list[Any], records: list[Mapping[str, Any]], key: str, label: str, **style: Any) -> None:
    points = []
    for raw_x, record in zip(xs, records):
        x, y = _finite_or_none(raw_x), _finite_or_none(record.get(key))
        if x is not None and y is not None:
            points.append((x, y))
    if points:
        axes.plot(*zip(*points), label=label, **style)


def _plain_number(value: float, _position: Any = None) -> str:
    return f"{value:g}"


def _minor_log_label(value: float, _position: Any = None) -> str:
    """Labels the minor ticks 2 and 5 of each decade of a log axis, and no others."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) else ""


def _draw_baselines(axes: Any, baselines: Mapping[str, float | None]) -> None:
    styles = {
        "centralized_accuracy": ("centralized", "tab:green"),
        "local_only_accuracy": ("local only", "tab:red"),
    }
    for key, (label, color) in styles.items():
        value = _finite_or_none(baselines.get(key))
        if value is not None:
            axes.axhline(value, linestyle="--", color=color, label=f"{label} ({value:.3f})")


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------- progress


def format_bytes(count: float) -> str:
    """A byte count in decimal units: ``'512 B'``, ``'30.7 KB'``, ``'1.23 MB'``, ``'4.00 GB'``."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        value = count / scale
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if value >= 100 else f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A duration as ``'m:ss'`` or ``'h:mm:ss'``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A federated run's progress: a bar on a terminal, log lines elsewhere, notes on slow steps.

    On a terminal one line is redrawn after each round, for example
    ``round 2/5 [########------------] | acc 0.8123 | 1.23 MB sent | 0:12 elapsed | ~0:18 left``
    (the time left assumes the remaining rounds take as long as the finished ones on average).
    Off a terminal (a log file, CI) and with ``lines``, each round prints one line instead,
    ``round 2/5: accuracy 0.8123, loss 1.2034, 6.0 s``. :meth:`note` prints a line about a slow
    step (loading the backbone, compiling the first round) in either style.

    Args:
        total_rounds: The number of rounds of the run.
        stream: Where to write; ``None`` means ``sys.stderr`` at construction time.
        enabled: ``True``: always draw the bar; ``False``: print nothing; ``None``: the bar on
            a terminal (``stream.isatty()``), elsewhere log lines if ``lines``, else nothing.
        lines: Off a terminal (with ``enabled=None``), print a log line per round rather than
            staying quiet.
        clock: Seconds as a float, for elapsed time (``time.monotonic``; replaceable in tests).

    Example:
      >>> import io
      >>> progress = Progress(5, stream=io.StringIO())  # not a terminal, no lines: prints nothing
      >>> progress.update(1, accuracy=0.5, cumulative_bytes=40_000)
      >>> progress.close()
      >>> log = io.StringIO()
      >>> Progress(5, stream=log, lines=True).update(1, accuracy=0.5, loss=1.25, seconds=14.8)
      >>> log.getvalue()
      'round 1/5: accuracy 0.5000, loss 1.2500, 14.8 s\\n'
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        total_rounds: int,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        lines: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_rounds = max(0, int(total_rounds))
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            self.style = "bar" if _isatty(self.stream) else ("lines" if lines else None)
        else:
            self.style = "bar" if enabled else None
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._width = 0
        self._open = False

    @property
    def enabled(self) -> bool:
        """Whether anything is printed."""
        return self.style is not None

    def update(
        self,
        round_number: int,
        *,
        accuracy: float | None = None,
        cumulative_bytes: float | None = None,
        loss: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """Reports that round ``round_number`` (1-based) has finished.

        Args:
            round_number: The number of finished rounds.
            accuracy: The latest eval accuracy, if any.
            cumulative_bytes: All bytes sent so far (up and down), if counted (bar only).
            loss: The round's loss, if any (log lines only).
            seconds: How long the round took (log lines; default: the time since the last update).
        """
        now = self._clock()
        took = now - self._last if seconds is None else seconds
        self._last = now
        if self.style == "lines":
            self.stream.write(self.render_line(round_number, accuracy=accuracy, loss=loss, seconds=took) + "\n")
            self.stream.flush()
        elif self.style == "bar":
            line = self.render(round_number, accuracy=accuracy, cumulative_bytes=cumulative_bytes)
            padding = " " * max(0, self._width - len(line))
            self.stream.write("\r" + line + padding)
            self.stream.flush()
            self._width = len(line)
            self._open = True

    def note(self, text: str) -> None:
        """Prints ``text`` on a line of its own (above the bar, which the next round redraws)."""
        if self.style is None:
            return
        padding = " " * max(0, self._width - len(text)) if self._open else ""
        self.stream.write(("\r" if self._open else "") + text + padding + "\n")
        self.stream.flush()
        self._open = False
        self._width = 0

    def render(self, round_number: int, *, accuracy: float | None = None, cumulative_bytes: float | None = None) -> str:
        """The progress bar's text (a pure function of its inputs and the clock)."""
        total = self.total_rounds
        done = min(max(0, round_number), total) if total else max(0, round_number)
        filled = round(self.BAR_WIDTH * done / total) if total else 0
        parts = [f"round {round_number}/{total} [{'#' * filled}{'-' * (self.BAR_WIDTH - filled)}]"]
        value = _finite_or_none(accuracy)
        if value is not None:
            parts.append(f"acc {value:.4f}")
        if cumulative_bytes is not None:
            parts.append(f"{format_bytes(cumulative_bytes)} sent")
        elapsed = self._clock() - self._start
        parts.append(f"{format_duration(elapsed)} elapsed")
        if 0 < done < total:
            parts.append(f"~{format_duration(elapsed / done * (total - done))} left")
        return " | ".join(parts)

    def render_line(self, round_number: int, *, accuracy: float | None = None, loss: float | None = None,
                    seconds: float | None = None) -> str:
        """A round's log line, ``round 3/15: accuracy 0.6100, loss 1.2034, 14.8 s`` (missing values left out)."""
        parts = []
        for name, value in (("accuracy", accuracy), ("loss", loss)):
            number = _finite_or_none(value)
            if number is not None:
                parts.append(f"{name} {number:.4f}")
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        return f"round {round_number}/{self.total_rounds}" + (": " + ", ".join(parts) if parts else "")

    def close(self) -> None:
        """Ends the progress bar's line (a newline), once; harmless when nothing was drawn."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
