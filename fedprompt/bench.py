"""Benchmarks that users can run (``fedprompt bench ...``).

Numbers are measured side by side in one process; nothing here is a pass/fail test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprompt.backbones.backbone import Backbone
from fedprompt.client.local import compiled_memory, init_trainable, make_train_step
from fedprompt.prompts import PromptConfig
from fedprompt.tasks import SequenceClassification



def _random_batch(backbone: Backbone, rng: np.random.Generator, n: int, tokens: int) -> dict[str, np.ndarray]:
    """``n`` rows of ``tokens`` random ids (all real tokens, past the special ones that start a
    vocabulary) with labels in [0, 4): benchmark input."""
    vocab = backbone.config.vocab_size
    return {
        "input_ids": rng.integers(min(1000, vocab // 2), min(vocab, 20000), (n, tokens)).astype(np.int32),
        "attention_mask": np.ones((n, tokens), np.int32),
        "labels": rng.integers(0, 4, n).astype(np.int32),
    }

def train_step(
    backbone: Backbone,
    *,
    methods: tuple[str, ...] = ("prompt", "prefix"),
    batch_size: int = 16,
    tokens: int = 64,
    virtual_tokens: int = 20,
    steps: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time one compiled prompt-tuning train step per method and report XLA's memory analysis.

    Returns one dict per method: median and min step seconds over ``steps`` timed steps (after
    one warm-up), and the compiled step's argument/output/temporary/peak bytes next to the
    frozen weights' bytes.
    """
    rng = np.random.default_rng(seed)
    batch = _random_batch(backbone, rng, batch_size, tokens)
    task = SequenceClassification(num_labels=4)
    optimizer = optax.adam(1e-3)
    rows = []
    for method in methods:
        config = PromptConfig(method=method, num_virtual_tokens=virtual_tokens, init="random", random_std=0.02)
        trainable = init_trainable(backbone, config, task, jax.random.key(seed))
        opt_state = optimizer.init(trainable)
        step = make_train_step(backbone, config, task, optimizer)
        memory = compiled_memory(step, trainable, opt_state, batch, backbone.weights)
        trainable, opt_state, metrics = step(trainable, opt_state, batch, backbone.weights)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainable, opt_state, metrics = step(trainable, opt_state, batch, backbone.weights)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "method": method,
                "batch_size": batch_size,
                "tokens": tokens,
                "virtual_tokens": virtual_tokens,
                "trainable_floats": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
                "step_seconds_median": float(np.median(times)),
                "step_seconds_min": float(np.min(times)),
                "weights_bytes": backbone.weight_bytes(),
                **{f"compiled_{k}_bytes": v for k, v in memory.items()},
            }
        )
    return rows


