"""``fedprompt.simulate`` and the ``fedprompt run`` main job, driven by a :class:`RunConfig`.

``simulate(config)`` loads (or takes) the backbone and data, partitions the training data over
clients, and runs the federation; ``run(config)`` does the same and writes the run folder:
``metrics.jsonl`` (one line per round, written as the run goes), ``summary.json``,
``prompt.fpp`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedprompt.backbones.backbone import Backbone
from fedprompt.backbones.loading import load_backbone
from fedprompt.client.federated import make_client_update
from fedprompt.client.local import make_loss_fn, make_train_step
from fedprompt.config import RunConfig
from fedprompt.federation.evaluation import (check_generation_scoring, evaluate_generation, evaluate_tpt,
                                             generation_summary)
from fedprompt.federation.plan import FederationPlan, check_task, make_baseline_optimizer, make_plan
from fedprompt.federation.records import build_summary, save_run_prompt
from fedprompt.federation.run_folder import check_run_folder, open_run_folder
from fedprompt.prompts import PromptConfig
from fedprompt.server.algorithms import ServerState
from fedprompt.server.rounds import RoundState
from fedprompt.data import datasets
from fedprompt.data.loading import encode_dataset, load_data, partition_clients, select_examples
from fedprompt.simulation import checkpoint
from fedprompt.federation import report
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds


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
      plan: the run's federation plan.
      round_state: the final server state with its protections' (privacy spent ...).
    """

    state: ServerState
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    prompt_config: PromptConfig
    backbone: Backbone
    label_names: tuple[str, ...]
    label_histograms: np.ndarray
    trainable: Any = None
    plan: FederationPlan | None = None
    round_state: RoundState | None = None


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
    on_saved: Callable[[int], None] | None = None,
    note: Callable[[str], None] | None = None,
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
      on_saved: called with the number of completed rounds after each round's checkpoint is
        written (it may raise to stop the run there, e.g. ``KeyboardInterrupt``).
      note: called with a line of progress for the work after the rounds (baselines, scoring
        generations), which can take minutes.

    Example:
      >>> result = fedprompt.simulate(RunConfig(rounds=2, clients=4, clients_per_round=2))  # doctest: +SKIP
      >>> result.summary["final_accuracy"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    note = note or (lambda text: None)
    backbone = backbone or load_backbone(config.backbone)
    if train is None or test is None:
        train, test = load_data(config)
    train, test = select_examples(config, train, test)
    plan = make_plan(config, backbone, train.num_labels, label_names=train.label_names)
    parts = partition_clients(config, train.labels)
    encoded_train = encode_dataset(backbone, train, config.max_length, config.num_virtual_tokens)
    encoded_test = encode_dataset(backbone, test, config.max_length, config.num_virtual_tokens)
    client_data = build_client_data(encoded_train, parts, train.num_labels)
    simulation = FederatedSimulation.from_config(config, plan, client_data)
    state, client_states = simulation.init(head=not resume)
    initial_params = state.server.params
    setup = None
    if plan.head_statistics is not None:
        setup = {"head_init": config.head_init, "clients": client_data.num_clients, **simulation.setup_bytes()}
        if not resume:
            setup["initial_accuracy"] = simulation.evaluate(initial_params, encoded_test)["eval_accuracy"]
    completed = 0
    if resume:
        completed, (state, client_states) = checkpoint.load_checkpoint(
            checkpoint_dir, template=(state, client_states), config=config.to_dict(),
        )
    on_state = None
    if checkpoint_dir is not None:
        def on_state(done: int, new_state: RoundState, states: Any) -> None:
            checkpoint.save_checkpoint(checkpoint_dir, completed_rounds=done, config=config.to_dict(),
                                       state=(new_state, states))
            if on_saved is not None:
                on_saved(done)

    state, _, metrics = run_rounds(
        simulation, config.rounds - completed, encoded_test, eval_every=config.resolved_eval_every, state=state,
        client_states=client_states, start_round=completed, callback=callback, on_state=on_state,
    )
    metrics = list(previous_metrics or [])[:completed] + metrics
    summary = build_summary(metrics, runtime="simulation", config=config, plan=plan, state=state,
                            label_names=train.label_names, client_sizes=client_data.sizes)
    summary.update({"train_examples": len(train), "test_examples": len(test),
                    "client_label_histograms": client_data.label_histograms.tolist()})
    if setup is not None:
        summary["setup"] = setup
    if config.baselines:
        if resume:  # the checkpoint holds the trained state only: rebuild the starting point
            initial_params = simulation.init()[0].server.params
        summary["baselines"] = compute_baselines(config, simulation, encoded_train, encoded_test,
                                                 initial_params=initial_params, test=test, note=note)
    trainable = plan.trainable(state.server.params)
    if config.task == "generate" and config.generate_examples:
        note(f"scoring the generations of the trained and the untuned prompt ({config.generate_examples} test prompts)")
    summary.update(generation_summary(config, plan, trainable, test, initial=plan.trainable(initial_params)))
    if config.tpt:
        summary["tpt"] = evaluate_tpt(config, plan, trainable, encoded_test)
    summary["wall_seconds"] = time.perf_counter() - started
    return SimulationResult(
        trainable=trainable, state=state.server, metrics=metrics, summary=summary, prompt_config=plan.prompt_config,
        backbone=backbone, label_names=train.label_names, label_histograms=client_data.label_histograms,
        plan=plan, round_state=state,
    )


def compute_baselines(
    config: RunConfig,
    simulation: FederatedSimulation,
    encoded_train: Mapping[str, np.ndarray],
    encoded_test: Mapping[str, np.ndarray],
    *,
    initial_params: Any = None,
    test: datasets.TextDataset | None = None,
    note: Callable[[str], None] = lambda text: None,
) -> dict[str, float]:
    """Centralized and local-only references with the same training budget as the federation.

    Both start from the federation's starting point ``initial_params`` (default: the plan's
    initial parameters); with a class-means head, a local-only client sets its head from its
    own class statistics only (it sees no other client's).

    * centralized: one model on the pooled training data, seeing as many examples as all
      federated clients together (``rounds * clients_per_round * local_steps * batch_size``),
      in batches of ``clients_per_round * batch_size``;
    * local-only: every client trains its own prompt on its own data for as many local steps
      as an average client runs in the federation, each evaluated on the shared test set; the
      accuracies are averaged over clients.

    Both train with Adam (:func:`~fedprompt.federation.plan.make_baseline_optimizer`), whatever
    optimizer the federation's clients use. A generative run (``task = "generate"``, with
    ``generate_examples`` and the ``test`` set) also scores both by the exact match and ROUGE-L of
    their generations (local-only: averaged over clients). ``note`` gets a line of progress
    before each of them.
    """
    plan = simulation.plan
    backbone, prompt_config, task = plan.backbone, plan.prompt_config, plan.task
    optimizer = make_baseline_optimizer(config)
    init_params = plan.init_params() if initial_params is None else initial_params

    # Centralized.
    steps = config.rounds * config.local_steps
    batch = config.batch_size * config.clients_per_round
    note(f"baseline: centralized, {steps} steps of {batch} pooled examples")
    step_fn = make_train_step(backbone, prompt_config, task, optimizer)
    params = jax.tree.map(np.array, init_params)
    opt_state = optimizer.init(params)
    rng = plan.keys.baseline_central()
    n = len(encoded_train["labels"])
    for _ in range(steps):
        idx = rng.choice(n, batch, replace=n < batch)
        params, opt_state, _ = step_fn(params, opt_state, {k: v[idx] for k, v in encoded_train.items()}, backbone.weights)
    centralized = simulation.evaluate(params, encoded_test)["eval_accuracy"]
    scored = config.task == "generate" and config.generate_examples and test is not None
    generation: dict[str, list[dict[str, Any]]] = {"centralized": [], "local_only": []}
    if scored:
        generation["centralized"].append(evaluate_generation(config, plan, plan.trainable(params), test))

    # Local only.
    local_steps = max(1, round(config.rounds * config.clients_per_round * config.local_steps / config.clients))
    loss_fn = make_loss_fn(backbone, prompt_config, task)
    update = jax.jit(make_client_update(loss_fn, optimizer, local_steps=local_steps, batch_size=config.batch_size))
    data = simulation.client_data
    own_statistics = None
    if plan.head_statistics is not None:
        random_start = plan.init_params()
        own_statistics = simulation.class_statistics(random_start)
    accuracies = []
    for client in range(data.num_clients):
        note(f"baseline: local-only, client {client + 1}/{data.num_clients} ({local_steps} steps on its own data)")
        start = init_params
        if own_statistics is not None:
            start = plan.with_class_means_head(random_start, jax.tree.map(lambda x: x[client], own_statistics))
        columns = {k: v[client] for k, v in data.columns.items()}
        key = plan.keys.baseline_local(client)
        result = update(start, backbone.weights, columns, int(data.sizes[client]), key)
        trained = jax.tree.map(lambda p, d: p + d, start, result.delta)
        accuracies.append(simulation.evaluate(trained, encoded_test)["eval_accuracy"])
        if scored:
            generation["local_only"].append(evaluate_generation(config, plan, plan.trainable(trained), test))
    scores = {f"{who}_{name}": float(np.mean([g[name] for g in runs]))
              for who, runs in generation.items() if runs for name in ("exact_match", "rouge_l")}
    return {
        **scores,
        "centralized_accuracy": centralized,
        "local_only_accuracy": float(np.mean(accuracies)),
        "local_only_accuracies": [float(a) for a in accuracies],
        "centralized_steps": steps,
        "centralized_batch_size": batch,
        "local_only_steps": local_steps,
    }


def run(config: RunConfig, *, stream=None, progress: bool | None = None, overwrite: bool = False) -> SimulationResult:
    """The main job: :func:`simulate` plus the run folder ``config.out``.

    Everything that can be checked is checked before the folder is touched: the folder itself
    (a file, not writable, in use by another run, or holding another run without
    ``overwrite``), the data files and the backbone. The folder is then locked for the run
    (:mod:`fedprompt.federation.run_folder`). ``metrics.jsonl`` grows by one line per round
    while the run goes and a checkpoint is written after every round, so a killed run keeps
    its history and continues with :func:`resume`.

    Args:
      config: the run's settings.
      stream: where progress goes (default ``sys.stderr``).
      progress: ``None``: a bar on a terminal, one line per round elsewhere; ``True``: the
        bar; ``False``: nothing.
      overwrite: replace the run ``config.out`` holds. Its files are deleted only once this
        run has finished, and put back if this run fails before its first round.

    Raises:
      RunFolderError: ``config.out`` cannot be used (the message says why and what to pass).
    """
    out = Path(config.out)
    check_run_folder(out, overwrite=overwrite)
    return _run_in(out, config, stream=stream, progress=progress, resume=False, overwrite=overwrite)


def resume(folder: str | Path, *, stream=None, progress: bool | None = None) -> SimulationResult:
    """Continue a run that was interrupted, from its last completed round.

    The settings are the ones the run was started with (``config.json`` in the folder); the
    result is the same as that of an uninterrupted run. A damaged checkpoint is refused
    before anything is loaded; ``progress`` is as for :func:`run`.
    """
    out = Path(folder)
    check_run_folder(out, resume=True)
    config = RunConfig(**checkpoint.read_config(out))
    if config.out != str(out) and Path(config.out).resolve() != out.resolve():
        config = dataclasses.replace(config, out=str(out))
    checkpoint.completed_rounds(out)
    return _run_in(out, config, stream=stream, progress=progress, resume=True)


class StopAfterRound:
    """Ctrl-C during a run in a folder: the round under way ends and its checkpoint is written,
    then the run stops with ``KeyboardInterrupt``. A second Ctrl-C, or one before any round of
    this process has been saved, stops at once.

    The first Ctrl-C only sets a flag, so it cannot be lost inside a finalizer or a callback
    from compiled code (where Python reports an exception and carries on). The handler is
    installed only from the main thread and only over Python's default one, and restored after.
    """

    def __init__(self, note: Callable[[str], None]):
        self.requested = False
        self._saved = False
        self._note = note
        self._previous: Any = None

    def __enter__(self) -> StopAfterRound:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or not self._saved:
            raise KeyboardInterrupt
        self.requested = True
        try:
            self._note("interrupted: stopping once this round is saved (Ctrl-C again to stop now)")
        except RuntimeError:  # the stream was mid-write when the signal came: the stop stands
            pass

    def round_saved(self, done: int) -> None:
        """After round ``done``'s checkpoint: stop here if Ctrl-C was pressed."""
        self._saved = True
        if self.requested:
            raise KeyboardInterrupt


def _run_in(out: Path, config: RunConfig, *, stream, progress: bool | None, resume: bool,
            overwrite: bool = False) -> SimulationResult:
    """Load the inputs, then lock ``out`` and run in it; a failure's note says what was kept."""
    bar = report.Progress(config.rounds, stream=stream, enabled=progress, lines=progress is None)
    bar.note(f"loading backbone {config.backbone}")
    backbone = load_backbone(config.backbone)
    check_task(config, backbone)
    check_generation_scoring(config)
    bar.note(f"loading data from {config.data}" if config.data else "loading the built-in WordNet supersenses")
    train, test = load_data(config)
    check_task(config, backbone, train.label_names)
    metrics_path = out / report.METRICS_FILE
    writer: report.MetricsWriter | None = None
    cumulative = 0

    def on_round(metrics: dict[str, Any]) -> None:
        nonlocal cumulative
        cumulative += metrics["bytes_up"] + metrics["bytes_down"]
        writer.write(metrics)
        bar.update(metrics["round"], accuracy=metrics.get("eval_accuracy"), cumulative_bytes=cumulative,
                   loss=metrics.get("eval_loss", metrics.get("train_loss")), seconds=metrics.get("seconds"))

    with open_run_folder(out, overwrite=overwrite, resume=resume) as folder:
        try:
            if not resume:
                checkpoint.write_config(out, config.to_dict())
            start = checkpoint.completed_rounds(out) if resume else 0  # 0: killed before its first round, start again
            previous = report.read_metrics(metrics_path)[:start] if start and metrics_path.is_file() else []
            report.write_metrics(metrics_path, previous)  # exactly the completed rounds; new ones are appended
            writer = report.MetricsWriter(metrics_path)
            cumulative = sum(m["bytes_up"] + m["bytes_down"] for m in previous)
            bar.note(f"round {start + 1}/{config.rounds}: compiling, then training (the first round takes longest)")
            with StopAfterRound(bar.note) as stop:
                result = simulate(config, backbone=backbone, train=train, test=test, callback=on_round,
                                  checkpoint_dir=out, resume=start > 0, previous_metrics=previous,
                                  on_saved=stop.round_saved, note=bar.note)
            save_run_prompt(out / "prompt.fpp", result.plan, result.round_state, config=config,
                            label_names=result.label_names, summary=result.summary)
            report.write_summary(out / "summary.json", result.summary)
            description = (f"{config.algorithm} · {config.method} · {config.clients} clients "
                           f"({config.clients_per_round}/round) · {config.partition}")
            report.plot_curves(result.metrics, out / "curves.png", baselines=result.summary.get("baselines"),
                               title=description)
        except BaseException as err:
            try:
                done = checkpoint.completed_rounds(out)
            except Exception:  # noqa: BLE001 - the original failure matters, not this one
                done = 0
            if done:
                folder.keep_on_failure()
            again = f"`fedprompt run --resume {shlex.quote(str(out))}`"
            kept = (f"continue with {again}" if done else f"start again with {again}") if done or resume else None
            if isinstance(err, KeyboardInterrupt):
                err.add_note(f"interrupted after round {done}; {kept}" if done else
                             f"interrupted before the first round ended; {kept or f'{out} is as it was'}")
            elif isinstance(err, OSError):
                err.add_note(f"{done} completed round{'s' * (done != 1)} kept; {kept}" if done else
                             kept or f"{out} is as it was")
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    return result
