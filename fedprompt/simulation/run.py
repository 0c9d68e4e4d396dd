"""``fedprompt.simulate`` and the ``fedprompt run`` main job, driven by a :class:`RunConfig`.

``simulate(config)`` loads (or takes) the backbone and data, partitions the training data over
clients, and runs the federation; ``run(config)`` does the same and writes the run folder:
``metrics.jsonl`` (one line per round, written as the run goes), ``summary.json``,
``prompt.fpp`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.loading import load_backbone
from fedprompt.client.federated import make_client_update
from fedprompt.client.local import make_loss_fn, make_train_step
from fedprompt.config import RunConfig
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import SequenceClassification
from fedprompt.server import algorithms
from fedprompt.server.algorithms import ServerState
from fedprompt.simulation import checkpoint, datasets, federation, partition, report
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, encode_dataset, run_rounds
from fedprompt.wire import artifact


@dataclasses.dataclass
class SimulationResult:
    """The outcome of :func:`simulate`.

    Attributes:
      state: the final server state (``state.params`` is the trained prompt + head).
      metrics: one dict per round.
      summary: final figures and the resolved configuration.
      prompt_config: how the prompt is shaped.
      backbone: the frozen backbone it was trained on.
      label_names: class names of the task.
      label_histograms: ``[clients, labels]`` training label counts per client.
      trainable: the trained ``{"prompt", "head"}`` (for gradient-free methods, the prompt their
        low-dimensional parameters stand for).
    """

    state: ServerState
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    prompt_config: PromptConfig
    backbone: Backbone
    label_names: tuple[str, ...]
    label_histograms: np.ndarray
    trainable: Any = None


def load_data(config: RunConfig) -> tuple[datasets.TextDataset, datasets.TextDataset]:
    """Train and test sets for a config: the built-in WordNet set, or the user's files."""
    if config.data is None:
        return datasets.load_wordnet_supersenses()
    full = datasets.load_text_file(config.data, text_key=config.text_key, label_key=config.label_key)
    if config.test_data is None:
        return datasets.train_test_split(full, test_fraction=0.2, seed=config.seed)
    test = datasets.load_text_file(
        config.test_data, text_key=config.text_key, label_key=config.label_key, label_names=full.label_names
    )
    return full, test


def make_algorithm(config: RunConfig) -> algorithms.Algorithm:
    """The algorithm named by the config with its hyperparameters."""
    kwargs: dict[str, Any] = {}
    if config.server_lr is not None:
        kwargs["server_lr"] = config.server_lr
    if config.algorithm == "fedavgm":
        kwargs["momentum"] = config.server_momentum
    if config.algorithm == "fedprox":
        kwargs["mu"] = config.prox_mu
    if config.algorithm in ("fedadagrad", "fedadam", "fedyogi"):
        kwargs["tau"] = config.tau
        kwargs["b1"] = config.b1 if config.algorithm != "fedadagrad" else 0.0
        if config.algorithm != "fedadagrad":
            kwargs["b2"] = config.b2
    return algorithms.from_name(config.algorithm, **kwargs)


def make_local_optimizer(config: RunConfig) -> optax.GradientTransformation:
    if config.resolved_local_optimizer == "sgd":
        return optax.sgd(config.resolved_local_lr)
    return optax.adam(config.resolved_local_lr)


