"""Every measured table of the README, from one script and the JSON files kept beside it.

    python examples/results/reproduce.py run NAME [NAME ...]     # measure, write examples/results/NAME.json
    python examples/results/reproduce.py run NAME --quick --out DIR   # the whole pipeline, shrunk
    python examples/results/reproduce.py render [--check]        # README.md tables from the JSON

``run`` measures experiment NAME with the installed fedprompt and writes ``NAME.json``:
``fedprompt`` (the version), ``machine`` (:func:`fedprompt.bench.machine`, with the load average
sampled at the start and again at the end), ``command``, ``measured`` (the UTC date) and
``rows``, one dict of raw numbers per measured row (a table row; for the robustness table, one
cell of it), each with its label texts and every setting it ran with (``config``).

``render`` rewrites what lies between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
in README.md: the table and a one-line caption naming the fedprompt version, CPU, core count
and load average it was measured with. ``--check`` writes nothing and exits 1, naming the
tables, when README.md differs from what the JSON renders.

An experiment is data (:data:`EXPERIMENTS`): the settings its rows share, one entry per row
(its label texts and its own settings: :class:`fedprompt.RunConfig` fields for federated runs,
the bench function's arguments for the benchmarks) and the table's columns. A new table, say a
sweep of the server learning rate, is one more entry; a change of the library's defaults
needs no change here, since every row states its settings.

Example (a table of two server learning rates on the default task would be):

    Experiment("server_lr", "simulate", DEFAULT_TASK,
               rows=(run_row({"server lr": "0.01"}, server_lr=0.01), run_row({"server lr": "0.03"}, server_lr=0.03)),
               columns=(text("server lr"), value("final accuracy", "final_accuracy", accuracy)))

``--rows 2,5`` measures only those rows (1-based) and merges them into the ``NAME.json`` already
in the output folder (under a lock, so several processes can measure one table's rows at once);
every row records its own load average and date. A row whose settings hold ``seeds`` (a list)
is measured once per seed; its numbers are the means over the seeds and ``by_seed`` keeps each
seed's own. ``--rows 1 --seeds 1`` measures only seed 1 of row 1 and merges it with the seeds
the JSON holds (a table's caption and the row's ``config["seeds"]`` say which were measured).

``--quick`` shrinks every row (federated runs: 1 round, 512 training and 64 test examples, at
most 8 clients and 4 per round; benchmarks: one repeat, smaller batches and client counts) and
writes only into ``--out DIR``: it exercises the whole pipeline in minutes, and its captions
say so. ``--backbone`` runs every row on another backbone (a name or checkpoint folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent
"""Where ``run`` writes ``NAME.json`` and ``render`` reads it."""
README = RESULTS.parents[1] / "README.md"
SCRIPT = "examples/results/reproduce.py"

Row = Mapping[str, Any]
"""One measured row as the JSON holds it: ``label``, ``config``, optional ``emphasis``, numbers."""


class ResultsError(Exception):
    """A results file or README marker that cannot be used (missing, unknown, malformed)."""


# ----------------------------------------------------------------------------- cell formats


def significant(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, in fixed notation: 0.0123, 1.23, 12.3, 123, 1230."""
    if x == 0 or not math.isfinite(x):
        return f"{x:.0f}" if x == 0 else str(x)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{decimals}f}"
    if decimals and abs(float(text)) >= 10 ** (digits - decimals):  # rounded up into the next decade
        text = f"{x:.{decimals - 1}f}"
    return text


def accuracy(x: float) -> str:
    """An accuracy (a fraction) to three decimals: ``0.716``."""
    return f"{x:.3f}"


def decimal_bytes(n: float) -> str:
    """A byte count in decimal units to three significant figures: ``254 B``, ``71.0 KB``, ``8.52 MB``."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n / scale < 999.5 or unit == "GB":
            return f"{significant(n / scale)} {unit}"
    raise AssertionError("unreachable")


def mib(n: float) -> str:
    """Bytes in MiB to one decimal: ``337.8 MiB``."""
    return f"{n / 2**20:.1f} MiB"


def gib(n: float) -> str:
    """Bytes in GiB to three significant figures: ``1.70 GiB``, ``106 GiB``."""
    return f"{significant(n / 2**30)} GiB"


def duration(seconds: float) -> str:
    """A short time: ``0.02 ms`` (two decimals below 1 ms), ``20.3 ms``, ``1.20 s`` (three figures)."""
    if seconds < 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 0.9995:
        return f"{significant(seconds * 1e3)} ms"
    return f"{significant(seconds)} s"


def lookup(row: Row, field: str) -> Any:
    """``row[field]``, where ``field`` may be a dotted path into nested dicts (``seconds.numpy``);
    None when any part is missing."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return None
        value = value[part]
    return value


# ----------------------------------------------------------------------------- columns


Cell = Callable[[Row, Sequence[Row]], str]
"""``cell(row, rows)``: a row's markdown cell ("" when it has no value); ``rows`` is the whole
table, for cells relative to another row or to the column."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table.

    Attributes:
      header: the header text, as the README shows it.
      cell: how a measured row becomes this column's cell.
      key: the name a row's ``emphasis`` list uses to print this cell in bold.
    """

    header: str
    cell: Cell
    key: str = ""


def text(key: str, header: str | None = None) -> Column:
    """A column of the rows' label texts ``row["label"][key]`` (headed ``key`` unless ``header``)."""
    return Column(header or key, lambda row, rows: str(row["label"].get(key, "")), key)


def value(header: str, field: str, fmt: Callable[[Any], str], key: str = "") -> Column:
    """A column of one measured number (``field``, dotted for nested dicts) in format ``fmt``."""
    def cell(row: Row, rows: Sequence[Row]) -> str:
        number = lookup(row, field)
        return "" if number is None else fmt(number)

    return Column(header, cell, key or field)


def seeded(header: str, field: str, fmt: Callable[[Any], str] = accuracy, key: str = "") -> Column:
    """:func:`value` of a row measured over seeds: the mean, then each seed's value in brackets
    (a row of one run shows its value alone)."""
    def cell(row: Row, rows: Sequence[Row]) -> str:
        number = lookup(row, field)
        if number is None:
            return ""
        each = [lookup(seed, field) for seed in row.get("by_seed", ())]
        if len(each) < 2 or any(x is None for x in each):
            return fmt(number)
        return f"{fmt(number)} ({', '.join(fmt(x) for x in each)})"

    return Column(header, cell, key or field)


def points(header: str, field: str, reference: str) -> Column:
    """``field`` minus ``reference`` (two fractions of one row) in percentage points: ``-2.4``."""
    def cell(row: Row, rows: Sequence[Row]) -> str:
        a, b = lookup(row, field), lookup(row, reference)
        return "" if a is None or b is None else f"{100 * (a - b):+.1f}"

    return Column(header, cell, f"{field}-{reference}")


def column_max(header: str, field: str, fmt: Callable[[Any], str]) -> Column:
    """:func:`value`, with the column's largest value in bold."""
    def cell(row: Row, rows: Sequence[Row]) -> str:
        number = lookup(row, field)
        if number is None:
            return ""
        top = max(x for x in (lookup(r, field) for r in rows) if x is not None)
        shown = fmt(number)
        return f"**{shown}**" if shown == fmt(top) else shown

    return Column(header, cell, field)


def _index(row: Row, rows: Sequence[Row]) -> int:
    return next(i for i, r in enumerate(rows) if r is row)


def _bytes_against_first(row: Row, rows: Sequence[Row]) -> str:
    """Bytes up, with how many times fewer than the first row's where they differ from the row above."""
    i = _index(row, rows)
    shown = decimal_bytes(row["total_bytes_up"])
    if i and shown != decimal_bytes(rows[i - 1]["total_bytes_up"]):
        shown += f" ({rows[0]['total_bytes_up'] / row['total_bytes_up']:.1f}x less)"
    return shown


def _final_and_best(row: Row, rows: Sequence[Row]) -> str:
    return f"{accuracy(row['final_accuracy'])} ({accuracy(row['best_accuracy'])})"


def _step_time(row: Row, rows: Sequence[Row]) -> str:
    """The median step time, or the range an earlier measurement reported (``317–447 ms``)."""
    if row.get("step_seconds_range"):
        low, high = row["step_seconds_range"]
        return f"{low * 1e3:.0f}–{high * 1e3:.0f} ms"
    return duration(row["step_seconds_median"])