def reset_peak_rss() -> bool:
    """Resets this process's peak resident set size (Linux: ``/proc/self/clear_refs``), so that
    :func:`peak_rss` then reports the peak from now on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` (since the last
    :func:`reset_peak_rss`) where Linux reports it, else the lifetime peak (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def simulate_round(
    backbone: Backbone,
    *,
    clients_per_round: int = 8,
    local_steps: int = 4,
    batch_size: int = 16,
    tokens: int = 32,
    virtual_tokens: int = 20,
    examples_per_client: int = 64,
    repeats: int = 3,
    seed: int = 0,
    client_block: int | str | None = "auto",
    compare_blocks: tuple[int, ...] = (),
    loops: tuple[str, ...] = ("per_client", "per_step"),
) -> dict[str, Any]:
    """One round's local training several ways, side by side, on the same clients and data.

    * ``vmapped``: the engine (:meth:`~fedprompt.simulation.engine.FederatedSimulation.train_clients`)
      with ``client_block`` (``"auto"``: its own choice; a number; None: all in one block);
    * ``vmapped_<b>``: the engine in blocks of at most ``b``, for every ``b`` of ``compare_blocks``;
    * ``per_client`` (in ``loops``): a Python loop over clients, each running the same jitted
      client update;
    * ``per_step`` (in ``loops``): a Python loop over clients and local steps of the jitted
      local train step.

    Returns median seconds per round for each, the speed-ups of ``vmapped`` over the loops, the
    block the engine used, and the process's peak resident memory during the row
    (``peak_rss_bytes``, :func:`peak_rss` after :func:`reset_peak_rss`).
    """
    from fedprompt.server import algorithms
    from fedprompt.simulation.engine import FederatedSimulation, build_client_data

    reset_peak_rss()
    rng = np.random.default_rng(seed)
    n = clients_per_round * examples_per_client
    encoded = _random_batch(backbone, rng, n, tokens)
    parts = [np.arange(i * examples_per_client, (i + 1) * examples_per_client) for i in range(clients_per_round)]
    config = PromptConfig(num_virtual_tokens=virtual_tokens)
    task = SequenceClassification(num_labels=4)
    optimizer = optax.adam(1e-2)
    data = build_client_data(encoded, parts, 4)

    def engine(block):
        return FederatedSimulation.build(
            backbone, config, task, algorithms.fedavg(), optimizer, data, clients_per_round=clients_per_round,
            local_steps=local_steps, batch_size=batch_size, seed=seed, client_block=block)

    sim = engine(client_block)
    state, controls = sim.init()
    ids = np.arange(clients_per_round)
    keys = sim.client_keys(0)
    single = jax.jit(sim.plan.program.update)
    step = make_train_step(backbone, config, task, optimizer)

    def vmapped(simulation):
        return lambda clients: jax.block_until_ready(simulation.train_clients(state, controls, clients, 0))

    def per_client(clients):
        for c in clients:
            data = {k: v[c] for k, v in sim.client_data.columns.items()}
            jax.block_until_ready(single(state.params, backbone.weights, data, examples_per_client, keys[c]))

    def per_step(clients):
        for c in clients:
            params = jax.tree.map(jnp.array, state.params)
            opt_state = optimizer.init(params)
            for s in range(local_steps):
                rows = parts[c][(s * batch_size + np.arange(batch_size)) % examples_per_client]
                params, opt_state, m = step(params, opt_state, {k: v[rows] for k, v in encoded.items()}, backbone.weights)
            jax.block_until_ready(m)

    # FLOPs of the round: local steps x clients x one train step's FLOPs (XLA cost analysis of
    # the step on one client's batch; the vmapped and looped programs do the same arithmetic).
    batch = {k: v[parts[0][:batch_size]] for k, v in encoded.items()}
    params = jax.tree.map(jnp.array, state.params)
    cost = step.lower(params, optimizer.init(params), batch, backbone.weights).compile().cost_analysis()
    step_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    round_flops = step_flops * local_steps * clients_per_round
    ways = {"vmapped": vmapped(sim), **{f"vmapped_{b}": vmapped(engine(b)) for b in compare_blocks}}
    ways.update({name: {"per_client": per_client, "per_step": per_step}[name] for name in loops})
    for fn in ways.values():
        fn(ids[:1])  # compiles every program the way runs (a block of one client is padded to the block)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):  # interleaved, so that a machine whose speed drifts slows every way alike
        for name, fn in ways.items():
            start = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - start)
    timings = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "clients_per_round": clients_per_round,
        "client_block": sim.block,
        "client_block_setting": client_block,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "tokens": tokens,
        "virtual_tokens": virtual_tokens,
        "seconds": timings,
        "clients_per_second": {k: clients_per_round / v for k, v in timings.items()},
        "step_flops": step_flops,
        "achieved_flops_per_second": {k: round_flops / v for k, v in timings.items()},
        **{f"speedup_vs_{name}": timings[name] / timings["vmapped"] for name in loops},
        "peak_rss_bytes": peak_rss(),
    }


# ----------------------------------------------------------------------------- machine limits


def machine() -> dict[str, Any]:
    """What the numbers were measured on: JAX's device, the CPU model and count, the load."""
    import os
    import platform

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def _median_seconds(fn, repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    return _interleaved_median_seconds({"fn": fn}, repeats)["fn"]


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict[str, float]:
    """This machine's memory bandwidth, from large copies (read + write bytes per second).

    ``numpy_copy``: ``np.copyto`` of ``nbytes`` into a preallocated array; ``jax_add``: a jitted
    ``x + 1`` updating its (donated) input in place, so no fresh output pages are faulted in.
    ``bandwidth`` is the larger, in bytes/s.
    """
    n = nbytes // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    numpy_copy = 2 * nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats)
    add = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    state = {"x": jnp.array(src)}

    def run():
        state["x"] = add(state["x"])
        state["x"].block_until_ready()

    jax_add = 2 * nbytes / _best_seconds(run, repeats)
    return {"bytes": nbytes, "numpy_copy": numpy_copy, "jax_add": jax_add, "bandwidth": max(numpy_copy, jax_add)}


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """This machine's matmul FLOP/s on ``[n, n] @ [n, n]`` (``2 n^3`` FLOPs) in ``dtype``
    (``float32`` or ``bfloat16``), by the best of the libraries at hand: jitted XLA, NumPy
    (its BLAS; float32 only) and PyTorch (when installed).

    Returns ``n``, ``dtype``, ``by_library`` (FLOP/s per library measured), ``best`` (the
    fastest library's name), ``flops_per_second`` (its FLOP/s) and ``seconds`` (its time).
    """
    rng = np.random.default_rng(0)
    a_np = rng.random((n, n), dtype=np.float32)
    b_np = rng.random((n, n), dtype=np.float32)
    times: dict[str, float] = {}
    a = jnp.asarray(a_np, dtype)
    b = jnp.asarray(b_np, dtype)
    matmul = jax.jit(jnp.matmul)
    times["xla"] = _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    if dtype == "float32":
        out = np.empty_like(a_np)
        times["numpy"] = _best_seconds(lambda: np.matmul(a_np, b_np, out=out), repeats)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        ta = torch.from_numpy(a_np).to(getattr(torch, dtype))
        tb = torch.from_numpy(b_np).to(getattr(torch, dtype))
        with torch.no_grad():
            times["torch"] = _best_seconds(lambda: torch.matmul(ta, tb), repeats)
    by_library = {name: 2 * n**3 / t for name, t in times.items()}
    best = max(by_library, key=by_library.get)
    return {"n": n, "dtype": dtype, "by_library": by_library, "best": best,
            "flops_per_second": by_library[best], "seconds": times[best]}


# ----------------------------------------------------------------------------- aggregate


def flower_style_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """The NumPy baseline: what Flower's ``aggregate`` does with ``(arrays, num_examples)``
    pairs: scale every client's arrays by its example count, ``reduce(np.add)`` layer by layer,
    divide by the total count."""
    import functools

    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in arrays] for arrays, n in results]
    return [functools.reduce(np.add, layers) / total for layers in zip(*weighted)]


