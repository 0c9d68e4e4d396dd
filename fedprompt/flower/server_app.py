"""The Flower ServerApp: the server of a federated prompt-tuning run over SuperNodes.

It builds the run's :class:`~fedprompt.flower.common.Federation` from the run config as the
simulation does (with ``node-data = true`` it loads no training data: each SuperNode reads its
own file), then

1. waits for the SuperNodes and asks each (a ``query`` message) which client it is, which
   backbone it holds and how many examples it has; a node whose backbone fingerprint differs,
   or that cannot build its client (a bad data file), is left out; with ``client-keys`` a
   client is only ever the node whose SuperNode authentication key is bound to it
   (:class:`NodeDirectory`): a node with a key bound to no client is sent nothing, one that
   claims a client its key is not bound to is left out, both logged and counted in
   ``summary["binding"]``; without it, any node may claim any client (a trusted network only);
   with ``head-init = "class_means"``, before the first round, sends every client that has a
   node the initial params (a ``query.class_statistics`` message) and sets the head from the
   sum of the valid replies' class statistics (:func:`class_means_setup`, the simulation's
   head when every client answers); a reply that is missing, an error, over the size limit or
   not plausible statistics is left out and counted (``summary["setup"]``);
2. every round, samples clients exactly as the simulation (``FederationPlan.sample``),
   sends each sampled client that has a node the global state encoded by the wire codec, and
   waits up to ``round-timeout`` seconds for the replies (:func:`~fedprompt.flower.common.send_and_receive`);
3. decodes and validates the replies and ends the round with the plan's server round, the one
   the simulation calls (:class:`~fedprompt.server.rounds.ServerRound`: the robust rule or
   central DP, the optax step, the privacy ledger, whose epsilon goes into the metrics): a
   client that died, timed out, answered with an error or sent a bad update or example count
   is left out and the other clients' weights renormalize; so is a reply not bound to what the
   server sent that node (the round, the client id and the round's fresh nonce, from the OS's
   entropy: :func:`~fedprompt.flower.common.check_binding`; reasons ``update bound to another
   round`` / ``client`` / ``nonce``). Every update's delta is clipped to the plan's update
   bound (``update-clip``), the simulation's stage. A client's weight is its example
   count (reported by the client, checked against the demo partition's when the server has
   it) capped at ``max-client-examples``, or 1 for every client (``client-weighting =
   "uniform"``); secure aggregation's mean is uniform (the server sees only the sum);
4. evaluates the global prompt on the test set (if the server has one), and with
   ``federated-eval = true`` sends every client that has a node an ``evaluate`` message and
   averages the nodes' own loss and accuracy, weighted as the updates are
   (``federated_eval_loss``, ``federated_eval_accuracy``, ``federated_eval_clients``,
   ``federated_eval_examples``: the capped counts, ``federated_eval_rejected``: refused
   replies), and appends the round's metrics to
   ``<out>/metrics.jsonl``: the simulation's fields (``bytes_up``/``bytes_down`` are the
   lengths of the codec payloads that crossed) plus ``wire_bytes_up``/``wire_bytes_down``
   (the Flower messages' objects as pushed, records and metadata included), ``participants``
   (the clients whose update was aggregated), ``unreachable`` (sampled clients without a live
   node), ``timeouts`` (no reply within ``round-timeout``) and ``errors`` (error replies, such
   as the SuperLink's for a node that went offline); ``dropped`` counts all three.

The output folder is a run folder (:mod:`fedprompt.federation.run_folder`), as for ``fedprompt
run``: locked while the run goes, and a folder that holds another run is refused unless the run
config says ``overwrite = true`` (the old run is replaced only once the new one has finished).
At the end it writes ``<out>/prompt.fpp`` (the prompt artifact of ``fedprompt run``),
``<out>/global_state.msgpack`` (the final global state in the wire codec, exactly as trained)
and ``<out>/summary.json`` (with a class-means head, its ``setup`` entry is the simulation's:
``head_init``, ``clients`` that contributed, ``bytes_up``/``bytes_down`` per client, the
``initial_accuracy`` when the server has a test set, and ``rejected``, ``rejections``,
``missing``; its ``nodes`` maps each client to its node id, and ``binding`` is None without
``client-keys``, else the bound ``clients`` (client id -> key fingerprint), the number of nodes
``refused`` and, per refused node, ``refused_nodes``: its ``node`` id, the client it
``claimed`` (None: never asked), its ``key`` and the ``reason``). A client's payload is decoded with a limit of about twice the encoded size of what
the server expects (:func:`~fedprompt.flower.common.message_limit`); a larger one is the
rejection ``"over the message limit"``, and with at most about twice the template's msgpack
objects (:func:`~fedprompt.flower.common.object_limit`; ``"too many msgpack objects"``), so a
reply of empty containers costs the server a few times its size. ``out`` is a path on the SuperLink's machine, relative to the directory
the SuperLink was started in unless absolute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedprompt.client import class_means
from fedprompt.errors import ConfigError, WireError
from fedprompt.federation.evaluation import check_generation_scoring, evaluate_tpt, generation_summary
from fedprompt.federation.keys import fresh_key
from fedprompt.federation.records import RoundRecord, build_summary, evaluate_now, save_run_prompt, sum_metric
from fedprompt.federation.run_folder import check_run_folder, open_run_folder
from fedprompt.flower import common, credentials
from fedprompt.flower.secure import secure_round
from fedprompt.server import rounds
from fedprompt.server.rounds import RoundState
from fedprompt.federation import report
from fedprompt.wire import artifact, codec

FINAL_STATE_FILE = "global_state.msgpack"
"""The final global state as the server would broadcast it (wire codec, float32 as trained)."""

FEDERATED_EVAL_KEYS = ("federated_eval_loss", "federated_eval_accuracy", "federated_eval_clients",
                       "federated_eval_examples", "federated_eval_rejected")
"""The metrics of federated evaluation (``federated-eval = true``); None in rounds not evaluated."""

OVER_LIMIT = "over the message limit"
"""The rejection of a payload larger than :func:`~fedprompt.flower.common.message_limit` allows."""

MAX_FEATURE_SQUARE = 1e12
"""The largest mean squared feature norm a client's class statistics may claim (features of
norm up to 10^6: far above any backbone's pooled features, far below float32's overflow)."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point: the whole run (see :func:`run_federation`)."""
    settings = common.settings_from_run_config(context.run_config)
    run_federation(grid, settings, log=_log)