def _generation_rows(rows: Sequence[Row]) -> list[Row]:
    """The generative table's rows from its runs: the first run (soft prompt, with baselines)
    gives the untuned model, centralized tuning, its own federated scores and local-only; every
    other run its federated scores. A federated row carries the first run's centralized and
    local-only ROUGE-L for the difference columns."""
    scores = ("exact_match", "rouge_l")

    def shown(model: str, run: Row, prefix: str, *, federated: bool = False) -> Row:
        row: Row = {"label": {"model": model}, **{k: run.get(f"{prefix}_{k}") for k in scores}}
        row["by_seed"] = [{k: seed.get(f"{prefix}_{k}") for k in scores} for seed in run.get("by_seed", ())]
        if federated:
            row["total_bytes"] = run.get("total_bytes")
            row.update({f"{who}_rouge_l": first.get(f"{who}_rouge_l") for who in ("centralized", "local_only")})
            row["emphasis"] = ["rouge_l"] if run is first else []
        return row

    first, *others = rows
    return [
        shown("untuned `wordnet-gpt2` (the prompt runs start from)", first, "untuned"),
        shown("centralized soft prompt (all training data, same examples seen)", first, "centralized"),
        shown(f"federated {first['label']['method']}", first, "final", federated=True),
        *(shown(f"federated {run['label']['method']}", run, "final", federated=True) for run in others),
        shown("local-only soft prompts (each client alone, mean over clients)", first, "local_only"),
    ]


def _attack_cell(row: Row, rows: Sequence[Row]) -> str:
    """The accuracy under attack: in bold with its share of the clean run's where it is the best
    rule against this attack, marked ``(collapse)`` at or below chance (one over the labels)."""
    acc = row["final_accuracy"]
    rivals = [r["final_accuracy"] for r in rows if r["label"]["attack"] == row["label"]["attack"]]
    clean = next((r["final_accuracy"] for r in rows if r["config"].get("attack") is None), None)
    if len(rivals) > 1 and acc == max(rivals) and clean:
        return f"**{accuracy(acc)}** ({100 * acc / clean:.0f}% of clean)"
    if acc <= 1 / row["num_labels"]:
        return f"{accuracy(acc)} (collapse)"
    return accuracy(acc)


@dataclasses.dataclass(frozen=True)
class Pivot:
    """A table whose cells are rows: one table row per value of label ``rows_by``, one column
    per value of label ``columns_by`` (both in order of first appearance)."""

    corner: str
    rows_by: str
    columns_by: str
    cell: Cell


