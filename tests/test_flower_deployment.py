"""The Flower apps on a real deployment: one ``flower-superlink`` and three ``flower-supernode``
processes on 127.0.0.1 (free ports chosen at run time, ``--insecure``), shared by every test of
this module; ``examples/flower_app`` is launched with ``flwr run`` and what the ServerApp wrote
is compared with the in-process simulation (the settings and references of test_flower.py).
Every process is killed in a ``finally`` block.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_flower import (APP, NODES, _assert_close, _read_run, _reference, _replay, _settings,  # noqa: F401
                         generative_settings, instruction_files)

from fedprompt.federation.evaluation import generation_summary

from fedprompt.flower.loopback import LoopbackDeployment
from fedprompt.server import rounds
from fedprompt.simulation.engine import run_rounds
from fedprompt.wire import codec

@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    """One persistent XLA cache for every node of every test here (Flower starts a process per
    message): the test session's (conftest.py), so the nodes find what the in-process tests of
    the same settings compiled."""
    session = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(session) if session else tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, jax_cache):
    """One SuperLink and its SuperNodes on 127.0.0.1, shared by every deployed run of this module."""
    tmp = tmp_path_factory.mktemp("deployment")
    local = LoopbackDeployment(tmp, NODES, app=APP, jax_cache=jax_cache, env={"JAX_PLATFORMS": "cpu"})
    try:
        local.start()
        yield local
    finally:
        local.stop()


def _deployed_and_simulated(deployment, out, overrides, settings, *, timeout, name):
    """A deployed run's files (metrics, summary, final params, prompt) and the simulation's
    reference of the same settings (federation, engine, final state, per-round metrics)."""
    deployment.wait(deployment.run(overrides, timeout=timeout, name=name))
    assert (out / "summary.json").exists(), deployment.run_log()
    fed, sim = _reference(settings)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    return _read_run(out), (fed, sim, state, expected)


def test_deployed_zo_nodes_keep_their_state_and_are_sent_only_the_seeds_they_missed(deployment):
    """The seed downlink over real processes: each SuperNode's copy of the state lives in its
    node state between the ClientApp processes Flower starts per message; 2 of 3 clients a
    round, so nodes miss rounds and catch up. Equal to the engine, byte for byte per round."""
    out = deployment.tmp / "out-zo-seeds"
    extra = {"method": "zo", "algorithm": "fedavg", "local-steps": 4, "update-clip": 0.2, "rounds": 3,
             "clients-per-round": 2, "head-init": "class_means", "head-init-examples": 8, "zo-head": "frozen",
             "round-timeout": 120.0}
    overrides, settings = _settings(out, **extra)
    deployment.wait(deployment.run(overrides, timeout=240, name="zo-seeds"))
    assert (out / "summary.json").exists(), deployment.run_log()
    metrics, summary, params, _ = _read_run(out)
    fed, sim = _reference(settings, client_block=1)
    state, _, expected = run_rounds(sim, settings.run.rounds, fed.test_set())
    _assert_close(params, state.params, atol=1e-4)
    for got, want in zip(metrics, expected, strict=True):
        assert got["participants"] == want["participants"] and got["clients"] == 2
        assert got["bytes_down"] == want["bytes_down"] and got["bytes_up"] == want["bytes_up"]
    full = codec.encoded_size(jax.device_get({"params": state.params}), kind=rounds.GLOBAL_KIND, round=1,
                              fingerprint=fed.backbone.fingerprint)
    # chosen by bytes: never more than the state, and seeds in every round (a tiny prompt's state
    # is small, so a message of several missed rounds may still be the state)
    assert all(m["largest_down"] <= full for m in metrics)
    assert all(m["bytes_down"] < m["sampled"] * full for m in metrics)
    assert summary["zo_downlink"] == "seeds" and summary["setup"]["bytes_down"] == sim.setup_bytes()["bytes_down"]


def test_a_generative_task_deployed_over_real_processes_equals_the_simulation(deployment, instruction_files):
    """`task = "generate"` on the tiny GPT-2 (instruction rows, loss on the responses): every
    round's loss and the final prompt are the engine's, and so are the server's generations."""
    out = deployment.tmp / "out-generate"
    overrides, settings = generative_settings(out, instruction_files, **{"round-timeout": 120.0})
    (metrics, summary, params, prompt), (fed, sim, state, expected) = _deployed_and_simulated(
        deployment, out, overrides, settings, timeout=200, name="generate")
    _assert_close(params, state.params)
    for got, want in zip(metrics, expected, strict=True):
        np.testing.assert_allclose(got["eval_perplexity"], want["eval_perplexity"], rtol=1e-4)
    reference = generation_summary(settings.run, fed.plan, fed.plan.trainable(state.params), fed.test_examples)
    assert summary["generation"]["samples"] == reference["generation"]["samples"]
    assert summary["final_rouge_l"] == reference["final_rouge_l"] and prompt.task.type == "causal_lm"