def _log(text: str) -> None:
    print(f"[fedprompt] {text}", flush=True)


@dataclasses.dataclass
class FlowerRunResult:
    """What :func:`run_federation` returns (and writes to ``out``)."""

    state: RoundState
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path


class NodeDirectory:
    """Which SuperNode holds which client, kept up to date as nodes come and go.

    A node is asked once (a ``query`` message); its answer maps its ``partition-id`` to its node
    id, and says its number of examples (``examples``, as reported). Nodes that leave (no longer
    online at the SuperLink) are forgotten, and asked again if they come back (with SuperNode
    authentication a node keeps its node id across restarts).

    ``client_keys`` (client id -> key fingerprint, the run config's ``client-keys``) binds each
    client to one SuperNode key: the directory reads every online node's public key from the
    grid (``Grid.get_nodes``: the key the SuperLink authenticated the node with), leaves out a
    node whose key is bound to no client without sending it anything, and leaves out a node
    that says it is a client its key is not bound to; both are logged and kept in ``refused``
    (node id -> what it claimed, its key and why). None: any node may say it is any client,
    first come first served (fit only for a trusted network).
    """

    def __init__(self, grid: Grid, fingerprint: str, clients: int, *, log: Callable[[str], None],
                 client_keys: Mapping[int, str] | None = None):
        self.grid = grid
        self.fingerprint = fingerprint
        self.clients = clients
        self.log = log
        self.client_of_key = None if client_keys is None else {key: client for client, key in client_keys.items()}
        self.node_of: dict[int, int] = {}
        self.examples: dict[int, int] = {}
        self.refused: dict[int, dict[str, Any]] = {}
        self._asked: set[int] = set()
        self._unanswered: dict[int, int] = {}

    def _online(self) -> tuple[set[int], dict[int, str | None]]:
        """The online nodes and, with a binding, each one's key fingerprint (None: no readable key)."""
        if self.client_of_key is None:
            return set(self.grid.get_node_ids()), {}
        keys: dict[int, str | None] = {}
        for info in self.grid.get_nodes():
            try:
                keys[info.node_id] = credentials.key_fingerprint(info.public_key) if info.public_key else None
            except ConfigError:
                keys[info.node_id] = None
        return set(keys), keys

    def _refuse(self, node: int, claimed: int | None, key: str | None, reason: str) -> None:
        self._asked.add(node)
        self.refused[node] = {"node": node, "claimed": claimed, "key": key, "reason": reason}
        self.log(f"node {node} {reason}; left out")

    def refresh(self, timeout: float) -> None:
        """Forgets nodes that left and asks new nodes which client they are."""
        online, key_of = self._online()
        self.node_of = {client: node for client, node in self.node_of.items() if node in online}
        self._asked &= online  # a node that comes back is asked again
        self._unanswered = {node: n for node, n in self._unanswered.items() if node in online}
        new = sorted(online - self._asked)
        if self.client_of_key is not None:
            for node in new:
                if key_of[node] not in self.client_of_key:  # never sent anything, not even the hello
                    self._refuse(node, None, key_of[node], "has no readable public key"
                                 if key_of[node] is None else f"holds key {key_of[node]}, bound to no client")
            new = [node for node in new if node not in self._asked]
        if not new:
            return
        ask = [
            Message(RecordDict({common.RECORD: ConfigRecord({"ask": common.HELLO})}), dst_node_id=node,
                    message_type="query", ttl=max(timeout, 60.0))
            for node in new
        ]
        replies = common.send_and_receive(self.grid, ask, timeout=timeout)
        node_of_message = {m.metadata.message_id: node for m, node in zip(ask, new)}
        answered = {node_of_message.get(reply.metadata.reply_to_message_id) for reply in replies}
        for node in set(new) - answered:  # asked twice without an answer: not asked again
            self._unanswered[node] = self._unanswered.get(node, 0) + 1
            if self._unanswered[node] >= 2:
                self._asked.add(node)
                self.log(f"node {node} did not say which client it is (twice in {timeout:.0f} s); left out")
        for reply in replies:
            node = node_of_message.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            self._asked.add(node)
            if reply.has_error():
                self.log(f"node {node} could not say which client it is: {reply.error.reason}")
                continue
            record = reply.content.config_records.get(common.RECORD)
            client = record.get("partition-id") if record is not None else None
            if not isinstance(client, int) or isinstance(client, bool) or not 0 <= client < self.clients:
                self.log(f"node {node} answered without a valid partition-id; left out")
                continue
            if self.client_of_key is not None and self.client_of_key[key_of[node]] != client:
                self._refuse(node, client, key_of[node], f"says it is client {client}, but its key {key_of[node]} "
                             f"is bound to client {self.client_of_key[key_of[node]]}")
                continue
            if record.get("fingerprint") != self.fingerprint:
                self.log(f"node {node} (client {client}) holds another backbone; left out")
                continue
            if client in self.node_of and self.node_of[client] in online:
                self.log(f"node {node} also says it is client {client} (node {self.node_of[client]}); left out")
                continue
            self.node_of[client] = node
            self.refused.pop(node, None)
            examples = record.get("num-examples")
            if isinstance(examples, int) and not isinstance(examples, bool) and examples > 0:
                self.examples[client] = examples
            self.log(f"node {node} is client {client} ({examples} examples)")

    def wait_for(self, required: int, timeout: float) -> None:
        """Waits until ``required`` clients have a node.

        Raises:
          FederationError: fewer after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.refresh(timeout=max(1.0, deadline - time.monotonic()))
            if len(self.node_of) >= required:
                return
            if time.monotonic() >= deadline:
                raise common.FederationError(
                    f"{len(self.node_of)} of the {required} clients needed have a SuperNode after {timeout:.0f} s"
                )
            time.sleep(1.0)


def run_federation(
    grid: Grid, settings: common.FlowerSettings, *, log: Callable[[str], None] = _log
) -> FlowerRunResult:
    """Runs a whole federation over the SuperNodes of ``grid``; writes metrics, prompt and summary."""
    started = time.perf_counter()
    cfg = settings.run
    out = Path(cfg.out)
    check_run_folder(out, overwrite=settings.overwrite)  # before anything is loaded
    check_generation_scoring(cfg)
    fed = common.build_federation(settings, common.load_run_backbone(settings))
    plan = fed.plan
    fingerprint = fed.backbone.fingerprint
    test = fed.test_set()  # None: no server-side evaluation (node data without test-data)
    with open_run_folder(out, overwrite=settings.overwrite) as folder:
        log(f"{cfg.algorithm} · {cfg.method} · {cfg.clients} clients ({cfg.clients_per_round}/round) · "
            f"{cfg.rounds} rounds · backbone {fed.backbone.name} ({fingerprint[:12]}) · out {out.resolve()}")
        client_keys = dict(settings.client_keys) or None
        if client_keys is None:
            log("no client-keys: any SuperNode may say it is any client (fit only for a trusted network)")
        else:
            log(f"client-keys: {len(client_keys)} of {cfg.clients} clients bound to a SuperNode key")
        nodes = NodeDirectory(grid, fingerprint, cfg.clients, log=log, client_keys=client_keys)
        nodes.wait_for(settings.required_nodes, settings.node_wait_timeout)

        params, setup = plan.init_params(), None
        initial_params = params
        if plan.head_statistics is not None:  # the class-means head, once before round 1
            params, setup = class_means_setup(grid, settings, fed, nodes, params, test, log=log)
        state = plan.server.init(params)
        if plan.seeds is not None and not plan.seeds.initial_held:  # hand the set-up's state to the nodes
            state, installed = install_state(grid, settings, fed, nodes, state, log=log)
            setup["bytes_down"] += installed
        template = plan.update_template(fed.template_rows())
        metrics: list[dict[str, Any]] = []
        with report.MetricsWriter(out / report.METRICS_FILE) as writer:
            for r in range(cfg.rounds):
                start = time.perf_counter()
                state, record = (secure_round if plan.secagg else _round)(grid, settings, fed, nodes, state, r,
                                                                          template)
                evaluation = _evaluate(grid, settings, fed, nodes, state, r, test)
                line = record.to_dict(evaluation, seconds=time.perf_counter() - start)
                metrics.append(line)
                writer.write(line)
                folder.keep_on_failure()  # a failure from here on keeps the rounds' metrics
                federated = (f", federated eval accuracy {line['federated_eval_accuracy']}"
                             if settings.federated_eval else "")
                log(f"round {line['round']}: {line['clients']}/{line['sampled']} clients, "
                    f"train loss {line['train_loss']:.4f}, eval accuracy {line['eval_accuracy']}{federated}, "
                    f"up {line['bytes_up']} B, down {line['bytes_down']} B, {line['seconds']:.1f} s")

        artifact.write_atomic(out / FINAL_STATE_FILE, codec.encode(
            jax.device_get(plan.broadcast(state)), kind=rounds.GLOBAL_KIND, round=cfg.rounds, fingerprint=fingerprint,
        ))
        sizes = fed.client_sizes  # with node data: what the nodes reported (0: no node)
        if sizes is None:
            sizes = [nodes.examples.get(client, 0) for client in range(cfg.clients)]
        summary = build_summary(metrics, runtime="flower", config=cfg, plan=plan, state=state,
                                label_names=fed.label_names, client_sizes=sizes)
        summary.update({
            "total_wire_bytes_up": sum_metric(metrics, "wire_bytes_up"),
            "total_wire_bytes_down": sum_metric(metrics, "wire_bytes_down"),
            "nodes": {str(client): node for client, node in sorted(nodes.node_of.items())},
            "binding": None if client_keys is None else {
                "clients": {str(client): key for client, key in sorted(client_keys.items())},
                "refused": len(nodes.refused),
                "refused_nodes": [nodes.refused[node] for node in sorted(nodes.refused)],
            },
            "flower": {k: v for k, v in dataclasses.asdict(settings).items() if k != "run"},
        })
        if setup is not None:
            summary["setup"] = setup
        if settings.federated_eval:
            summary["final_federated_accuracy"] = metrics[-1]["federated_eval_accuracy"]
        if cfg.tpt:
            summary["tpt"] = evaluate_tpt(cfg, plan, plan.trainable(state.server.params), test)
        summary.update(generation_summary(cfg, plan, plan.trainable(state.server.params), fed.test_examples,
                                          initial=plan.trainable(initial_params)))
        summary["wall_seconds"] = time.perf_counter() - started
        save_run_prompt(out / "prompt.fpp", plan, state, config=cfg, label_names=fed.label_names, summary=summary)
        report.write_summary(out / "summary.json", summary)
    log(f"done: final accuracy {summary['final_accuracy']}, prompt in {(out / 'prompt.fpp').resolve()}")
    return FlowerRunResult(state, metrics, summary, out)


def install_state(grid, settings, fed, nodes, state, *, log: Callable[[str], None] = _log):
    """A seed downlink's set-up: every client with a node gets the state the rounds' seeds start
    from (a ``query.install`` message) and acknowledges it, bound to round 0, its id and a fresh
    nonce; a client that does not is sent the whole state in its first round. Returns the new
    state (its log knows who holds the state) and the bytes sent to one client."""
    plan = fed.plan
    payload = codec.encode(jax.device_get({"params": state.server.params}), kind=rounds.GLOBAL_KIND, round=0,
                           fingerprint=fed.backbone.fingerprint)
    clients = sorted(nodes.node_of)
    nonce = common.fresh_nonce()
    messages = [
        Message(RecordDict({common.RECORD: ConfigRecord({"global": payload, "round": 0, "client-id": c,
                                                         "nonce": nonce})}),
                dst_node_id=nodes.node_of[c], message_type=f"query.{common.INSTALL}", ttl=settings.round_timeout + 60.0)
        for c in clients
    ]
    replies = common.send_and_receive(grid, messages, timeout=settings.round_timeout)
    client_of = {m.metadata.message_id: c for m, c in zip(messages, clients)}
    acknowledged = []
    for reply in replies:
        client = client_of.get(reply.metadata.reply_to_message_id)
        if client is None or reply.has_error() or not reply.has_content():
            continue
        try:
            common.check_binding(reply.content.config_records.get(common.RECORD) or {}, round_index=0,
                                 client_id=client, nonce=nonce)
        except WireError:
            continue
        acknowledged.append(client)
    log(f"seed downlink: {len(acknowledged)} of {len(clients)} clients hold the set-up's state")
    return state._replace(downlink=plan.seeds.installed(state.downlink, acknowledged)), len(payload)


def class_means_setup(grid, settings, fed, nodes, params, test, *, log: Callable[[str], None] = _log):
    """The class-means head, once before the first round: ``params`` with the head set from the
    clients' class statistics, and the summary's ``setup`` entry.

    Every client that has a node gets the initial ``params`` (a ``query.class_statistics``
    message, codec kind "global") and replies with its class statistics
    (:meth:`~fedprompt.federation.plan.FederationPlan.class_statistics`); each reply is checked
    (:func:`check_class_statistics`); the valid ones are stacked in client-id order and summed
    (:func:`~fedprompt.client.class_means.combine`), exactly as the simulation does with every
    client's. A reply must be bound to its message (round 0, the client id and a fresh nonce:
    :func:`~fedprompt.flower.common.check_binding`). A missing, error or refused reply is left
    out, logged and counted.

    Raises:
      FederationError: no client sent valid statistics.
    """
    plan, cfg = fed.plan, settings.run
    fingerprint = fed.backbone.fingerprint
    payload = codec.encode(jax.device_get({"params": params}), kind=rounds.GLOBAL_KIND, fingerprint=fingerprint)
    template = dict(plan.class_statistics_template()._asdict())
    limit = common.message_limit(template, kind=class_means.STATISTICS_KIND, fingerprint=fingerprint)
    objects = common.object_limit(template, kind=class_means.STATISTICS_KIND, fingerprint=fingerprint)
    clients = sorted(nodes.node_of)
    nonce = common.fresh_nonce()  # a reply must echo it with round 0 and its client id
    messages = [
        Message(RecordDict({common.RECORD: ConfigRecord({"global": payload, "round": 0, "client-id": c,
                                                         "nonce": nonce})}),
                dst_node_id=nodes.node_of[c], message_type=f"query.{common.CLASS_STATISTICS}",
                ttl=settings.round_timeout + 60.0)
        for c in clients
    ]
    replies = common.send_and_receive(grid, messages, timeout=settings.round_timeout)
    client_of = {m.metadata.message_id: c for m, c in zip(messages, clients)}
    known = fed.client_sizes
    valid: dict[int, class_means.ClassStatistics] = {}
    answered: set[int] = set()
    rejections: dict[str, int] = {}
    sizes_up: list[int] = []
    for reply in replies:
        client = client_of.get(reply.metadata.reply_to_message_id)
        if client is None or client in answered:
            continue
        answered.add(client)
        if reply.has_error():
            log(f"client {client} could not send its class statistics: {reply.error.reason}")
            rejections["error reply"] = rejections.get("error reply", 0) + 1
            continue
        record = reply.content.config_records.get(common.RECORD) if reply.has_content() else None
        data = record.get("statistics") if record is not None else None
        size = int(known[client]) if known is not None else nodes.examples.get(client, cfg.head_init_examples)
        try:
            common.check_binding(record if record is not None else {}, round_index=0, client_id=client, nonce=nonce)
            valid[client] = check_class_statistics(
                data, template, fingerprint=fingerprint, limit=limit,
                max_examples=min(cfg.head_init_examples, size), max_objects=objects)
        except WireError as err:
            reason = rounds.rejection_reason(err)
            rejections[reason] = rejections.get(reason, 0) + 1
            log(f"client {client}'s class statistics are refused ({err}); left out of the head")
            continue
        sizes_up.append(len(data))
    rejected, missing = sum(rejections.values()), len(clients) - len(answered)
    if missing:
        log(f"{missing} of {len(clients)} clients sent no class statistics within {settings.round_timeout:.0f} s")
    if not valid:
        raise common.FederationError(
            f"no client sent valid class statistics for the class-means head: {len(clients)} asked, "
            f"{rejected} refused ({', '.join(f'{k}: {v}' for k, v in rejections.items()) or 'none'}), "
            f"{missing} without an answer")
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *(valid[c] for c in sorted(valid)))
    params = plan.with_class_means_head(params, class_means.combine(stacked))
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params["head"])):
        raise common.FederationError("the class statistics give a non-finite head")
    setup = {
        "head_init": cfg.head_init, "clients": len(valid), "bytes_up": max(sizes_up), "bytes_down": len(payload),
        "initial_accuracy": None if test is None else plan.evaluate(params, test)["eval_accuracy"],
        "rejected": rejected, "rejections": rejections, "missing": missing,
        "contributors": sorted(valid),
    }
    log(f"class-means head from {len(valid)} of {len(clients)} clients' statistics ({rejected} refused, "
        f"{missing} missing); initial accuracy {setup['initial_accuracy']}")
    return params, setup


def check_class_statistics(
    data: Any, template: Any, *, fingerprint: str, limit: int, max_examples: int, max_objects: int | None = None
) -> class_means.ClassStatistics:
    """One client's class statistics, checked as hostile input.

    ``data``: the reply's codec bytes, at most ``limit`` long (and ``max_objects`` msgpack
    objects, :func:`~fedprompt.flower.common.object_limit`), of kind ``class_statistics``
    for this backbone, matching ``template`` (shapes, dtypes, finite values); counts must be
    non-negative integers summing to between 1 and ``max_examples``; squares non-negative and at
    most :data:`MAX_FEATURE_SQUARE` per example; a class with no example has zero sums and
    squares, and no class's sum is longer than its squares allow (``|sum|^2 <= count * squares``,
    Cauchy-Schwarz). A covariance (``head-init = "lda"``) must be symmetric, its trace the sum of
    the squares, and no entry beyond what its diagonal allows (``|s_ij| <= sqrt(s_ii s_jj)``).

    Raises:
      WireError: the first check that fails (its text before the colon is the counted reason).
    """
    if not isinstance(data, bytes):
        raise WireError("reply without class statistics")
    if len(data) > limit:
        raise WireError(f"{OVER_LIMIT}: {len(data)} bytes, the limit is {limit}")
    message = codec.check_message(codec.decode(data, max_bytes=limit, max_objects=max_objects),
                                  kind=class_means.STATISTICS_KIND,
                                  fingerprint=fingerprint)
    try:
        stats = class_means.ClassStatistics(**codec.check_template(message.tree, template))
    except WireError as err:
        what = "non-finite" if "not finite" in str(err) else "malformed"
        raise WireError(f"{what} class statistics: {err}") from err
    sums, squares, counts = (np.asarray(x, np.float64) for x in stats[:3])
    total = counts.sum()
    if np.any(counts < 0) or np.any(counts != np.round(counts)) or not 1 <= total <= max_examples:
        raise WireError(f"bad class counts: {total:g} examples (expected non-negative integers summing to "
                        f"1..{max_examples})")
    if np.any(squares < 0) or np.any(squares > MAX_FEATURE_SQUARE * counts):
        raise WireError("bad squared norms: negative, or larger than the counts allow")
    unseen = counts == 0
    if np.any(sums[unseen] != 0) or np.any(squares[unseen] != 0):
        raise WireError("inconsistent class statistics: a class without examples has features")
    if np.any(np.sum(sums * sums, axis=1) > counts * squares * (1 + 1e-3) + 1e-6):
        raise WireError("inconsistent class statistics: a class's sum is longer than its squares allow")
    if stats.scatter is not None:
        scatter = np.asarray(stats.scatter, np.float64)
        diagonal = np.diag(scatter)
        scale = max(float(squares.sum()), 1e-12)
        if np.any(np.abs(scatter - scatter.T) > 1e-4 * scale) or np.any(diagonal < 0):
            raise WireError("bad covariance: not symmetric, or a negative variance")
        if abs(float(diagonal.sum()) - float(squares.sum())) > 1e-3 * scale + 1e-6:
            raise WireError("inconsistent class statistics: the covariance's trace is not the sum of the squares")
        if np.any(np.abs(scatter) > np.sqrt(np.outer(diagonal, diagonal)) * (1 + 1e-3) + 1e-6 * scale):
            raise WireError("bad covariance: an entry larger than its variances allow")
    return stats


def _round(grid, settings, fed, nodes, state, r, template):
    """One round over Flower: the plan's sampling, the codec's messages, the plan's server round."""
    plan = fed.plan
    fingerprint = fed.backbone.fingerprint
    nodes.refresh(timeout=min(settings.round_timeout, settings.node_wait_timeout))
    ids, _ = plan.sample(r)
    payload = codec.encode(jax.device_get(plan.broadcast(state)), kind=rounds.GLOBAL_KIND, round=r,
                           fingerprint=fingerprint)
    nonce = common.fresh_nonce()  # an update must echo it: nothing from another round is accepted

    slot_of_message: list[int] = []
    messages = []
    bytes_down = largest_down = 0
    reachable = [(slot, client) for slot, client in enumerate(ids.tolist()) if client in nodes.node_of]
    sent_to = ([payload] * len(reachable) if plan.seeds is None else plan.seeds.messages(  # the rounds each
        state.downlink, [c for _, c in reachable], r, state.server.params, fingerprint=fingerprint, full=payload))
    for (slot, client), sent in zip(reachable, sent_to, strict=True):  # missed, or the state
        node = nodes.node_of[client]
        bytes_down += len(sent)
        largest_down = max(largest_down, len(sent))
        record = ConfigRecord({"global": sent, "round": r, "client-id": client, "nonce": nonce})
        messages.append(Message(RecordDict({common.RECORD: record}), dst_node_id=node, message_type="train",
                                group_id=str(r), ttl=settings.round_timeout + 60.0))
        slot_of_message.append(slot)
    wire_down = [common.flower_message_bytes(m) for m in messages]
    replies = common.send_and_receive(grid, messages, timeout=settings.round_timeout)
    # Pushing gave every message its id; a reply names the message it answers (an error reply
    # for a node that went offline comes from the SuperLink, not from that node).
    slot_of = {m.metadata.message_id: slot for m, slot in zip(messages, slot_of_message)}

    known = fed.client_sizes  # the demo partition's sizes; None: only the nodes know theirs
    limit = common.message_limit(template, kind=rounds.UPDATE_KIND, round=r, fingerprint=fingerprint)
    objects = common.object_limit(template, kind=rounds.UPDATE_KIND, round=r, fingerprint=fingerprint)
    counts = np.zeros(len(ids), np.int64)
    updates: list[bytes | None] = [None] * len(ids)
    answered = np.zeros(len(ids), bool)
    losses = np.full(len(ids), np.nan)
    errors, extra_rejections, bytes_up, wire_up = 0, {}, 0, []
    unbound: dict[int, str] = {}  # slot -> why its reply's binding is refused
    errored: set[int] = set()
    for reply in replies:
        slot = slot_of.get(reply.metadata.reply_to_message_id)
        if slot is None or answered[slot]:
            continue
        answered[slot] = True
        wire_up.append(common.flower_message_bytes(reply))
        if reply.has_error():
            errors += 1
            errored.add(slot)
            continue
        update, loss, count, reason = _reply_fields(reply, None if known is None else int(known[ids[slot]]))
        if update is not None:
            bytes_up += len(update)
            if reason is None and len(update) > limit:  # never decoded: at most ~2x an honest update
                reason = OVER_LIMIT
        if reason is not None:
            extra_rejections[reason] = extra_rejections.get(reason, 0) + 1
            continue
        updates[slot], losses[slot], counts[slot] = update, loss, count
        try:  # checked once the update itself is valid (below): one counted reason per reply
            common.check_binding(reply.content.config_records[common.RECORD], round_index=r, client_id=int(ids[slot]),
                                 nonce=nonce)
        except WireError as err:
            unbound[slot] = rounds.rejection_reason(err)

    received = plan.server.receive(updates, round_index=r, fingerprint=fingerprint, template=template,
                                   max_bytes=limit, max_objects=objects)
    received = rounds.refuse(received, unbound)  # valid content, but not bound to what this node was sent
    # Central DP's noise comes from this machine's entropy: nobody who knows the seed can remove it.
    weights = common.example_weights(settings, counts)
    state, outcome = plan.server.apply(state, received, weights, key=fresh_key(), losses=losses, participants=ids)
    if plan.seeds is not None:  # a node that answered without an error holds the round's state
        delivered = answered.copy()
        delivered[list(errored)] = False
        state = state._replace(downlink=plan.seeds.delivered(state.downlink, ids, delivered, r))
    rejections = dict(received.rejections)
    for reason, count in extra_rejections.items():
        rejections[reason] = rejections.get(reason, 0) + count
    record = RoundRecord(
        round=r + 1, train_loss=outcome.train_loss, clients=outcome.num_aggregated, sampled=len(ids),
        dropped=int(len(ids) - answered.sum()) + errors, rejections=rejections, bytes_up=bytes_up,
        bytes_down=bytes_down, participants=[int(ids[slot]) for slot in np.flatnonzero(received.accepted)],
        extra={
            **outcome.metrics,
            "largest_down": largest_down,
            "unreachable": len(ids) - len(messages),
            "errors": errors,
            "timeouts": int(len(messages) - answered.sum()),
            "wire_bytes_up": None if None in wire_up else int(sum(wire_up)),
            "wire_bytes_down": None if None in wire_down else int(sum(wire_down)),
        },
    )
    return state, record