def aggregate(
    *,
    clients: tuple[int, ...] = (10, 100, 1000),
    shapes: tuple[tuple[int, ...], ...] = ((20, 384), (100, 4096)),
    repeats: int = 5,
    clip_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """fedprompt's compiled aggregation vs the NumPy (Flower-style) weighted sum, side by side.

    For every prompt shape and client count ``K``: median seconds of

    * ``numpy``: :func:`flower_style_aggregate` over a list of ``K`` arrays;
    * ``kernel_mean``: ``jax.jit(fedprompt.kernels.make_clipped_mean(None))``, the weighted
      mean of the kernels' XLA path (one read of the updates, streamed client row by row);
    * ``fused_clip``: :func:`fedprompt.kernels.clipped_weighted_sum` (XLA), per-client norm
      clipping + weighting + sum (two reads: norms, then the sum);
    * ``jit_mean``: ``jax.jit(fedprompt.server.aggregators.weighted_mean)`` over the stacked
      ``[K, *shape]`` device array (the kernels' weighted sum, per leaf);
    * ``aggregation``: :class:`~fedprompt.server.aggregators.Aggregation` with its default
      ``weighted_mean`` on the list of ``K`` decoded host updates (the generic path of the
      robust rules): it stacks them into a new padded buffer, checks every client for
      non-finite values and takes the weighted mean;
    * ``server_round``: the server's calls from the ``K`` encoded messages to the mean
      (:meth:`~fedprompt.server.rounds.ServerRound.receive`, then ``apply``'s default stage with
      update bound ``clip_norm``): every message decoded, checked and written straight into
      reused row buffers (:class:`~fedprompt.server.aggregators.RowBuffers`), each row's sum
      of squares taken as it is written (:func:`fedprompt.kernels.copy_row`), then one pass
      over the rows that drops non-finite ones, clips the others and takes the weighted mean;
    * ``receive``: the first half alone (decode, check, write into rows, square);
    * ``one_pass_mean``: the second half alone, from the decoded rows and their sums of squares
      (host memory: :func:`fedprompt.kernels.clipped_mean_of_finite_host`, one matrix-vector
      product);
    * ``host_pass_unnormed``: the same host pass given the rows only (it squares them first:
      two reads);
    * ``one_pass_compiled``: the same pass compiled (:func:`fedprompt.kernels.clipped_mean_of_finite`)
      on the stacked device array, what it costs where the updates are on a device.

    Effective bandwidth is the updates' bytes (``K x size x 4``) over the time, next to this
    machine's copy bandwidth measured in the same run.
    """
    from fedprompt import kernels
    from fedprompt.server import aggregators, rounds
    from fedprompt.wire import codec

    bandwidth = memory_bandwidth()
    stage = rounds.update_clip_stage(rounds.mean_stage(), clip_norm)
    buffers = aggregators.RowBuffers()
    rng = np.random.default_rng(seed)
    rows = []
    jit_mean = jax.jit(aggregators.weighted_mean)
    kernel_mean = jax.jit(kernels.make_clipped_mean(None))
    compiled_pass = jax.jit(lambda x, w: kernels.clipped_mean_of_finite([x], w, clip_norm)[0][0])
    for shape in shapes:
        size = int(np.prod(shape))
        for k in clients:
            stacked_np = rng.random((k, *shape), dtype=np.float32) - np.float32(0.5)
            counts = rng.integers(1, 100, k)
            results = [([stacked_np[i]], int(counts[i])) for i in range(k)]  # K separate contiguous arrays
            weights = jnp.asarray(counts, jnp.float32)
            stacked = jnp.array(stacked_np)
            tree = {"prompt": stacked}
            decoded = [{"prompt": stacked_np[i]} for i in range(k)]
            aggregation = aggregators.Aggregation()
            fused = jax.jit(lambda x, w: kernels.clipped_weighted_sum(x.reshape(x.shape[0], -1), w, clip_norm))
            n_rep = repeats if k * size < 5e7 else max(2, repeats // 2)
            slow_repeats = n_rep if k * size < 5e7 else 1  # the column reductions take seconds there
            expected = flower_style_aggregate(results)[0]
            got = np.asarray(kernel_mean(tree, weights)["prompt"])
            rows_k = aggregators.bucket_size(k)
            padded = np.pad(counts, (0, rows_k - k)).astype(np.float32)
            template = {"delta": {"prompt": np.zeros(shape, np.float32)}}
            messages = [codec.encode({"delta": d}, kind=rounds.UPDATE_KIND, round=0, fingerprint="bench")
                        for d in decoded]

            def receive():
                return rounds.receive_updates(messages, round_index=0, fingerprint="bench", template=template,
                                              buffers=buffers, rows=rows_k)

            def server_round():
                got = receive()
                return jax.block_until_ready(stage.apply((), got.stacked, padded, None, sq_norms=got.sq_norms)[0])

            received = receive()
            stacked_rows, sq_norms = received.stacked, received.sq_norms
            seconds = {
                "numpy": _median_seconds(lambda: flower_style_aggregate(results), n_rep),
                "kernel_mean": _median_seconds(lambda: jax.block_until_ready(kernel_mean(tree, weights)), n_rep),
                "fused_clip": _median_seconds(lambda: jax.block_until_ready(fused(stacked, weights)), n_rep),
                "jit_mean": _median_seconds(lambda: jax.block_until_ready(jit_mean(tree, weights)), slow_repeats),
                "aggregation": _median_seconds(lambda: jax.block_until_ready(aggregation(decoded, counts)), slow_repeats),
                "server_round": _median_seconds(server_round, n_rep),
                "receive": _median_seconds(receive, n_rep),
                "one_pass_mean": _median_seconds(
                    lambda: jax.block_until_ready(stage.apply((), stacked_rows, padded, None, sq_norms=sq_norms)[0]),
                    n_rep),
                "host_pass_unnormed": _median_seconds(
                    lambda: jax.block_until_ready(stage.apply((), stacked_rows, padded, None)[0]), n_rep),
                "one_pass_compiled": _median_seconds(
                    lambda: jax.block_until_ready(compiled_pass(stacked, weights)), n_rep),
            }
            nbytes = k * size * 4
            rows.append(
                {
                    "clients": k,
                    "shape": list(shape),
                    "floats_per_client": size,
                    "bytes": nbytes,
                    "seconds": seconds,
                    "speedup_vs_numpy": {name: seconds["numpy"] / t for name, t in seconds.items() if name != "numpy"},
                    "gb_per_second": {name: nbytes / t / 1e9 for name, t in seconds.items()},
                    "fraction_of_bandwidth": {name: nbytes / t / bandwidth["bandwidth"] for name, t in seconds.items()},
                    "max_abs_error_vs_numpy": float(np.max(np.abs(got - expected))),
                }
            )
            del stacked_np, results, stacked, tree, decoded, stacked_rows, messages, received
    return {"machine": machine(), "bandwidth": bandwidth, "rows": rows}


# ----------------------------------------------------------------------------- train


def _interleaved_median_seconds(fns: dict[str, Callable[[], Any]], repeats: int, *, block: int = 2) -> dict[str, float]:
    """The median seconds of each function, timed in turns of ``block`` calls each until each has
    run ``repeats`` times (after one warm-up call each), so that a machine whose speed drifts
    (a shared host) slows every function alike instead of whichever happened to run last."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < repeats for t in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, repeats - len(times[name]))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _peft_step(backbone: Backbone, batch: dict[str, np.ndarray], virtual_tokens: int, num_labels: int,
               precision: str = "float32") -> Callable[[], None] | None:
    """The same prompt-tuning step in PyTorch with PEFT (when torch and peft are installed), its
    model and head in ``precision`` (``float32`` or ``bfloat16``), as a function of no arguments."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    if backbone.path is None:
        return None
    model = transformers.AutoModel.from_pretrained(str(backbone.path))
    config = peft.PromptTuningConfig(task_type=peft.TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens)
    model = peft.get_peft_model(model, config)
    head = torch.nn.Linear(model.config.hidden_size, num_labels)
    if precision != "float32":
        model, head = model.to(getattr(torch, precision)), head.to(getattr(torch, precision))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)

    def step():
        optimizer.zero_grad()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, virtual_tokens:]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # mean pooling over real tokens
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        optimizer.step()

    return step


