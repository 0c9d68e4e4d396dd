"""What both runtimes write: one round record, one summary, one way to save the prompt.

The simulation's ``metrics.jsonl`` and the Flower ServerApp's have the same fields, built by
:class:`RoundRecord`; a deployment adds its transport's own (``wire_bytes_up``, ``timeouts``
...) under :attr:`RoundRecord.extra`. :func:`build_summary` makes the common part of
``summary.json`` and :func:`save_run_prompt` the ``prompt.fpp`` of a finished run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from fedprompt.config import RunConfig
from fedprompt.wire import artifact

Pytree = Any


def client_message(result: Any, scaffold: bool) -> dict[str, Pytree]:
    """The tree a client sends: its payload as ``delta`` and, for SCAFFOLD, ``control_delta``."""
    message = {"delta": result.delta}
    if scaffold:
        message["control_delta"] = result.control_delta
    return message


def evaluate_now(round_index: int, eval_every: int, last: int) -> bool:
    """Whether round ``round_index`` (0-based) is evaluated: every ``eval_every`` and the last."""
    return (round_index + 1) % eval_every == 0 or round_index + 1 == last


@dataclasses.dataclass
class RoundRecord:
    """What one round did, in plain Python values (a line of ``metrics.jsonl``).

    Attributes:
      round: the round, counted from 1.
      train_loss: the example-weighted mean loss of the aggregated clients (NaN without any).
      clients: updates aggregated.
      sampled, dropped: clients sampled, and those that sent nothing.
      rejections: reason -> count of refused messages.
      bytes_up, bytes_down: the encoded bytes of every message that crossed.
      participants: the client ids whose update was aggregated.
      extra: what the protections and the runtime add (``epsilon``, ``dp_clip``, ``timeouts``...).
    """

    round: int
    train_loss: float
    clients: int
    sampled: int
    dropped: int
    rejections: dict[str, int]
    bytes_up: int
    bytes_down: int
    participants: list[int]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejections.values())

    def to_dict(self, evaluation: Mapping[str, float] | None, *, seconds: float) -> dict[str, Any]:
        """The metrics line: every field, ``extra`` flattened, the evaluation (None when the
        round was not evaluated) and the round's wall time."""
        record = dataclasses.asdict(self)
        extra = record.pop("extra")
        record = {**record, "rejected": self.rejected, **extra}
        record.update(evaluation or {"eval_loss": None, "eval_accuracy": None})
        record["seconds"] = seconds
        return record


def sum_metric(metrics: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The sum of one integer metric over rounds; None when any round lacks it."""
    values = [m.get(key) for m in metrics]
    return None if any(v is None for v in values) else int(sum(values))


def build_summary(
    metrics: Sequence[Mapping[str, Any]],
    *,
    runtime: str,
    config: RunConfig,
    plan: Any,
    state: Any,
    label_names: Sequence[str],
    client_sizes: Sequence[int],
) -> dict[str, Any]:
    """The part of ``summary.json`` both runtimes write.

    Args:
      metrics: every round's metrics dict.
      runtime: ``"simulation"`` or ``"flower"``.
      config: the run's settings.
      plan: the run's :class:`~fedprompt.federation.plan.FederationPlan`.
      state: the final :class:`~fedprompt.server.rounds.RoundState` (its privacy spent).
      label_names: the task's class names.
      client_sizes: every client's number of training examples.
    """
    final = metrics[-1]
    backbone = plan.backbone
    summary: dict[str, Any] = {
        "runtime": runtime,
        "final_accuracy": final["eval_accuracy"],
        "final_eval_loss": final["eval_loss"],
        "rounds": config.rounds,
        "total_bytes_up": sum_metric(metrics, "bytes_up"),
        "total_bytes_down": sum_metric(metrics, "bytes_down"),
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint,
                     "weight_bytes": backbone.weight_bytes()},
        "client_sizes": [int(s) for s in client_sizes],
        "label_names": list(label_names),
        "config": config.to_dict(),
    }
    if config.method == "zo":
        summary["zo_downlink"] = config.resolved_zo_downlink
    ledger = plan.privacy.ledger
    if ledger is not None:
        summary["privacy"] = {**ledger.summary(state.privacy), "clip": config.dp_clip, "adaptive": config.dp_adaptive}
    return summary


INSTRUCTION_FORMAT = "instruction"
"""``training.prompt_format`` of a prompt trained on instruction data: ``fedprompt apply`` lays a
text out as training did (:func:`fedprompt.data.instructions.format_prompt`)."""


def save_run_prompt(
    path: str | Path, plan: Any, state: Any, *, config: RunConfig, label_names: Sequence[str],
    summary: Mapping[str, Any],
) -> Path:
    """Saves a finished run's prompt and head as ``.fpp`` with its training facts (a generative
    run's task is ``causal_lm``, without labels)."""
    trainable = jax.device_get(plan.trainable(state.server.params))
    privacy = summary.get("privacy") or {}
    epsilon = privacy.get("epsilon")
    return artifact.save_prompt(
        path, trainable, config=plan.prompt_config, backbone=plan.backbone, task=plan.task,
        label_names=list(label_names) if config.task == "classify" else None,
        training={"rounds": config.rounds, "clients": config.clients, "algorithm": config.algorithm,
                  "privacy_epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
                  "final_accuracy": summary["final_accuracy"], "runtime": summary["runtime"],
                  **({"prompt_format": INSTRUCTION_FORMAT} if config.task == "generate" else {})},
    )