def simulate(
    config: RunConfig,
    *,
    backbone: Backbone | None = None,
    train: datasets.TextDataset | None = None,
    test: datasets.TextDataset | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    previous_metrics: list[dict[str, Any]] | None = None,
) -> SimulationResult:
    """Run a federated prompt-tuning simulation.

    Args:
      config: the run's settings (see :class:`~fedprompt.config.RunConfig`).
      backbone: an already loaded backbone (default: load ``config.backbone``).
      train, test: in-memory data sets (default: per ``config.data``).
      callback: called with each round's metrics dict as soon as the round ends.
      checkpoint_dir: write a crash-safe checkpoint there after every round.
      resume: continue from the checkpoint in ``checkpoint_dir``.
      previous_metrics: the metrics of the rounds before the checkpoint (when resuming).

    Example:
      >>> result = fedprompt.simulate(RunConfig(rounds=2, clients=4, clients_per_round=2))  # doctest: +SKIP
      >>> result.summary["final_accuracy"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    backbone = backbone or load_backbone(config.backbone)
    if train is None or test is None:
        train, test = load_data(config)
    train, test = federation.select_examples(config, train, test)
    prompt_config = federation.make_prompt_config(config)
    task = federation.make_task(train.num_labels)
    parts = federation.partition_clients(config, train.labels)
    encoded_train = encode_dataset(backbone, train, config.max_length, config.num_virtual_tokens)
    encoded_test = encode_dataset(backbone, test, config.max_length, config.num_virtual_tokens)
    client_data = build_client_data(encoded_train, parts, train.num_labels)
    simulation = federation.make_simulation(config, backbone, prompt_config, task, client_data)
    state, client_controls = simulation.init()
    ledger = simulation.ledger
    local_dp = ledger is not None and ledger.mode == "local"

    def participations() -> np.ndarray:
        return np.asarray(ledger.participations) if local_dp else np.zeros(0, np.int64)

    completed = 0
    if resume:
        completed, (state, client_controls, simulation.dp_state, counts) = checkpoint.load_checkpoint(
            checkpoint_dir, template=(state, client_controls, simulation.dp_state, participations()),
            config=config.to_dict(),
        )
        if ledger is not None:
            ledger.restore(completed, counts if local_dp else None)
    on_state = None
    if checkpoint_dir is not None:
        def on_state(done: int, new_state: ServerState, controls: Any) -> None:
            checkpoint.save_checkpoint(
                checkpoint_dir, completed_rounds=done, config=config.to_dict(),
                state=(new_state, controls, simulation.dp_state, participations()),
            )

    state, _, metrics = run_rounds(
        simulation, config.rounds - completed, encoded_test, eval_every=config.eval_every, state=state,
        client_controls=client_controls, start_round=completed, callback=callback, on_state=on_state,
    )
    metrics = list(previous_metrics or [])[:completed] + metrics
    final = metrics[-1]
    summary: dict[str, Any] = {
        "final_accuracy": final["eval_accuracy"],
        "final_eval_loss": final["eval_loss"],
        "rounds": config.rounds,
        "total_bytes_up": int(sum(m["bytes_up"] for m in metrics)),
        "total_bytes_down": int(sum(m["bytes_down"] for m in metrics)),
        "wall_seconds": None,
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint},
        "train_examples": len(train),
        "test_examples": len(test),
        "client_sizes": [int(s) for s in client_data.sizes],
        "label_names": list(train.label_names),
        "client_label_histograms": client_data.label_histograms.tolist(),
        "config": config.to_dict(),
    }
    if simulation.ledger is not None:
        summary["privacy"] = {**simulation.ledger.summary(), "clip": config.dp_clip, "adaptive": config.dp_adaptive}
    if config.baselines:
        summary["baselines"] = compute_baselines(config, simulation, encoded_train, encoded_test)
    to_trainable = simulation.program.to_trainable
    trainable = to_trainable(state.params) if to_trainable is not None else state.params
    if config.tpt:
        summary["tpt"] = evaluate_tpt(config, backbone, prompt_config, task, trainable, encoded_test)
    summary["wall_seconds"] = time.perf_counter() - started
    return SimulationResult(
        trainable=trainable,
        state=state, metrics=metrics, summary=summary, prompt_config=prompt_config, backbone=backbone,
        label_names=train.label_names, label_histograms=client_data.label_histograms,
    )


def compute_baselines(
    config: RunConfig,
    simulation: FederatedSimulation,
    encoded_train: Mapping[str, np.ndarray],
    encoded_test: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Centralized and local-only references with the same training budget as the federation.

    * centralized: one model on the pooled training data, seeing as many examples as all
      federated clients together (``rounds * clients_per_round * local_steps * batch_size``),
      in batches of ``clients_per_round * batch_size``;
    * local-only: every client trains its own prompt on its own data for as many local steps
      as an average client runs in the federation, each evaluated on the shared test set; the
      accuracies are averaged over clients.
    """
    backbone, prompt_config, task = simulation.backbone, simulation.prompt_config, simulation.task
    optimizer = make_local_optimizer(config)
    init_state, _ = simulation.init()
    init_params = init_state.params

    # Centralized.
    steps = config.rounds * config.local_steps
    batch = config.batch_size * config.clients_per_round
    step_fn = make_train_step(backbone, prompt_config, task, optimizer)
    params = jax.tree.map(np.array, init_params)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng([config.seed, 7])
    n = len(encoded_train["labels"])
    for _ in range(steps):
        idx = rng.choice(n, batch, replace=n < batch)
        params, opt_state, _ = step_fn(params, opt_state, {k: v[idx] for k, v in encoded_train.items()}, backbone.weights)
    centralized = simulation.evaluate(params, encoded_test)["eval_accuracy"]

    # Local only.
    local_steps = max(1, round(config.rounds * config.clients_per_round * config.local_steps / config.clients))
    loss_fn = make_loss_fn(backbone, prompt_config, task)
    update = jax.jit(make_client_update(loss_fn, optimizer, local_steps=local_steps, batch_size=config.batch_size))
    data = simulation.client_data
    accuracies = []
    for client in range(data.num_clients):
        columns = {k: v[client] for k, v in data.columns.items()}
        key = jax.random.fold_in(jax.random.key(config.seed), 10_000 + client)
        result = update(init_params, backbone.weights, columns, int(data.sizes[client]), key)
        trained = jax.tree.map(lambda p, d: p + d, init_params, result.delta)
        accuracies.append(simulation.evaluate(trained, encoded_test)["eval_accuracy"])
    return {
        "centralized_accuracy": centralized,
        "local_only_accuracy": float(np.mean(accuracies)),
        "local_only_accuracies": [float(a) for a in accuracies],
        "centralized_steps": steps,
        "centralized_batch_size": batch,
        "local_only_steps": local_steps,
    }