def train_efficiency(
    backbone: Backbone,
    *,
    method: str = "prompt",
    batch_size: int = 16,
    tokens: int = 64,
    virtual_tokens: int = 20,
    steps: int = 20,
    seed: int = 0,
    matmul_n: int = 2048,
) -> dict[str, Any]:
    """The compiled prompt-tuning train step as a fraction of this machine's matmul FLOP/s.

    The step runs in the backbone's ``compute_dtype`` (``float32``, or ``bfloat16`` for a
    backbone loaded with ``dtype=compute_dtype=jnp.bfloat16``; the prompt stays float32). Its
    FLOPs come from XLA's cost analysis of the compiled step; the machine's FLOP/s from the
    best of XLA, NumPy and PyTorch on a ``matmul_n`` square matmul in that precision, in the
    same process (:func:`matmul_flops`). With torch and peft installed, the same step (same model, batch,
    prompt length, mean pooling, linear head, Adam, precision) in PyTorch PEFT prompt tuning
    is timed too, in turns with fedprompt's (two steps of one, then two of the other, ``steps``
    of each in all), so that both see the same machine.
    """
    precision = jnp.dtype(backbone.compute_dtype).name
    rng = np.random.default_rng(seed)
    batch = _random_batch(backbone, rng, batch_size, tokens)
    task = SequenceClassification(num_labels=4)
    optimizer = optax.adam(1e-3)
    config = PromptConfig(method=method, num_virtual_tokens=virtual_tokens, init="random", random_std=0.02)
    trainable = init_trainable(backbone, config, task, jax.random.key(seed))
    opt_state = optimizer.init(trainable)
    step = make_train_step(backbone, config, task, optimizer)
    compiled = step.lower(trainable, opt_state, batch, backbone.weights).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    state = {"trainable": trainable, "opt_state": opt_state}

    def run():
        state["trainable"], state["opt_state"], metrics = step(state["trainable"], state["opt_state"], batch, backbone.weights)
        jax.block_until_ready(metrics)

    peft_step = _peft_step(backbone, batch, virtual_tokens, 4, precision) if method == "prompt" else None
    timed = _interleaved_median_seconds({"fedprompt": run, **({"peft": peft_step} if peft_step else {})}, steps)
    seconds, peft_seconds = timed["fedprompt"], timed.get("peft")
    peak = matmul_flops(n=matmul_n, dtype=precision)
    return {
        "machine": machine(),
        "method": method,
        "precision": precision,
        "batch_size": batch_size,
        "tokens": tokens,
        "virtual_tokens": virtual_tokens,
        "step_flops": flops,
        "step_bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "step_seconds": seconds,
        "achieved_flops_per_second": flops / seconds,
        "matmul_flops_per_second": peak["flops_per_second"],
        "matmul_n": peak["n"],
        "matmul_by_library": peak["by_library"],
        "matmul_best": peak["best"],
        "fraction_of_matmul_peak": flops / seconds / peak["flops_per_second"],
        "peft_step_seconds": peft_seconds,
        "ratio_vs_peft": None if peft_seconds is None else seconds / peft_seconds,
    }