# ----------------------------------------------------------------------------- experiments


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One README table: how its rows are measured and how they are shown.

    Attributes:
      name: the JSON file's stem and the README markers' name.
      kind: how a row is measured, a key of :data:`KINDS`.
      settings: what every row shares (RunConfig fields, or the bench function's arguments).
      rows: one dict per measured row: ``label`` (texts by column), ``config`` (this row's own
        settings over ``settings``) and optionally ``emphasis`` (column keys shown in bold).
      columns: the table's columns (unless ``pivot``).
      pivot: the table's layout when its cells are rows.
      figure: a PNG file name beside the JSON, drawn from the measured rows' ``curve`` by
        ``fedprompt compare``'s plot each time the experiment runs (None: no figure).
      shown: the table's rows from the measured ones (None: the measured rows themselves), for
        a table that shows more than one row per run (a run's baselines as rows of their own).
    """

    name: str
    kind: str
    settings: Mapping[str, Any]
    rows: tuple[Mapping[str, Any], ...]
    columns: tuple[Column, ...] = ()
    pivot: Pivot | None = None
    figure: str | None = None
    shown: Callable[[Sequence[Row]], list[Row]] | None = None


def run_row(label: Mapping[str, str], emphasis: Sequence[str] = (), **config: Any) -> dict[str, Any]:
    """A row: its label texts, its settings and the columns it shows in bold."""
    row: dict[str, Any] = {"label": dict(label), "config": config}
    if emphasis:
        row["emphasis"] = list(emphasis)
    return row


DEFAULT_TASK: dict[str, Any] = {
    "backbone": "minilm", "data": None, "method": "prompt", "num_virtual_tokens": 20, "algorithm": "fedadam",
    "server_lr": 0.03, "rounds": 15, "clients": 16, "clients_per_round": 8, "partition": "dirichlet", "alpha": 0.5,
    "local_steps": 8, "batch_size": 16, "local_optimizer": "adam", "local_lr": 0.01, "max_length": 32,
    "train_examples": None, "eval_examples": 1024, "seed": 0,
}
"""The README's default task: WordNet supersenses on MiniLM, 16 clients (Dirichlet 0.5), 8 per
round, 8 local Adam steps (lr 0.01) of 16 examples, FedAdam (server lr 0.03), 15 rounds, seed 0."""

NEW_DEFAULT: dict[str, Any] = {
    **DEFAULT_TASK, "rounds": 60, "local_steps": 2, "local_optimizer": "sgd", "local_lr": 0.5, "eval_every": 20,
}
"""The default task with the defaults the sweep (``default_sweep``) chose: 2 local SGD steps (lr 0.5)
a round for 60 rounds under FedAdam (server lr 0.03), evaluated every 20 rounds: the same
examples as ``DEFAULT_TASK``'s 8 Adam steps x 15 rounds."""

GENERATIVE_TASK: dict[str, Any] = {
    "backbone": "wordnet-gpt2", "task": "generate", "generate_examples": 256, "max_new_tokens": 8,
    "seeds": [0, 1, 2],
}
"""The built-in generative task (WordNet gloss -> supersense name) on the built-in decoder with
``fedprompt run --task generate --backbone wordnet-gpt2``'s defaults, 256 test glosses spread
over the test set generated and scored, three seeds."""

OLD_SCHEDULE: dict[str, Any] = {key: DEFAULT_TASK[key] for key in ("rounds", "local_steps", "local_optimizer", "local_lr")}
"""The earlier defaults' local schedule (8 Adam steps, lr 0.01, x 15 rounds), for rows beside the new one."""

FEDAVG = {**DEFAULT_TASK, "algorithm": "fedavg", "server_lr": None}

PROTECTED_DEPLOYMENT = {
    "tls": True, "nodes": 3, "timeout": 1800.0, "node_files": True,
    "backbone": "minilm", "method": "prompt", "num_virtual_tokens": 20, "algorithm": "fedavg", "rounds": 4,
    "clients": 3, "clients_per_round": 3, "train_examples": 384, "eval_examples": 256, "local_steps": 8,
    "batch_size": 16, "round_timeout": 600.0, "seed": 0,
}
"""The protections' costs: one loopback deployment per row (3 SuperNodes, each its own file cut from
the built-in WordNet set, MiniLM, 4 rounds), as the walk-through in examples/flower_app/README.md."""

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "default_task", "simulate", NEW_DEFAULT,
        rows=(
            run_row({"method": "soft prompt (20 tokens) + head",
                     "algorithm": "FedAdam (server lr 0.03), 2 SGD steps (lr 0.5) x 60 rounds: the default"},
                    emphasis=["final_accuracy"], baselines=True, seeds=[0, 1, 2]),
        ),
        columns=(
            text("method"), text("algorithm"),
            seeded("final accuracy", "final_accuracy"),
            value("bytes sent (up + down)", "total_bytes", decimal_bytes),
            seeded("centralized", "centralized_accuracy"),
            seeded("local-only", "local_only_accuracy"),
            points("federated - centralized (points)", "final_accuracy", "centralized_accuracy"),
            points("federated - local-only (points)", "final_accuracy", "local_only_accuracy"),
        ),
    ),
    Experiment(
        "default_time", "simulate", NEW_DEFAULT,
        rows=(
            run_row({"defaults": "before: 8 Adam steps (lr 0.01) x 15 rounds, evaluated every round"},
                    **OLD_SCHEDULE, eval_every=1),
            run_row({"defaults": "now: 2 SGD steps (lr 0.5) x 60 rounds, evaluated every 20"}),
        ),
        columns=(
            text("defaults", "`fedprompt run` defaults (FedAdam, server lr 0.03, 8 of 16 clients a round)"),
            value("final accuracy", "final_accuracy", accuracy),
            value("wall time", "wall_seconds", lambda x: f"{x / 60:.1f} min"),
            Column("time / before's", lambda row, rows: f"{row['wall_seconds'] / rows[0]['wall_seconds']:.2f}x"
                   if row.get("wall_seconds") and rows[0].get("wall_seconds") else "", "time_ratio"),
            value("bytes sent (up + down)", "total_bytes", decimal_bytes),
        ),
    ),
    Experiment(
        "generative_task", "simulate", GENERATIVE_TASK,
        rows=(
            run_row({"method": "soft prompt (20 tokens)"}, baselines=True),
            run_row({"method": "prefix (20 tokens a layer)"}, method="prefix"),
            run_row({"method": "zo (FedKSeed seeds, soft prompt)"}, method="zo"),
        ),
        columns=(
            text("model"),
            seeded("exact match", "exact_match"),
            seeded("ROUGE-L", "rouge_l"),
            points("ROUGE-L - local-only (points)", "rouge_l", "local_only_rouge_l"),
            points("ROUGE-L - centralized (points)", "rouge_l", "centralized_rouge_l"),
            value("bytes sent (up + down)", "total_bytes", decimal_bytes),
        ),
        shown=_generation_rows,
    ),
    Experiment(
        "second_task", "simulate", {**NEW_DEFAULT, "wordnet_pos": "verb", "seeds": [0, 1, 2]},
        rows=(
            run_row({"defaults": "before: 8 Adam steps (lr 0.01) x 15 rounds"},
                    **OLD_SCHEDULE, eval_every=5),
            run_row({"defaults": "now: 2 SGD steps (lr 0.5) x 60 rounds"}),
        ),
        columns=(
            text("defaults", "`fedprompt run` defaults on the verb supersenses (user JSONL files)"),
            seeded("final accuracy", "final_accuracy"),
            Column("now - before (points)", lambda row, rows: f"{100 * (row['final_accuracy'] - rows[0]['final_accuracy']):+.1f}"
                   if row.get("final_accuracy") is not None and rows[0].get("final_accuracy") is not None else "",
                   "second_task_gain"),
            value("bytes sent (up + down)", "total_bytes", decimal_bytes),
        ),
    ),
    Experiment(
        "default_sweep", "simulate", {**DEFAULT_TASK, "eval_every": 5},
        rows=(
            run_row({"local": "Adam (lr 0.01)", "schedule": "4 steps x 30 rounds", "server": "FedAdam, lr 0.03",
                     "prompt": "20 tokens"}, local_steps=4, rounds=30),
            run_row({"local": "Adam (lr 0.01)", "schedule": "2 steps x 60 rounds", "server": "FedAdam, lr 0.03",
                     "prompt": "20 tokens"}, local_steps=2, rounds=60),
            run_row({"local": "Adam (lr 0.01)", "schedule": "1 step x 120 rounds", "server": "FedAdam, lr 0.01",
                     "prompt": "20 tokens"}, local_steps=1, rounds=120, server_lr=0.01),
            run_row({"local": "Adam (lr 0.01)", "schedule": "2 steps x 60 rounds", "server": "FedAdam, lr 0.03",
                     "prompt": "10 tokens"}, local_steps=2, rounds=60, num_virtual_tokens=10),
            run_row({"local": "SGD (lr 0.5)", "schedule": "8 steps x 15 rounds", "server": "FedAdam, lr 0.03",
                     "prompt": "20 tokens"}, local_optimizer="sgd", local_lr=0.5),
            run_row({"local": "SGD (lr 0.5)", "schedule": "4 steps x 30 rounds", "server": "FedAdam, lr 0.03",
                     "prompt": "20 tokens"}, local_steps=4, rounds=30, local_optimizer="sgd", local_lr=0.5, eval_every=10),
            run_row({"local": "SGD (lr 0.5)", "schedule": "**2 steps x 60 rounds, the new default**",
                     "server": "FedAdam, lr 0.03", "prompt": "20 tokens"}, emphasis=["final_accuracy"],
                    local_steps=2, rounds=60, local_optimizer="sgd", local_lr=0.5, eval_every=10),
            run_row({"local": "SGD (lr 0.5)", "schedule": "1 step x 120 rounds", "server": "FedAdam, lr 0.01",
                     "prompt": "20 tokens"}, local_steps=1, rounds=120, server_lr=0.01, local_optimizer="sgd",
                    local_lr=0.5, eval_every=10),
        ),
        columns=(
            text("local", "local optimizer"), text("schedule", "local steps x rounds"), text("server"), text("prompt"),
            value("final accuracy", "final_accuracy", accuracy),
            value("bytes sent (up + down)", "total_bytes", decimal_bytes),
        ),
    ),
    Experiment(
        "label_skew", "simulate", {**DEFAULT_TASK, "eval_every": 5},
        rows=(
            run_row({"head": "random", "algorithm": "FedAdam (server lr 0.03)", "local": "plain"}),
            run_row({"head": "class means", "algorithm": "FedAdam (server lr 0.03)", "local": "plain"},
                    head_init="class_means"),
            run_row({"head": "class means", "algorithm": "FedAvg", "local": "plain"},
                    head_init="class_means", algorithm="fedavg", server_lr=None),
            run_row({"head": "class means", "algorithm": "FedAdam (server lr 0.03)", "local": "logit-adjusted (tau 1)"},
                    head_init="class_means", logit_adjustment=1.0),
        ),
        columns=(
            text("head"), text("algorithm"), text("local", "local loss"),
            value("accuracy before round 1", "initial_accuracy", accuracy),
            value("after round 5", "accuracy_by_round.5", accuracy),
            column_max("final accuracy", "final_accuracy", accuracy),
            value("wall time", "wall_seconds", lambda x: f"{x / 60:.1f} min"),
        ),
    ),
    Experiment(
        "compression", "simulate", DEFAULT_TASK,
        rows=(
            run_row({"compression": "none (float32)"}),
            run_row({"compression": "`--compress int8`"}, compress="int8"),
            run_row({"compression": "`--compress int4`"}, compress="int4"),
            run_row({"compression": "`--compress int4 --error-feedback`"}, compress="int4", error_feedback=True),
        ),
        columns=(
            text("compression"),
            value("final accuracy", "final_accuracy", accuracy),
            Column("bytes up, all rounds", _bytes_against_first, "total_bytes_up"),
            value("up per client and round", "bytes_up_per_client_round", decimal_bytes),
        ),
    ),
    Experiment(
        "gradient_free", "simulate", {**FEDAVG, "eval_every": 3},
        rows=(
            run_row({"method": "gradient soft prompt + head", "sends": "the prompt + head delta (17,690 floats)",
                     "work": "8 forward + backward passes"}, method="prompt"),
            run_row({"method": "BBT / FedBPT (CMA-ES, d = 500, 10 candidates ranked on 4 examples), LDA head",
                     "sends": "z (500 floats), sigma, head delta", "work": "8 generations x (10 x 4 + 16) examples"},
                    method="bbt", head_init="lda"),
            run_row({"method": "ZO / FedKSeed, random head, the state down", "sends": "8 (seed index, scalar) pairs",
                     "work": "8 x 2 forwards"}, method="zo", zo_downlink="state"),
            *(run_row({"method": f"ZO / FedKSeed, LDA head, seeds down (seed {seed})",
                       "sends": "8 (seed index, scalar) pairs", "work": "8 x 2 forwards"},
                      emphasis=["up_per_client", "down_per_client"], method="zo", head_init="lda", zo_head="frozen",
                      seed=seed)
              for seed in (0, 1, 2)),
        ),
        columns=(
            text("method"), text("sends", "what a client sends"),
            value("before round 1", "initial_accuracy", accuracy),
            Column("final accuracy (best)", _final_and_best, "final_accuracy"),
            value("up per client and round", "bytes_up_per_client_round", decimal_bytes, "up_per_client"),
            value("down per client and round", "bytes_down_per_client_round", decimal_bytes, "down_per_client"),
            value("largest message down", "largest_down", decimal_bytes),
            value("set-up per client (up / down, once)", "setup_bytes", str),
            text("work", "local work per round"),
            value("wall time", "wall_seconds", lambda x: f"{x / 60:.1f} min"),
        ),
        figure="methods.png",
    ),
    Experiment(
        "attacks", "simulate",
        {**FEDAVG, "rounds": 8, "train_examples": 16000, "eval_examples": 512, "attack_fraction": 0.2,
         "attack_scale": 10.0},
        rows=(
            run_row({"attack": "none", "aggregator": "mean"}, aggregator="mean"),
            run_row({"attack": "sign flip", "aggregator": "mean"}, attack="sign_flip", aggregator="mean"),
            run_row({"attack": "sign flip", "aggregator": "median"}, attack="sign_flip", aggregator="median"),
            run_row({"attack": "sign flip", "aggregator": "trimmed mean (beta 0.2)"}, attack="sign_flip",
                    aggregator="trimmed_mean", trim_beta=0.2),
            run_row({"attack": "scaling", "aggregator": "mean"}, attack="scaling", aggregator="mean"),
            run_row({"attack": "scaling", "aggregator": "median"}, attack="scaling", aggregator="median"),
        ),
        pivot=Pivot("attack (x10)", rows_by="attack", columns_by="aggregator", cell=_attack_cell),
    ),
    Experiment(
        "memory", "memory", {"backbone": "minilm", "batch_size": 16, "tokens": 64},
        rows=(
            run_row({"step": "inference (forward + loss)"}, step="inference"),
            run_row({"step": "ZO step (two forwards + the update)"}, step="zo_step"),
            run_row({"step": "BBT fitness evaluation"}, step="bbt_fitness"),
            run_row({"step": "BBT generation (20 candidates one by one + CMA-ES tell + head step)"}, step="bbt_generation"),
            run_row({"step": "gradient step (Adam, backprop through the backbone)"}, step="gradient_step"),
        ),
        columns=(
            text("step"),
            value("temporaries", "compiled_temporaries_bytes", mib),
            value("peak (arguments + outputs + temporaries)", "compiled_peak_bytes", mib),
        ),
    ),
    Experiment(
        "train_step", "train_step", {"backbone": "minilm", "batch_size": 16, "tokens": 64, "virtual_tokens": 20, "steps": 10},
        rows=(run_row({"method": "soft prompt"}, method="prompt"), run_row({"method": "deep prefix"}, method="prefix")),
        columns=(
            text("method"),
            value("trainable floats", "trainable_floats", lambda n: f"{n:,}"),
            Column("step time", _step_time, "step_seconds_median"),
            value("compiled temporaries", "compiled_temporaries_bytes", mib),
            value("compiled peak (args + outputs + temps)", "compiled_peak_bytes", mib),
        ),
    ),
    Experiment(
        "train_efficiency", "train_efficiency",
        {"backbone": "minilm", "batch_size": 16, "tokens": 64, "virtual_tokens": 20, "steps": 20},
        rows=(run_row({"precision": "float32"}, precision="float32"),
              run_row({"precision": "bfloat16 (weights and activations; the prompt float32)"}, precision="bfloat16")),
        columns=(
            text("precision"),
            value("fedprompt step (median)", "step_seconds", duration),
            value("PyTorch PEFT step (median)", "peft_step_seconds", duration),
            value("fedprompt's time / PEFT's", "ratio_vs_peft", lambda x: f"{x:.2f}x"),
            value("step GFLOP (XLA)", "step_flops", lambda x: f"{x / 1e9:.1f}"),
            value("achieved GFLOP/s", "achieved_flops_per_second", lambda x: f"{x / 1e9:.0f}"),
            Column("matmul 2048 x 2048 GFLOP/s (XLA / NumPy / PyTorch)", lambda row, rows: " / ".join(
                f"{row['matmul_by_library'][k] / 1e9:.0f}" if k in row["matmul_by_library"] else "-"
                for k in ("xla", "numpy", "torch")), "matmul_by_library"),
            value("of the best matmul", "fraction_of_matmul_peak", lambda x: f"{100 * x:.0f}%"),
        ),
    ),
    Experiment(
        "aggregate", "aggregate", {"repeats": 5},
        rows=tuple(
            run_row({"size": f"{k} x {math.prod(shape):,}"}, clients=k, shape=list(shape))
            for shape in ((20, 384), (100, 4096)) for k in (10, 100, 1000)
        ),
        columns=(
            text("size", "clients x floats"),
            value("NumPy", "seconds.numpy", duration),
            value("`kernels.make_clipped_mean` (jit)", "seconds.kernel_mean", duration),
            column_max("speed-up", "speedup_vs_numpy.kernel_mean", lambda x: f"{x:.1f}x"),
            value("GB/s", "gb_per_second.kernel_mean", lambda x: f"{x:.1f}"),
            column_max("of bandwidth", "fraction_of_bandwidth.kernel_mean", lambda x: f"{100 * x:.0f}%"),
            value("clip + sum", "seconds.fused_clip", duration),
            value("server's mean from the decoded rows and their norms (finite, clip, sum)", "seconds.one_pass_mean",
                  duration),
            value("of bandwidth", "fraction_of_bandwidth.one_pass_mean", lambda x: f"{100 * x:.0f}%"),
            value("the same without the norms (squares the rows first)", "seconds.host_pass_unnormed", duration),
            value("compiled pass (on a device array)", "seconds.one_pass_compiled", duration),
            value("receive K messages (decode into rows, square them)", "seconds.receive", duration),
            value("server round (receive + mean)", "seconds.server_round", duration),
            value("generic `Aggregation` from K decoded arrays", "seconds.aggregation", duration),
        ),
    ),
    Experiment(
        "protections", "deployment", PROTECTED_DEPLOYMENT,
        rows=(
            run_row({"channel": "`--insecure`", "protection": "none"}, tls=False),
            run_row({"channel": "TLS + authentication", "protection": "none"}),
            run_row({"channel": "TLS + authentication", "protection": "secure aggregation"}, secagg=True),
            run_row({"channel": "TLS + authentication", "protection": "secure aggregation + central DP (epsilon 8)"},
                    secagg=True, dp="central", dp_target_epsilon=8.0),
            run_row({"channel": "TLS + authentication", "protection": "local DP (z = 1)"},
                    dp="local", dp_noise_multiplier=1.0),
        ),
        columns=(
            text("channel"), text("protection"),
            value("seconds per round", "seconds_per_round", lambda x: f"{x:.1f} s"),
            value("first round", "first_round_seconds", lambda x: f"{x:.1f} s"),
            value("up per client", "bytes_up_per_client", decimal_bytes),
            value("down per client", "bytes_down_per_client", decimal_bytes),
            value("protocol messages per client", "secagg_bytes_per_client", lambda x: decimal_bytes(x) if x else "0"),
            value("epsilon after 4 rounds", "epsilon", lambda x: f"{x:.1f}" if isinstance(x, (int, float)) else ""),
        ),
    ),
    Experiment(
        "big_backbones", "abstract_memory", {"batch_size": 4, "tokens": 512},
        rows=(
            run_row({"backbone": "Llama-2-7B", "devices": "1"}, model="llama-7b", devices=1),
            run_row({"backbone": "Llama-2-70B", "devices": "8 (weights split)"}, model="llama-70b", devices=8),
            run_row({"backbone": "Qwen2-0.5B", "devices": "1"}, model="qwen2-0.5b", devices=1),
        ),
        columns=(
            text("backbone"), text("devices"),
            value("bf16 weights", "weight_bytes", gib),
            value("weights per device", "weight_bytes_per_device", gib),
            value("peak per device, no remat", "no_remat.peak", gib),
            value("peak per device, remat", "remat.peak", gib),
            value("temporaries, no remat", "no_remat.temporaries", gib),
            value("temporaries, remat", "remat.temporaries", gib),
            value("compile (remat)", "remat.compile_seconds", lambda x: f"{x:.0f} s"),
        ),
    ),
    Experiment(
        "simulate", "bench_simulate",
        {"backbone": "minilm", "local_steps": 1, "client_block": "auto", "repeats": 3,
         "compare_blocks": [], "loops": ["per_client", "per_step"]},
        rows=tuple(run_row({"clients": str(k)}, clients_per_round=k, compare_blocks=[32]) for k in (8, 32, 128))
        + (run_row({"clients": "1000"}, clients_per_round=1000, repeats=1, loops=["per_client"]),),
        columns=(
            text("clients", "clients per round"),
            value("engine, `--client-block auto`", "seconds.vmapped", duration),
            value("its blocks", "client_block", lambda b: f"{b} client" + ("s" if b > 1 else "")),
            value("per-client loop", "seconds.per_client", duration),
            value("engine speed / loop's", "speedup_vs_per_client", lambda x: f"{x:.2f}x"),
            value("per-step loop", "seconds.per_step", duration),
            value("engine, blocks of 32", "seconds.vmapped_32", duration),
            value("compiled temporaries of the round as one block", "memory.compiled_temporaries_bytes", gib),
        ),
    ),
)}
"""Every measured README table, by name."""


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Context:
    """What the rows of one ``run`` share: every row's settings and loaded things (backbones,
    a report that measures several rows at once)."""

    configs: list[dict[str, Any]]
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def backbone(self, name: str) -> Any:
        if ("backbone", name) not in self.cache:
            from fedprompt.backbones.loading import load_backbone

            self.cache[("backbone", name)] = load_backbone(name)
        return self.cache[("backbone", name)]