# Secure aggregation and central DP deployed: test_flower_tls.py, over TLS with authenticated
# nodes (each deployed run costs a minute or more of process starts: Flower starts a ClientApp
# process per message); every method and protection runs through the apps in-process in
# test_flower.py.


def test_a_deployment_equals_the_simulation_sends_only_the_prompt_and_outlives_a_killed_supernode(deployment):
    """Round 1 with every node is the simulation's round 1 and sends one prompt-sized message
    each way per client; then a SuperNode is killed (SIGKILL) and the run completes without it,
    its final state the simulation of exactly the clients that took part."""
    # A round waits at most 40 s for a client; a cold round (compiling) takes ~15-30 s on 2 busy cores.
    out = deployment.tmp / "out-killed"
    overrides, settings = _settings(out, rounds=2, **{"round-timeout": 40.0})
    metrics_file = out / "metrics.jsonl"
    try:
        run = deployment.run(overrides, timeout=170, name="killed")
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 1):
            assert run.poll() is None and time.monotonic() < deployment.deadline, deployment.run_log()
            time.sleep(0.2)
        deployment.kill(f"supernode-{NODES - 1}")  # SIGKILL, after round 1
        deployment.wait(run)
        assert (out / "summary.json").exists(), deployment.run_log()
    finally:
        deployment.start_node(NODES - 1)  # the next test finds every node again
    metrics, summary, params, prompt = _read_run(out)
    assert len(metrics) == settings.run.rounds
    fed, sim = _reference(settings)
    _, _, expected = run_rounds(sim, 1, fed.test_set())
    first, want = metrics[0], expected[0]
    assert first["clients"] == NODES and first["participants"] == list(range(NODES))
    assert first["bytes_up"] == want["bytes_up"] and first["bytes_down"] == want["bytes_down"]
    np.testing.assert_allclose(first["train_loss"], want["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(first["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    for m in metrics[1:]:  # dead from round 2 on
        assert NODES - 1 not in m["participants"] and 1 <= m["clients"] <= NODES - 1
        assert m["dropped"] >= 1 and m["timeouts"] + m["errors"] + m["unreachable"] >= 1
        assert m["bytes_up"] < NODES * first["bytes_up"] / first["clients"]

    # The dead client is simply missing: the others' weights renormalize. Same result in-process.
    state = _replay(fed, sim, metrics, settings)
    _assert_close(params, state.params)
    assert np.isfinite(summary["final_accuracy"])
    assert summary["runtime"] == "flower" and prompt.backbone.fingerprint == summary["backbone"]["fingerprint"]
    _assert_close(prompt.params, state.params["prompt"], atol=1e-2)  # prompt.fpp may store float16

    # What crossed in round 1 is the prompt: per client, one encoded prompt-sized message each way.
    encoded = codec.encode(jax.device_get({"params": state.params}), kind=rounds.GLOBAL_KIND, round=0,
                           fingerprint=fed.backbone.fingerprint)
    prompt_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params))
    assert first["bytes_down"] == len(encoded) * NODES
    assert prompt_bytes * NODES <= first["bytes_up"] <= (prompt_bytes + 400) * NODES
    # Flower's own envelope (records, metadata) adds a fixed ~1 KB per message.
    assert first["bytes_up"] < first["wire_bytes_up"] <= first["bytes_up"] + 2048 * NODES
    assert first["bytes_down"] < first["wire_bytes_down"] <= first["bytes_down"] + 2048 * NODES
    assert (first["wire_bytes_up"] + first["wire_bytes_down"]) / NODES < fed.backbone.weight_bytes() / 20