def _reply_fields(reply: Message, expected_examples: int | None) -> tuple[bytes | None, float, int, str | None]:
    """A reply's update bytes, loss and example count, or the reason it is refused."""
    if not reply.has_content():
        return None, float("nan"), 0, "empty reply"
    record = reply.content.config_records.get(common.RECORD)
    update = record.get("update") if record is not None else None
    if not isinstance(update, bytes):
        return None, float("nan"), 0, "reply without an update"
    metrics = reply.content.metric_records.get(common.METRICS)
    if metrics is None:
        return update, float("nan"), 0, "reply without metrics"
    try:
        examples = common.check_examples(metrics.get("num-examples"), expected_examples)
    except WireError as err:
        return update, float("nan"), 0, rounds.rejection_reason(err)
    loss = metrics.get("loss")
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        return update, float("nan"), 0, "non-finite loss"
    return update, float(loss), examples, None


def _evaluate(grid, settings, fed, nodes, state, r, test) -> dict[str, Any] | None:
    """Round ``r``'s evaluation: on the server's test set (if any) and, with ``federated_eval``,
    on the nodes' own rows; None in a round that is not evaluated (and no federated keys)."""
    cfg = settings.run
    federated = dict.fromkeys(FEDERATED_EVAL_KEYS) if settings.federated_eval else {}
    if not evaluate_now(r, cfg.resolved_eval_every, cfg.rounds):
        return {"eval_loss": None, "eval_accuracy": None, **federated} if federated else None
    evaluation = {"eval_loss": None, "eval_accuracy": None}
    if test is not None:
        evaluation = fed.plan.evaluate(state.server.params, test)
    if settings.federated_eval:
        federated = federated_evaluation(grid, settings, fed, nodes, state, r + 1)
    return {**evaluation, **federated}