def evaluate_tpt(
    config: RunConfig,
    backbone: Backbone,
    prompt_config: PromptConfig,
    task: SequenceClassification,
    trainable: Any,
    encoded_test: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Test-time prompt tuning of the trained prompt on a label-shifted split of the test set.

    The test rows are split over ``tpt_test_clients`` test clients with a Dirichlet(``tpt_alpha``)
    label skew (seeded by ``seed``); each client's unlabeled batches adapt a fresh copy of the
    prompt (:func:`fedprompt.inference.tpt_evaluate`). Returns accuracy, loss and entropy
    before and after adaptation, plus the settings.
    """
    from fedprompt.inference.tpt import tpt_evaluate

    labels = np.asarray(encoded_test["labels"])
    clients = partition.dirichlet_partition(labels, min(config.tpt_test_clients, len(labels)), config.tpt_alpha,
                                            seed=config.seed + 2, min_size=0)
    result = tpt_evaluate(
        backbone, prompt_config, task, trainable, encoded_test, key=jax.random.key(config.seed + 3),
        batch_size=config.batch_size, steps=config.tpt_steps, lr=config.tpt_lr, num_views=config.tpt_views,
        clients=clients,
    )
    return {**result, "test_clients": len(clients), "alpha": config.tpt_alpha, "steps": config.tpt_steps,
            "lr": config.tpt_lr, "views": config.tpt_views}


def run(config: RunConfig, *, stream=None, progress: bool | None = None) -> SimulationResult:
    """The main job: :func:`simulate` plus the run folder ``config.out``.

    ``metrics.jsonl`` grows by one line per round while the run goes and a checkpoint is
    written after every round, so a killed run keeps its history and continues with
    :func:`resume`. ``progress`` (default: only on a terminal) shows a progress bar.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / checkpoint.CHECKPOINT_FILE).unlink(missing_ok=True)
    checkpoint.write_config(out, config.to_dict())
    return _run_in(out, config, stream=stream, progress=progress, resume=False)


def resume(folder: str | Path, *, stream=None, progress: bool | None = None) -> SimulationResult:
    """Continue a run that was interrupted, from its last completed round.

    The settings are the ones the run was started with (``config.json`` in the folder); the
    result is the same as that of an uninterrupted run.
    """
    out = Path(folder)
    config = RunConfig(**checkpoint.read_config(out))
    if config.out != str(out) and Path(config.out).resolve() != out.resolve():
        config = dataclasses.replace(config, out=str(out))
    return _run_in(out, config, stream=stream, progress=progress, resume=True)


def _run_in(out: Path, config: RunConfig, *, stream, progress: bool | None, resume: bool) -> SimulationResult:
    metrics_path = out / "metrics.jsonl"
    previous: list[dict[str, Any]] = []
    if resume:
        if not (out / checkpoint.CHECKPOINT_FILE).is_file():
            previous = []  # killed before the first round ended: start again
            resume = False
        else:
            previous = report.read_metrics(metrics_path) if metrics_path.is_file() else []
    start = 0
    if resume:
        start = checkpoint.completed_rounds(out)
        previous = previous[:start]
    # Rewrite metrics.jsonl with exactly the completed rounds, then append as rounds finish.
    metrics_path.unlink(missing_ok=True)
    writer = report.MetricsWriter(metrics_path)
    for record in previous:
        writer.write(record)
    bar = report.Progress(config.rounds, stream=stream, enabled=progress)
    cumulative = sum(m["bytes_up"] + m["bytes_down"] for m in previous)

    def on_round(metrics: dict[str, Any]) -> None:
        nonlocal cumulative
        cumulative += metrics["bytes_up"] + metrics["bytes_down"]
        writer.write(metrics)
        bar.update(metrics["round"], accuracy=metrics["eval_accuracy"], cumulative_bytes=cumulative)

    try:
        result = simulate(config, callback=on_round, checkpoint_dir=out, resume=resume, previous_metrics=previous)
    finally:
        bar.close()
        writer.close()
    privacy = result.summary.get("privacy") or {}
    artifact.save_prompt(
        out / "prompt.fpp", jax.device_get(result.trainable), config=result.prompt_config,
        backbone=result.backbone, task=federation.make_task(len(result.label_names)),
        label_names=list(result.label_names),
        training={"rounds": config.rounds, "clients": config.clients, "algorithm": config.algorithm,
                  "privacy_epsilon": privacy.get("epsilon"), "final_accuracy": result.summary["final_accuracy"]},
    )
    report.write_summary(out / "summary.json", result.summary)
    description = (f"{config.algorithm} · {config.method} · {config.clients} clients "
                   f"({config.clients_per_round}/round) · {config.partition}")
    report.plot_curves(result.metrics, out / "curves.png", baselines=result.summary.get("baselines"), title=description)
    return result