def _plain(x: Any) -> Any:
    """NumPy scalars and tuples as JSON values."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def measure_run(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One federated run through ``fedprompt.simulate(RunConfig(**config))``: its final and best
    accuracy, bytes (from :func:`fedprompt.federation.report.compare_runs`, as ``fedprompt
    compare`` prints them) and, with ``baselines``, the centralized and local-only accuracies."""
    import fedprompt
    from fedprompt.federation.report import compare_runs

    config = dict(config)
    pos = config.pop("wordnet_pos", None)
    if pos is not None:
        config["data"], config["test_data"] = wordnet_user_files(pos, context)
    run_config = fedprompt.RunConfig(**config)
    result = fedprompt.simulate(run_config, backbone=context.backbone(run_config.backbone))
    summary = result.summary
    compared = compare_runs({"run": result.metrics})[0]
    numbers = {
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": compared["best_accuracy"],
        "final_eval_loss": summary["final_eval_loss"],
        "total_bytes_up": summary["total_bytes_up"],
        "total_bytes_down": summary["total_bytes_down"],
        "total_bytes": summary["total_bytes_up"] + summary["total_bytes_down"],
        "bytes_up_per_client_round": compared["bytes_up_per_client_round"],
        "bytes_down_per_client_round": compared["bytes_down_per_client_round"],
        "largest_down": compared["largest_down"],
        "rounds": summary["rounds"],
        "num_labels": len(result.label_names),
        "train_examples": summary["train_examples"],
        "test_examples": summary["test_examples"],
        "wall_seconds": summary["wall_seconds"],
    }
    evaluated = [m for m in result.metrics if m.get("eval_accuracy") is not None]
    numbers["accuracy_by_round"] = {str(m["round"]): m["eval_accuracy"] for m in evaluated}
    numbers["curve"] = [{key: m.get(key) for key in ("round", "eval_accuracy", "bytes_up", "bytes_down")}
                        for m in result.metrics]
    if "setup" in summary:
        numbers["initial_accuracy"] = summary["setup"].get("initial_accuracy")
        numbers["setup_bytes_up_per_client"] = summary["setup"]["bytes_up"]
        numbers["setup_bytes"] = (f"{decimal_bytes(summary['setup']['bytes_up'])} / "
                                  f"{decimal_bytes(summary['setup']['bytes_down'])}")
    if "baselines" in summary:
        numbers["centralized_accuracy"] = summary["baselines"]["centralized_accuracy"]
        numbers["local_only_accuracy"] = summary["baselines"]["local_only_accuracy"]
    if "generation" in summary:  # a generative run: its scores, the untuned start's and the baselines'
        generation = summary["generation"]
        numbers["final_exact_match"] = summary["final_exact_match"]
        numbers["final_rouge_l"] = summary["final_rouge_l"]
        numbers["samples"] = generation["samples"]
        for who, scores in (("untuned", generation.get("untuned", {})), ("centralized", None), ("local_only", None)):
            for score in ("exact_match", "rouge_l"):
                found = scores.get(score) if scores is not None else summary.get("baselines", {}).get(f"{who}_{score}")
                if found is not None:
                    numbers[f"{who}_{score}"] = found
    return _plain(numbers)


WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's ``wordnet-base`` puts the WordNet database files."""


def wordnet_user_files(pos: str, context: Context) -> tuple[str, str]:
    """A row's ``wordnet_pos`` (``verb``): the training and test JSONL files that
    ``python -m fedprompt.data.build_wordnet --pos verb`` writes, built once per run in a
    temporary folder from ``wordnet-base``, so the row runs on them as a user's files."""
    import tempfile

    from fedprompt.data import build_wordnet

    if ("wordnet", pos) not in context.cache:
        data_file = WORDNET_DIR / build_wordnet.DATA_FILES[pos]
        if not data_file.is_file():
            raise ResultsError(f"{data_file} is missing: apt-get install wordnet-base")
        folder = Path(tempfile.mkdtemp(prefix=f"fedprompt-wordnet-{pos}-"))
        build_wordnet.write_user_files(data_file, folder, build_wordnet.read_lexnames(WORDNET_DIR, pos))
        context.cache[("wordnet", pos)] = (str(folder / "train.jsonl"), str(folder / "test.jsonl"))
    return context.cache[("wordnet", pos)]


ROW_KEYS = ("seeds", "wordnet_pos")
"""Settings of a federated row that are not RunConfig fields: its seeds and its built data."""


def measure_memory(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One step of ``fedprompt bench memory``
    (:func:`fedprompt.client.memory.gradient_free_memory_report`, computed once for all rows)."""
    from fedprompt.client.memory import gradient_free_memory_report

    key = ("memory", config["backbone"], config["batch_size"], config["tokens"])
    if key not in context.cache:
        backbone = context.backbone(config["backbone"])
        context.cache[key] = (gradient_free_memory_report(backbone, batch_size=config["batch_size"],
                                                          max_length=config["tokens"]), backbone.weight_bytes())
    report, weights_bytes = context.cache[key]
    return {"weights_bytes": weights_bytes, **{f"compiled_{k}_bytes": v for k, v in report[config["step"]].items()}}


def measure_train_step(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One method of ``fedprompt bench train-step`` (:func:`fedprompt.bench.train_step`)."""
    from fedprompt import bench

    rows = bench.train_step(context.backbone(config["backbone"]), methods=(config["method"],),
                            batch_size=config["batch_size"], tokens=config["tokens"],
                            virtual_tokens=config["virtual_tokens"], steps=config["steps"])
    return _plain(rows[0])


def measure_train_efficiency(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """``fedprompt bench train`` (:func:`fedprompt.bench.train_efficiency`) in one precision,
    the backbone's weights and activations in it, beside PyTorch PEFT's step when installed."""
    import jax.numpy as jnp

    from fedprompt import bench
    from fedprompt.backbones.loading import load_backbone

    dtype = jnp.dtype(config["precision"])
    backbone = load_backbone(config["backbone"], dtype=dtype, compute_dtype=dtype)
    result = bench.train_efficiency(backbone, batch_size=config["batch_size"], tokens=config["tokens"],
                                    virtual_tokens=config["virtual_tokens"], steps=config["steps"])
    result.pop("machine")
    return _plain(result)


def measure_aggregate(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One size of ``fedprompt bench aggregate`` (:func:`fedprompt.bench.aggregate`), with the
    copy bandwidth measured beside it."""
    from fedprompt import bench

    result = bench.aggregate(clients=(config["clients"],), shapes=(tuple(config["shape"]),), repeats=config["repeats"])
    return _plain({**result["rows"][0], "bandwidth": result["bandwidth"]})


def measure_bench_simulate(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One round size of ``fedprompt bench simulate`` (:func:`fedprompt.bench.simulate_round`)
    and its block's compiled memory (:func:`fedprompt.bench.block_memory`, compiled once for
    every row's size over the same simulation, as the command does)."""
    from fedprompt import bench

    backbone = context.backbone(config["backbone"])
    key = ("block_memory", config["backbone"], config["local_steps"])
    if key not in context.cache:
        sizes = tuple(sorted({c["clients_per_round"] for c in context.configs}))
        context.cache[key] = {r["clients"]: r for r in bench.block_memory(backbone, clients=sizes,
                                                                            local_steps=config["local_steps"])}
    numbers: dict[str, Any] = {"clients_per_round": config["clients_per_round"]}
    numbers.update(bench.simulate_round(backbone, clients_per_round=config["clients_per_round"],
                                        local_steps=config["local_steps"], repeats=config["repeats"],
                                        client_block=config["client_block"],
                                        compare_blocks=tuple(config["compare_blocks"]), loops=tuple(config["loops"])))
    numbers["memory"] = context.cache[key][config["clients_per_round"]]
    return _plain(numbers)


APP = RESULTS.parents[1] / "examples" / "flower_app"
"""The Flower App the deployment rows launch."""

DEPLOYMENT_KEYS = ("tls", "nodes", "timeout", "node_files")
"""The settings of a deployment row that are not run-config settings of the app."""


def deployment_numbers(metrics: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per-round costs of one deployed run from its ``metrics.jsonl`` lines and ``summary.json``.

    Bytes are per client and round (means over rounds: ``bytes_up`` over the clients whose update
    arrived, ``bytes_down`` and the secure-aggregation protocol's ``secagg_bytes`` over the
    sampled clients); ``seconds_per_round`` is the median over every round but the first (the
    first compiles the client update on every node), ``first_round_seconds`` apart.
    """
    if not metrics:
        raise ResultsError("the deployed run wrote no round")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    later = sorted(m["seconds"] for m in metrics[1:]) or [metrics[0]["seconds"]]
    numbers = {
        "rounds": len(metrics),
        "bytes_up_per_client": mean([m["bytes_up"] / max(1, m["clients"]) for m in metrics]),
        "bytes_down_per_client": mean([m["bytes_down"] / max(1, m["sampled"]) for m in metrics]),
        "secagg_bytes_per_client": mean([m.get("secagg_bytes", 0) / max(1, m["sampled"]) for m in metrics]),
        "wire_bytes_up_per_client": mean([(m.get("wire_bytes_up") or 0) / max(1, m["clients"]) for m in metrics]),
        "first_round_seconds": metrics[0]["seconds"],
        "seconds_per_round": later[len(later) // 2] if len(later) % 2 else (later[len(later) // 2 - 1] + later[len(later) // 2]) / 2,
        "clients_per_round": mean([m["clients"] for m in metrics]),
        "final_accuracy": summary.get("final_accuracy"),
        "epsilon": metrics[-1].get("epsilon"),
        "wall_seconds": summary.get("wall_seconds"),
    }
    return _plain(numbers)


def write_node_files(folder: Path, nodes: int, train_examples: int, test_examples: int) -> Callable[[int], dict[str, str]]:
    """Each node's own files, cut from the built-in WordNet set as ``examples/flower_app/README.md``
    ("Each SuperNode its own data") does: the glosses in a seeded random order (the set is sorted
    by supersense), node i gets training rows i, i + nodes, ... of the first ``train_examples``
    and held-out rows of the first ``test_examples`` test glosses; the server's held-out file is
    the next ``test_examples``. Returns each node's node config."""
    import numpy as np

    from fedprompt.data import datasets

    train, test = datasets.load_wordnet_supersenses()
    train_order = np.random.default_rng(0).permutation(len(train.texts))
    test_order = np.random.default_rng(1).permutation(len(test.texts))
    folder.mkdir(parents=True)

    def write(path: Path, ds: Any, rows: Any) -> None:
        path.write_text("".join(json.dumps({"text": ds.texts[i], "label": ds.label_names[ds.labels[i]]}) + "\n"
                                for i in rows))

    for node in range(nodes):
        write(folder / f"node-{node}.jsonl", train, train_order[node:train_examples:nodes])
        write(folder / f"node-{node}-test.jsonl", test, test_order[node:test_examples:nodes])
    write(folder / "server-test.jsonl", test, test_order[test_examples:2 * test_examples])
    (folder / "label-names.txt").write_text(",".join(train.label_names))
    return lambda i: {"data-path": str(folder / f"node-{i}.jsonl"), "test-path": str(folder / f"node-{i}-test.jsonl")}


def measure_deployment(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One run of ``examples/flower_app`` on a loopback deployment
    (:class:`fedprompt.flower.loopback.LoopbackDeployment`: a SuperLink and ``nodes``
    SuperNodes on 127.0.0.1), over TLS with SuperNode authentication and ``client-keys`` when
    ``tls`` (credentials made by :func:`fedprompt.flower.credentials.write_credentials`), else
    ``--insecure``; every other setting is the app's run config (underscores for dashes). The
    rows of one ``run`` share one XLA compilation cache. Numbers: :func:`deployment_numbers`."""
    import tempfile

    from fedprompt.flower.credentials import write_credentials
    from fedprompt.flower.loopback import LoopbackDeployment

    if "xla_cache" not in context.cache:
        context.cache["xla_cache"] = tempfile.mkdtemp(prefix="fedprompt-results-xla-")
    run_config = {k.replace("_", "-"): v for k, v in config.items() if k not in DEPLOYMENT_KEYS and v is not None}
    with tempfile.TemporaryDirectory(prefix="fedprompt-deployment-") as folder:
        tmp = Path(folder)
        credentials = None
        if config["tls"]:
            credentials = write_credentials(tmp / "credentials", config["nodes"]).out_dir
            run_config["client-keys"] = (credentials / "client-keys.txt").read_text().strip()
        node_config = None
        if config.get("node_files"):
            node_config = write_node_files(tmp / "data", config["nodes"], config["train_examples"],
                                           config["eval_examples"])
            run_config.update({"node-data": True, "label-names": (tmp / "data" / "label-names.txt").read_text(),
                               "test-data": str(tmp / "data" / "server-test.jsonl"), "federated-eval": True})
            run_config.pop("train-examples", None)
        out = tmp / "out"
        with LoopbackDeployment(tmp, config["nodes"], app=APP, credentials=credentials, node_config=node_config,
                                jax_cache=Path(context.cache["xla_cache"]), env={"JAX_PLATFORMS": "cpu"}) as local:
            status = local.wait(local.run({**run_config, "out": str(out)}, timeout=config["timeout"]))
            if status != 0 or not (out / "summary.json").exists():
                raise ResultsError(f"the deployed run failed (exit status {status}):\n{local.run_log()}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((out / "summary.json").read_text())
    return deployment_numbers(metrics, summary)


def _quick_deployment(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "rounds": 2, "train_examples": 96, "eval_examples": 32, "local_steps": 2, "batch_size": 8}


def measure_abstract_memory(config: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """One ``fedprompt bench memory --abstract MODEL`` (XLA's per-device memory analysis of a
    prompt-tuning step on a shape-only backbone, compiled, never run), in a subprocess: the
    command asks for its host devices before JAX starts. Both rows of its report (with and
    without remat) and the weights' bytes."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedprompt-memory-") as folder:
        out = Path(folder) / "memory.json"
        command = [sys.executable, "-m", "fedprompt.cli", "bench", "memory", "--abstract", config["model"],
                   "--devices", str(config["devices"]), "--batch-size", str(config["batch_size"]),
                   "--tokens", str(config["tokens"]), "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise ResultsError(f"`{' '.join(command[1:])}` failed:\n{done.stderr[-3000:]}")
        report = json.loads(out.read_text())
    return _plain({key: report[key] for key in ("parameters", "weight_bytes", "weight_bytes_per_device", "devices")}
                  | {name: report["rows"][name] for name in ("no_remat", "remat")})


def _check_run(config: Mapping[str, Any]) -> None:
    from fedprompt.config import RunConfig

    if config.get("wordnet_pos") is not None and config["wordnet_pos"] != "verb":
        raise ResultsError(f"wordnet_pos must be 'verb', got {config['wordnet_pos']!r}")
    RunConfig(**{k: v for k, v in config.items() if k not in ROW_KEYS})  # raises ConfigError naming the bad setting


def _quick_run(config: dict[str, Any]) -> dict[str, Any]:
    from fedprompt.config import RunConfig

    full = dataclasses.asdict(RunConfig(**{k: v for k, v in config.items() if k != "out" and k not in ROW_KEYS}))
    clients = min(full["clients"], 8)
    return {**config, "rounds": 1, "train_examples": min(512, full["train_examples"] or 512), "eval_examples": 64,
            "clients": clients, "clients_per_round": min(full["clients_per_round"], 4, clients)}


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a kind of row is measured, how ``--quick`` shrinks its settings, and how they are
    checked before the first row starts (so a bad row fails in seconds, not after an hour)."""

    measure: Callable[[Mapping[str, Any], Context], dict[str, Any]]
    quick: Callable[[dict[str, Any]], dict[str, Any]]
    check: Callable[[Mapping[str, Any]], None] = lambda config: None


KINDS: dict[str, Kind] = {
    "simulate": Kind(measure_run, _quick_run, _check_run),
    "memory": Kind(measure_memory, lambda c: {**c, "batch_size": 4, "tokens": 16}),
    "train_step": Kind(measure_train_step, lambda c: {**c, "steps": 1, "batch_size": 4, "tokens": 16}),
    "train_efficiency": Kind(measure_train_efficiency, lambda c: {**c, "steps": 1, "batch_size": 4, "tokens": 16}),
    "aggregate": Kind(measure_aggregate, lambda c: {**c, "repeats": 1, "clients": min(c["clients"], 10)}),
    "deployment": Kind(measure_deployment, _quick_deployment),
    "abstract_memory": Kind(measure_abstract_memory, lambda c: {**c, "model": "qwen2-0.5b", "devices": 1,
                                                               "tokens": 16}),
    "bench_simulate": Kind(measure_bench_simulate,
                           lambda c: {**c, "repeats": 1, "clients_per_round": min(c["clients_per_round"], 2)}),
}


def row_config(experiment: Experiment, row: Mapping[str, Any], *, quick: bool = False,
               backbone: str | None = None) -> dict[str, Any]:
    """Every setting ``row`` runs with: the experiment's, then the row's own, then ``backbone``
    (a name or checkpoint folder replacing the experiment's), then ``--quick``'s shrinking."""
    config = {**experiment.settings, **row["config"]}
    if backbone is not None:
        config["backbone"] = str(backbone)
    return KINDS[experiment.kind].quick(config) if quick else config


def label_line(row: Mapping[str, Any]) -> str:
    """A row's label texts on one line, for progress."""
    return " | ".join(str(v) for v in row["label"].values())


def say(line: str) -> None:
    """Prints a progress line at once (a long run's log is read while it goes)."""
    print(line, flush=True)


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def mean_over_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row's numbers from its seeds' numbers: the mean of every number all seeds have
    (nested dicts by key), the first seed's value of anything else; ``by_seed`` keeps them all.

    >>> mean_over_seeds([{"acc": 0.5, "n": 2, "name": "a"}, {"acc": 0.7, "n": 2, "name": "b"}])["acc"]
    0.6
    """
    def combine(values: Sequence[Any]) -> Any:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return sum(values) / len(values)
        if all(isinstance(v, Mapping) for v in values):
            keys = [k for k in values[0] if all(k in v for v in values)]
            return {k: combine([v[k] for v in values]) for k in keys}
        return values[0]

    numbers = combine(per_seed)
    numbers.pop("curve", None)  # a curve of means is no run's curve
    numbers["by_seed"] = [{k: v for k, v in seed.items() if k != "curve"} for seed in per_seed]
    return numbers


SEED_NEUTRAL = ("seed", "seeds", "eval_every")
"""Settings two runs of one row may differ in and still be seeds of the same row: the seed, and
how often the test set is scored (evaluation reads the prompt, it changes nothing of training)."""


def same_row_settings(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two rows' settings differ at most in :data:`SEED_NEUTRAL` keys."""
    def strip(config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in SEED_NEUTRAL}
    return strip(a) == strip(b)


def seed_runs(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A measured row's runs, one per seed: its ``by_seed``, or the row itself as the run of its
    ``config["seed"]`` (a row measured before it had seeds)."""
    if "by_seed" in row:
        return [dict(run) for run in row["by_seed"]]
    numbers = {k: v for k, v in row.items() if k not in ("label", "config", "emphasis")}
    return [{"seed": row["config"].get("seed"), **numbers}]


def merge_seeds(fresh: Mapping[str, Any], kept: Mapping[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """One seeded row from two measurements of it: the runs of both (the fresh one's where a
    seed is in both) of the row's ``seeds``, their mean, and ``config["seeds"]`` the seeds held."""
    runs = {run["seed"]: run for run in seed_runs(kept) if run.get("seed") in seeds}
    runs.update({run["seed"]: run for run in seed_runs(fresh)})
    ordered = [runs[seed] for seed in sorted(runs)]
    numbers = mean_over_seeds(ordered)
    numbers["by_seed"] = ordered
    config = {**fresh["config"], "seeds": sorted(runs)}
    keep = {k: fresh[k] for k in ("label", "emphasis", "measured", "load_average", "load_average_end") if k in fresh}
    return {**numbers, **keep, "config": config,
            "row_seconds": sum(run.get("row_seconds", run.get("wall_seconds", 0.0)) for run in ordered)}


def measure_row(experiment: Experiment, config: Mapping[str, Any], context: Context,
                log: Callable[[str], None], where: str, only_seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """One row's numbers: one measurement, or the mean over its ``seeds`` (``only_seeds``: over
    those of them; the row's ``config["seeds"]`` then names them)."""
    measure = KINDS[experiment.kind].measure
    seeds = config.get("seeds")
    if seeds is None:
        return measure(config, context)
    if only_seeds is not None:
        seeds = [seed for seed in seeds if seed in only_seeds]
    per_seed = []
    for seed in seeds:
        start = time.perf_counter()
        numbers = measure({**{k: v for k, v in config.items() if k != "seeds"}, "seed": seed}, context)
        per_seed.append({"seed": seed, **numbers, "row_seconds": time.perf_counter() - start})
        log(f"{where}: seed {seed} done in {time.perf_counter() - start:.1f} s")
    return mean_over_seeds(per_seed)


def run_experiment(experiment: Experiment, *, quick: bool = False, backbone: str | None = None,
                   log: Callable[[str], None] = say, only: Sequence[int] | None = None,
                   on_row: Callable[[dict[str, Any]], None] | None = None,
                   seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Measure the rows of ``experiment`` with the installed fedprompt: all of them, or the
    1-based row numbers ``only``; of a row with ``seeds``, those of ``seeds`` only (the rest
    come from the kept JSON when the rows are merged into it, :func:`merge_rows`).

    Returns the JSON document (see the module docstring) of the measured rows; ``log`` gets one
    line as each row starts and one as it ends, with its seconds; ``on_row`` gets the document
    of the rows measured so far after each row (``--rows`` merges it into the kept JSON then, so
    a long run that stops keeps its finished rows).
    """
    import fedprompt
    from fedprompt import bench

    numbers_of = list(range(1, len(experiment.rows) + 1)) if only is None else list(only)
    bad = [i for i in numbers_of if not 1 <= i <= len(experiment.rows)]
    if bad:
        raise ResultsError(f"{experiment.name} has rows 1-{len(experiment.rows)}, not {bad}")
    machine = bench.machine()
    configs = [row_config(experiment, row, quick=quick, backbone=backbone) for row in experiment.rows]
    for i in numbers_of:
        KINDS[experiment.kind].check(configs[i - 1])
    if seeds is not None:
        for i in numbers_of:
            row_seeds = configs[i - 1].get("seeds")
            if row_seeds is None or not set(seeds) <= set(row_seeds):
                raise ResultsError(f"row {i} of {experiment.name} is measured over seeds {row_seeds}; "
                                   f"--seeds must pick among them, got {list(seeds)}")
    context = Context([configs[i - 1] for i in numbers_of])
    command = f"python {SCRIPT} run {experiment.name}" + (" --quick" if quick else "")
    if backbone is not None:
        command += f" --backbone {backbone}"

    def document_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "experiment": experiment.name,
            "fedprompt": fedprompt.__version__,
            "machine": {**machine, "load_average_end": _load_average()},
            "command": command,
            "measured": _today(),
            "quick": quick,
            "rows": list(rows),
        }

    rows: list[dict[str, Any]] = []
    for i in numbers_of:
        row, config = experiment.rows[i - 1], configs[i - 1]
        where = f"[{experiment.name} {i}/{len(configs)}] {label_line(row)}"
        log(f"{where}: started")
        load = _load_average()
        start = time.perf_counter()
        numbers = measure_row(experiment, config, context, log, where, only_seeds=seeds)
        seconds = time.perf_counter() - start
        log(f"{where}: done in {seconds:.1f} s")
        if seeds is not None:
            config = {**config, "seeds": [seed for seed in config["seeds"] if seed in seeds]}
        rows.append({"label": dict(row["label"]), "config": _plain(config),
                     **({"emphasis": list(row["emphasis"])} if row.get("emphasis") else {}),
                     **numbers, "row_seconds": seconds,
                     "measured": _today(), "load_average": load, "load_average_end": _load_average()})
        if on_row is not None:
            on_row(document_of(rows))
    return document_of(rows)


def merge_rows(experiment: Experiment, previous: Mapping[str, Any] | None, document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (some rows of ``experiment``, just measured) merged into ``previous`` (the
    JSON already kept): the table's rows in the experiment's order, each the new measurement
    where there is one, else the kept one of the same label and settings (rows of other
    settings are dropped: they measured something else). A row with ``seeds`` gathers its seeds:
    the kept runs of the seeds not measured now join the new ones (:func:`merge_seeds`), so
    several processes can each measure some seeds of one row (``--seeds``). The document's
    machine is the new one's; ``merged`` says its rows come from several runs."""
    if previous is None or previous.get("quick") != document.get("quick") or previous.get("transcribed"):
        return dict(document)
    fresh = {json.dumps(r["label"], sort_keys=True): r for r in document["rows"]}
    kept = {json.dumps(r["label"], sort_keys=True): r for r in previous["rows"]}
    rows, merged = [], False
    for row in experiment.rows:
        key = json.dumps(dict(row["label"]), sort_keys=True)
        config = fresh_config(experiment, row, document)
        old = kept.get(key) if key in kept and kept[key].get("measured") else None
        seeds = config.get("seeds")
        if seeds is not None and old is not None and not same_row_settings(old["config"], config):
            old = None
        if key in fresh:
            if seeds is not None and old is not None:
                combined = merge_seeds(fresh[key], old, seeds)
                merged = merged or combined["config"]["seeds"] != fresh[key]["config"]["seeds"]
                rows.append(combined)
            else:
                rows.append(fresh[key])
        elif old is not None and (seeds is not None or old["config"] == config):
            rows.append(old)
            merged = True
    return {**document, "rows": rows, "merged": merged}


def fresh_config(experiment: Experiment, row: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``row`` would run with in a run like ``document``'s (quick or not)."""
    return _plain(row_config(experiment, row, quick=bool(document.get("quick"))))


def write_figure(experiment: Experiment, document: Mapping[str, Any], folder: str | os.PathLike[str] = RESULTS) -> Path:
    """Draws ``experiment.figure`` from the rows' curves, as ``fedprompt compare --out`` does."""
    from fedprompt.federation.report import plot_comparison

    runs = {row["label"].get("method") or label_line(row): row["curve"] for row in document["rows"] if row.get("curve")}
    return plot_comparison(runs, Path(folder) / experiment.figure)


def write_result(document: Mapping[str, Any], folder: str | os.PathLike[str] = RESULTS, *,
                 merge: bool = False) -> Path:
    """Writes ``document`` as ``folder/NAME.json`` (atomically) and returns the path. ``merge``:
    its rows join the rows already there (:func:`merge_rows`), under a lock on the folder's
    ``NAME.json.lock``, so processes measuring other rows of the table at once lose nothing."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{document['experiment']}.json"
    with open(path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if merge:
            previous = json.loads(path.read_text()) if path.exists() else None
            document = merge_rows(EXPERIMENTS[document["experiment"]], previous, document)
        partial = path.with_suffix(f".json.partial{os.getpid()}")
        partial.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        partial.replace(path)
    return path


# ----------------------------------------------------------------------------- rendering


MARKERS = re.compile(r"<!-- results:(?P<name>[a-z0-9_]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)


def _markdown_row(cells: Sequence[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def table_lines(experiment: Experiment, rows: Sequence[Row]) -> list[list[str]]:
    """The table as cells: the header, then one list per table row."""
    if experiment.pivot is not None:
        p = experiment.pivot
        row_keys = list(dict.fromkeys(r["label"][p.rows_by] for r in rows))
        column_keys = list(dict.fromkeys(r["label"][p.columns_by] for r in rows))
        cells = {(r["label"][p.rows_by], r["label"][p.columns_by]): p.cell(r, rows) for r in rows}
        return [[p.corner, *column_keys]] + [[k, *(cells.get((k, c), "") for c in column_keys)] for k in row_keys]
    if experiment.shown is not None:
        rows = experiment.shown(rows)
    body = []
    for row in rows:
        bold = set(row.get("emphasis", ()))
        cells = [column.cell(row, rows) for column in experiment.columns]
        body.append([f"**{c}**" if column.key in bold and c else c for column, c in zip(experiment.columns, cells)])
    return [[column.header for column in experiment.columns]] + body


def caption(document: Mapping[str, Any]) -> str:
    """The line under a table: the fedprompt version, CPU, cores and load it was measured with."""
    m = document["machine"]
    device = "" if m.get("platform", "cpu") == "cpu" else f", {m['platform']}:{m['device_kind']}"
    where = f"fedprompt {document['fedprompt']}, {m['cpu']} ({m['cpu_count']} cores{device}), JAX {m['jax']}"
    rerun = f"`python {SCRIPT} run {document['experiment']}`"
    if document.get("transcribed"):
        return f"_{where}, load average not recorded (transcribed from an earlier measurement; rerun with {rerun})._"
    quick = " (a `--quick` run: shrunk settings, not the table's)" if document.get("quick") else ""
    if document.get("merged"):
        rows = document["rows"]
        loads = [x[0] for r in rows for x in (r.get("load_average"), r.get("load_average_end")) if x]
        dates = sorted({r["measured"] for r in rows})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        load = f"load average {min(loads):.1f}-{max(loads):.1f}" if loads else "load average not recorded"
        command = f"python {SCRIPT} run {document['experiment']} [--rows N,...]"
        return f"_Measured with {where}, rows in separate runs, {load}, on {when}: `{command}`{quick}._"
    start, end = m.get("load_average"), m.get("load_average_end")
    load = "load average not recorded" if not start else (
        f"load average {start[0]:.1f}" + (f" at the start, {end[0]:.1f} at the end" if end else ""))
    return f"_Measured with {where}, {load}, on {document['measured']}: `{document['command']}`{quick}._"


def render_block(experiment: Experiment, document: Mapping[str, Any]) -> str:
    """Everything between (and including) the markers of ``experiment``'s table."""
    lines = table_lines(experiment, document["rows"])
    table = "\n".join([_markdown_row(lines[0]), "|" + "---|" * len(lines[0]), *map(_markdown_row, lines[1:])])
    name = experiment.name
    return f"<!-- results:{name} -->\n\n{table}\n\n{caption(document)}\n\n<!-- /results:{name} -->"


def load_result(name: str, folder: str | os.PathLike[str] = RESULTS) -> dict[str, Any]:
    """``folder/NAME.json``; ResultsError when it is missing or not a results document."""
    path = Path(folder) / f"{name}.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path} is missing: run `python {SCRIPT} run {name}`") from None
    except (OSError, ValueError) as err:
        raise ResultsError(f"cannot read {path}: {err}") from None
    missing = [k for k in ("fedprompt", "machine", "command", "rows") if k not in document]
    if missing:
        raise ResultsError(f"{path} lacks {', '.join(missing)}")
    document.setdefault("experiment", name)
    return document


def render_readme(text: str, folder: str | os.PathLike[str] = RESULTS) -> tuple[str, list[str]]:
    """``text`` (README.md) with every marked table rendered from ``folder``'s JSON.

    Returns the new text and the names of the tables that changed. Raises ResultsError for a
    marker naming no experiment, a missing JSON file, or a JSON file of an experiment whose
    markers are not in ``text``.
    """
    changed: list[str] = []
    found: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in EXPERIMENTS:
            raise ResultsError(f"README marker results:{name} names no experiment of {SCRIPT}")
        found.append(name)
        block = render_block(EXPERIMENTS[name], load_result(name, folder))
        if block != match[0]:
            changed.append(name)
        return block

    new = MARKERS.sub(replace, text)
    unmarked = [n for n in EXPERIMENTS if n not in found and (Path(folder) / f"{n}.json").exists()]
    if unmarked:
        raise ResultsError(f"README.md has no <!-- results:NAME --> markers for {', '.join(unmarked)}")
    return new, changed


# ----------------------------------------------------------------------------- command line


def _row_numbers(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,5, got {text!r}") from None
    if not numbers:
        raise argparse.ArgumentTypeError("expected at least one number")
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    """``run`` and ``render``; returns the exit status (1: ``--check`` found differences, 2: bad input)."""
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure experiments, write NAME.json")
    run.add_argument("names", nargs="+", metavar="NAME", choices=sorted(EXPERIMENTS),
                     help=", ".join(EXPERIMENTS))
    run.add_argument("--quick", action="store_true",
                     help="shrink every run (1 round, 512 training and 64 test examples, at most 8 clients, bench repeats 1); needs --out")
    run.add_argument("--out", metavar="DIR", help=f"write the JSON here (default: {SCRIPT.rsplit('/', 1)[0]})")
    run.add_argument("--backbone", help="run every row on this backbone (name or checkpoint folder)")
    run.add_argument("--rows", metavar="N,...", type=_row_numbers,
                     help="measure only these rows (1-based) and merge them into the JSON already there")
    run.add_argument("--seeds", metavar="S,...", type=_row_numbers,
                     help="with --rows: of a row measured over seeds, only these; the kept JSON has the others")
    render = sub.add_parser("render", help="rewrite README.md's marked tables from the JSON")
    render.add_argument("--check", action="store_true", help="write nothing; exit 1 if README.md differs")
    render.add_argument("--results", metavar="DIR", default=str(RESULTS), help="where the JSON files are")
    render.add_argument("--readme", metavar="FILE", default=str(README))
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            if args.quick and not args.out:
                raise ResultsError("--quick writes only into a folder given with --out (never over the kept results)")
            if args.rows and len(args.names) != 1:
                raise ResultsError("--rows picks rows of one experiment: name exactly one")
            folder = args.out or RESULTS
            if args.seeds and not args.rows:
                raise ResultsError("--seeds measures some seeds of the rows given with --rows; name them")
            for name in args.names:
                keep = None if args.rows is None else (lambda document: write_result(document, folder, merge=True))
                document = run_experiment(EXPERIMENTS[name], quick=args.quick, backbone=args.backbone, only=args.rows,
                                          on_row=keep, seeds=args.seeds)
                path = write_result(document, folder, merge=args.rows is not None)
                print(f"wrote {path}", flush=True)
                if EXPERIMENTS[name].figure:
                    print(f"wrote {write_figure(EXPERIMENTS[name], document, args.out or RESULTS)}", flush=True)
            return 0
        readme = Path(args.readme)
        new, changed = render_readme(readme.read_text(), args.results)
        if args.check:
            if changed:
                print(f"{readme} differs from the JSON in: {', '.join(changed)} (run `python {SCRIPT} render`)")
                return 1
            return 0
        if changed:
            readme.write_text(new)
        print(f"rendered {', '.join(changed) or 'nothing (already up to date)'}")
        return 0
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import signal

    # SIGTERM ends the script through its finally blocks (a deployment row stops its processes).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