def federated_evaluation(grid, settings, fed, nodes, state, completed: int) -> dict[str, Any]:
    """Every client that has a node evaluates the global state after ``completed`` rounds on its
    own rows (an ``evaluate`` message each); their loss and accuracy, weighted as the updates
    are (:func:`~fedprompt.flower.common.example_weights` of their counts). A reply with a bad
    count, a non-finite loss, an accuracy outside [0, 1] or a reply not bound to the message (its
    round, client id and fresh nonce: :func:`~fedprompt.flower.common.check_binding`) is refused
    (``federated_eval_rejected``)."""
    fingerprint = fed.backbone.fingerprint
    payload = codec.encode(jax.device_get(fed.plan.broadcast(state)), kind=rounds.GLOBAL_KIND, round=completed,
                           fingerprint=fingerprint)
    clients = sorted(nodes.node_of)
    nonce = common.fresh_nonce()  # a reply must echo it with the round and its client id
    messages = [
        Message(RecordDict({common.RECORD: ConfigRecord({"global": payload, "round": completed, "client-id": c,
                                                         "nonce": nonce})}),
                dst_node_id=nodes.node_of[c], message_type="evaluate", group_id=str(completed - 1),
                ttl=settings.round_timeout + 60.0)
        for c in clients
    ]
    replies = common.send_and_receive(grid, messages, timeout=settings.round_timeout)
    client_of = {m.metadata.message_id: c for m, c in zip(messages, clients)}
    results: dict[int, tuple[float, float, int]] = {}
    rejected = 0
    for reply in replies:
        client = client_of.get(reply.metadata.reply_to_message_id)
        if client is None or client in results or reply.has_error():
            continue
        try:
            record = reply.content.config_records.get(common.RECORD) if reply.has_content() else None
            common.check_binding(record if record is not None else {}, round_index=completed, client_id=client,
                                 nonce=nonce)
            results[client] = _evaluation_fields(reply)
        except WireError:
            rejected += 1
    if not results:
        return {**dict.fromkeys(FEDERATED_EVAL_KEYS), "federated_eval_clients": 0, "federated_eval_rejected": rejected}
    loss, accuracy, counts = (np.array(column) for column in zip(*results.values()))
    weights = common.example_weights(settings, counts).astype(np.float64)
    return {
        "federated_eval_loss": float(np.average(loss, weights=weights)),
        "federated_eval_accuracy": float(np.average(accuracy, weights=weights)),
        "federated_eval_clients": len(results),
        "federated_eval_examples": int(np.minimum(counts, settings.max_client_examples).sum()),
        "federated_eval_rejected": rejected,
    }


def _evaluation_fields(reply: Message) -> tuple[float, float, int]:
    """A node's evaluation reply: its loss, accuracy and example count (raises ``WireError``)."""
    metrics = reply.content.metric_records.get(common.METRICS) if reply.has_content() else None
    if metrics is None:
        raise WireError("evaluation reply without metrics")
    loss, accuracy = metrics.get("eval-loss"), metrics.get("eval-accuracy")
    count = common.check_examples(metrics.get("num-examples"))
    for name, value in (("eval-loss", loss), ("eval-accuracy", accuracy)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise WireError(f"bad {name}: {value!r}")
    if not 0.0 <= accuracy <= 1.0:
        raise WireError(f"bad eval-accuracy: {accuracy!r} is outside [0, 1]")
    return float(loss), float(accuracy), count