# ----------------------------------------------------------------------------- simulate: memory


def block_memory(
    backbone: Backbone,
    *,
    clients: tuple[int, ...] = (8, 32, 128, 512),
    local_steps: int = 4,
    batch_size: int = 16,
    tokens: int = 32,
    virtual_tokens: int = 20,
    examples_per_client: int = 64,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """XLA's memory analysis of the engine's vmapped block program against the clients per block.

    Compiles (does not run) the block program for each block size over the same simulation
    (``max(clients)`` clients' data on the device), so the arguments (frozen weights once, all
    clients' data) stay fixed and what grows with the block is the temporaries.
    """
    from fedprompt.server import algorithms
    from fedprompt.simulation.engine import FederatedSimulation, build_client_data

    rng = np.random.default_rng(seed)
    total = max(clients)
    n = total * examples_per_client
    encoded = _random_batch(backbone, rng, n, tokens)
    parts = [np.arange(i * examples_per_client, (i + 1) * examples_per_client) for i in range(total)]
    sim = FederatedSimulation.build(
        backbone, PromptConfig(num_virtual_tokens=virtual_tokens), SequenceClassification(num_labels=4), algorithms.fedavg(),
        optax.adam(1e-2), build_client_data(encoded, parts, 4), clients_per_round=total, local_steps=local_steps,
        batch_size=batch_size, seed=seed,
    )
    weights_bytes = backbone.weight_bytes()
    rows = []
    for k in clients:
        cost = sim.block_cost(k)
        rows.append(
            {
                "clients": k,
                "weights_bytes": weights_bytes,
                "flops": cost["flops"],
                **{f"compiled_{name}_bytes": int(cost[name]) for name in ("arguments", "outputs", "temporaries", "peak")},
                "temporaries_per_client_bytes": cost["temporaries"] / k,
            }
        )
    return rows


# ----------------------------------------------------------------------------- kernels


def kernels_bench(*, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Each Pallas kernel against its XLA reference.

    On a GPU or TPU both are timed (median seconds) on aggregation-sized inputs. On a CPU the
    Pallas kernels only run in interpret mode, which is an emulator and not a speed
    measurement: they are run once on small inputs, checked against the reference, not timed.
    """
    from fedprompt import kernels

    platform = jax.devices()[0].platform
    accelerated = platform in ("gpu", "tpu", "cuda", "rocm")
    interpret = not accelerated
    rng = np.random.default_rng(seed)
    k, n = (100, 409_600) if accelerated else (37, 1031)
    x = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    w = jnp.asarray(rng.uniform(1, 10, k), jnp.float32)
    mask = jnp.ones(k, bool)
    key = jax.random.key(seed)
    flat = x.reshape(-1)[: n * 20]
    q8 = kernels.quantize_reference(flat, 8)
    cases = {
        "clipped_weighted_sum": lambda impl: kernels.clipped_weighted_sum(x, w, 1.0, **impl),
        "coordinate_median": lambda impl: kernels.coordinate_median(x[: min(k, 32)], mask[: min(k, 32)], **impl),
        "trimmed_mean": lambda impl: kernels.trimmed_mean(x[: min(k, 32)], 0.1, mask[: min(k, 32)], **impl),
        "quantize_int8": lambda impl: kernels.quantize(flat, 8, key=key, **impl).q,
        "quantize_int4": lambda impl: kernels.quantize(flat, 4, key=key, **impl).q,
        "dequantize_int8": lambda impl: kernels.dequantize(q8, flat.shape, 8, **impl),
    }
    rows = []
    for name, fn in cases.items():
        pallas = {"implementation": "pallas", "interpret": interpret}
        xla = {"implementation": "xla"}
        a, b = np.asarray(fn(pallas)), np.asarray(fn(xla))
        row = {
            "kernel": name,
            "max_abs_difference": float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))),
            "timed": accelerated,
        }
        if accelerated:
            row["pallas_seconds"] = _median_seconds(lambda: jax.block_until_ready(fn(pallas)), repeats)
            row["xla_seconds"] = _median_seconds(lambda: jax.block_until_ready(fn(xla)), repeats)
            row["speedup"] = row["xla_seconds"] / row["pallas_seconds"]
        rows.append(row)
    note = None if accelerated else (
        "CPU: the Pallas kernels ran in interpret mode (an emulator), which is not a speed "
        "measurement; they were only checked against their XLA references. Time them on a GPU or TPU."
    )
    return {"machine": machine(), "shape": [k, n], "interpret": interpret, "note": note, "rows": rows}


# ----------------------------------------------------------------------------- tables


def machine_line(m: dict[str, Any]) -> str:
    load = m.get("load_average")
    load_text = f", load average {load[0]:.1f}" if load else ""
    return f"{m['cpu']} ({m['cpu_count']} CPUs, {m['machine']}), JAX {m['jax']} on {m['platform']}:{m['device_kind']}{load_text}"


def format_aggregate(result: dict[str, Any]) -> str:
    bw = result["bandwidth"]
    lines = [
        machine_line(result["machine"]),
        f"memory bandwidth (copy, read+write bytes/s): numpy {bw['numpy_copy'] / 1e9:.1f} GB/s, jax {bw['jax_add'] / 1e9:.1f} GB/s",
        "median ms per aggregation; speed-up over NumPy and effective GB/s (update bytes read / time) of kernel_mean",
        f"{'clients':>7} {'floats':>7} {'numpy':>9} {'kernel_mean':>11} {'clip+sum':>9} {'jit wmean':>10} {'Aggregation':>11} "
        f"{'speed-up':>8} {'GB/s':>6} {'% bw':>5} {'round':>9} {'% bw':>5} {'receive':>9} {'pass':>9} {'% bw':>5} "
        f"{'unnormed':>9} {'compiled':>9}",
    ]
    for r in result["rows"]:
        s, up, gbs, frac = r["seconds"], r["speedup_vs_numpy"], r["gb_per_second"], r["fraction_of_bandwidth"]
        lines.append(
            f"{r['clients']:>7} {r['floats_per_client']:>7} {s['numpy'] * 1e3:>9.2f} {s['kernel_mean'] * 1e3:>11.2f} "
            f"{s['fused_clip'] * 1e3:>9.2f} {s['jit_mean'] * 1e3:>10.2f} {s['aggregation'] * 1e3:>11.2f} "
            f"{up['kernel_mean']:>7.1f}x {gbs['kernel_mean']:>6.1f} {100 * frac['kernel_mean']:>4.0f}%"
            f" {s['server_round'] * 1e3:>9.2f} {100 * frac['server_round']:>4.0f}%"
            f" {s['receive'] * 1e3:>9.2f} {s['one_pass_mean'] * 1e3:>9.2f} {100 * frac['one_pass_mean']:>4.0f}%"
            f" {s['host_pass_unnormed'] * 1e3:>9.2f} {s['one_pass_compiled'] * 1e3:>9.2f}"
        )
    return "\n".join(lines)


def format_train(result: dict[str, Any]) -> str:
    r = result
    lines = [
        machine_line(r["machine"]),
        f"{r['method']} tuning step, batch {r['batch_size']} x {r['tokens']} tokens, {r['virtual_tokens']} virtual tokens, "
        f"{r.get('precision', 'float32')}",
        f"step FLOPs (XLA cost analysis)  {r['step_flops'] / 1e9:10.2f} GFLOP",
        f"step time (median)              {r['step_seconds'] * 1e3:10.1f} ms",
        f"achieved                        {r['achieved_flops_per_second'] / 1e9:10.1f} GFLOP/s",
        f"matmul {r['matmul_n']}x{r['matmul_n']}, best library     {r['matmul_flops_per_second'] / 1e9:10.1f} GFLOP/s "
        f"({r.get('matmul_best', 'xla')}; "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r.get("matmul_by_library", {}).items()) + ")",
        f"fraction of matmul FLOP/s       {100 * r['fraction_of_matmul_peak']:10.1f} %",
    ]
    if r["peft_step_seconds"] is None:
        lines.append("PyTorch PEFT: not measured (install the `bench` extra: torch and peft)")
    else:
        lines.append(f"PyTorch PEFT step (median)      {r['peft_step_seconds'] * 1e3:10.1f} ms  -> fedprompt takes {r['ratio_vs_peft']:.2f}x its time")
    return "\n".join(lines)


def format_block_memory(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = [
        f"block program memory (XLA memory analysis), frozen weights {rows[0]['weights_bytes'] / mib:.1f} MiB",
        f"{'clients':>7} {'arguments':>11} {'temporaries':>12} {'peak':>11} {'temps/client':>13}",
    ]
    for r in rows:
        lines.append(
            f"{r['clients']:>7} {r['compiled_arguments_bytes'] / mib:>7.1f} MiB {r['compiled_temporaries_bytes'] / mib:>8.1f} MiB "
            f"{r['compiled_peak_bytes'] / mib:>7.1f} MiB {r['temporaries_per_client_bytes'] / mib:>9.2f} MiB"
        )
    return "\n".join(lines)


def format_kernels(result: dict[str, Any]) -> str:
    lines = [machine_line(result["machine"]), f"inputs [clients, values] = {result['shape']}"]
    if result["note"]:
        lines.append(result["note"])
    for r in result["rows"]:
        if r["timed"]:
            lines.append(
                f"{r['kernel']:<22} pallas {r['pallas_seconds'] * 1e3:8.3f} ms  xla {r['xla_seconds'] * 1e3:8.3f} ms  "
                f"speed-up {r['speedup']:.2f}x  max |diff| {r['max_abs_difference']:.2e}"
            )
        else:
            lines.append(f"{r['kernel']:<22} ran (interpret), max |pallas - xla| {r['max_abs_difference']:.2e}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a step's memory, abstract backbones


ANALYSIS_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def step_memory_report(
    backbone: Backbone,
    *,
    batch_size: int = 4,
    tokens: int = 512,
    devices: int = 1,
    num_virtual_tokens: int = 20,
    task: str = "classification",
    remat: tuple[bool, ...] = (False, True),
    compiler_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile one prompt-tuning Adam step (never run it) and return XLA's per-device memory analysis.

    Works on an abstract backbone (:func:`~fedprompt.backbones.abstract.abstract_backbone`):
    every argument is a ``jax.ShapeDtypeStruct``, so nothing is allocated, and the program is
    only lowered and compiled (``jax.jit(step).lower(...).compile()``).

    Args:
      backbone: the frozen backbone (abstract or loaded).
      batch_size, tokens: the batch shape (``tokens`` real tokens per row, plus the prompt).
      devices: 1 for one device (:func:`~fedprompt.client.local.make_train_step`); N > 1 for
        the weights split over N devices (:func:`~fedprompt.sharding.make_sharded_train_step`,
        batch replicated).
      num_virtual_tokens: length of the soft prompt (float32, trained).
      task: ``"classification"`` (a 26-way linear head on the last token) or ``"lm"``
        (causal LM loss on every token: the logits over the vocabulary are computed).
      remat: the rematerialisation settings to compile, one row each.
      compiler_options: XLA options for these compilations, e.g. :data:`ANALYSIS_COMPILER_OPTIONS`
        (the programs are only analysed, never run).

    Returns:
      ``{"backbone", "parameters", "weight_bytes", "weight_bytes_per_device", "weight_dtype",
      "devices", "platform", "batch_size", "tokens", "virtual_tokens", "task",
      "cpu_memory_scheduler", "rows"}`` where ``rows``
      maps ``"remat"``/``"no_remat"`` to :func:`~fedprompt.client.local.compiled_memory`'s
      per-device bytes plus ``compile_seconds``.
    """
    from fedprompt.errors import ConfigError
    from fedprompt.sharding import CPU_MEMORY_SCHEDULER_FLAG, make_mesh, make_sharded_train_step, weight_bytes_per_device
    from fedprompt.tasks import CausalLM, Task

    for name, n in (("batch_size", batch_size), ("tokens", tokens), ("devices", devices), ("num_virtual_tokens", num_virtual_tokens)):
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    if task not in ("classification", "lm"):
        raise ConfigError(f"task must be 'classification' or 'lm', got {task!r}")
    prompt_config = PromptConfig(num_virtual_tokens=num_virtual_tokens, init="random", random_std=0.02)
    the_task: Task = SequenceClassification(26) if task == "classification" else CausalLM()
    the_task = the_task.resolve(backbone)
    optimizer = optax.adam(1e-3)
    trainable = jax.eval_shape(lambda key: init_trainable(backbone, prompt_config, the_task, key), jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    shape = (batch_size, tokens)
    batch = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32), "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}
    if task == "classification":
        batch["labels"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    else:
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.int32)
    mesh = make_mesh(model=devices) if devices > 1 else None
    rows: dict[str, dict[str, Any]] = {}
    for on in remat:
        start = time.perf_counter()
        if mesh is None:
            step = make_train_step(backbone, prompt_config, the_task, optimizer, remat=on)
            row: dict[str, Any] = compiled_memory(
                step, trainable, opt_state, batch, backbone.weights, compiler_options=compiler_options
            )
        else:
            row = make_sharded_train_step(backbone, prompt_config, the_task, optimizer, mesh, remat=on).memory(
                trainable, opt_state, batch, compiler_options=compiler_options
            )
        row["compile_seconds"] = round(time.perf_counter() - start, 1)
        rows["remat" if on else "no_remat"] = row
    return {
        "backbone": backbone.name,
        "parameters": backbone.num_parameters(),
        "weight_bytes": backbone.weight_bytes(),
        "weight_bytes_per_device": weight_bytes_per_device(backbone, mesh) if mesh is not None else backbone.weight_bytes(),
        "weight_dtype": str(jax.tree.leaves(backbone.weights)[0].dtype),
        "devices": devices,
        "platform": jax.devices()[0].platform,
        "batch_size": batch_size,
        "tokens": tokens,
        "virtual_tokens": num_virtual_tokens,
        "task": task,
        "cpu_memory_scheduler": CPU_MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""),
        "compiler_options": dict(compiler_options or {}),
        "rows": rows,
    }


def format_step_memory_report(report: dict[str, Any]) -> str:
    """A text table of :func:`step_memory_report` in GiB (per device)."""
    gib = 2**30
    where = "one device" if report["devices"] == 1 else f"{report['devices']} devices, weights split over them"
    lines = [
        f"prompt-tuning step of {report['backbone']} ({report['parameters'] / 1e9:.2f}e9 parameters, "
        f"{report['weight_dtype']} weights {report['weight_bytes'] / gib:.2f} GiB, float32 prompt), "
        f"batch {report['batch_size']} x {report['tokens']} tokens + {report['virtual_tokens']} virtual, "
        f"task {report['task']}, {where}",
        f"XLA memory analysis per device (compiled, not run) on {report['platform']}"
        + (_cpu_caption(report["devices"], report["cpu_memory_scheduler"]) if report["platform"] == "cpu" else ""),
        f"weights per device (closed form): {report['weight_bytes_per_device'] / gib:.2f} GiB"
        + (f"; compiled with {report['compiler_options']}" if report.get("compiler_options") else ""),
        f"{'':<10}{'arguments':>11}{'temporaries':>13}{'peak':>9}{'compile s':>11}  (GiB)",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"{name:<10}{row['arguments'] / gib:>11.2f}{row['temporaries'] / gib:>13.2f}{row['peak'] / gib:>9.2f}"
            f"{row['compile_seconds']:>11.1f}"
        )
    if min(row["arguments"] for row in report["rows"].values()) < report["weight_bytes_per_device"]:
        lines.append("arguments below the weights: XLA leaves out weights the step never reads "
                     "(an untied LM head in a classification step)")
    if report["platform"] == "cpu":
        lines.append(
            "note: on CPU, XLA computes bfloat16 matrix products in float32 on converted copies of the weights; "
            "without remat those copies stay alive through the step (up to 2x the weights' bytes in temporaries), "
            "which a device with bfloat16 matrix units does not need"
        )
    return "\n".join(lines)


def _cpu_caption(devices: int, memory_scheduler: bool) -> str:
    where = "" if devices == 1 else f" for {devices} forced host devices"
    schedule = "memory-minimising schedule" if memory_scheduler else "XLA's default CPU schedule"
    return f" (XLA's CPU buffer assignment{where}, {schedule})"
