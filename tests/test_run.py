"""RunConfig (TOML + overrides + validation) and the `fedprompt run` main job."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FIXTURES, with_word_tokenizer

from fedprompt.cli import main
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError


def test_toml_then_flags_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[federation]\nrounds = 7\nalgorithm = "fedadam"\n[prompt]\nmethod = "prefix"\nseed = 3\n')
    cfg = RunConfig.from_sources(toml, {"rounds": 2, "seed": None})
    assert (cfg.rounds, cfg.algorithm, cfg.method, cfg.seed, cfg.clients) == (2, "fedadam", "prefix", 3, 16)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": 2.5}, "rounds must be int"),
        ({"clients": 4, "clients_per_round": 5}, "exceeds"),
        ({"method": "lora"}, "method"),
        ({"algorithm": "fedsgd"}, "algorithm"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"roundz": 3}, "did you mean 'rounds'"),
        ({"data": "/no/such/file.jsonl"}, "does not exist"),
        ({"algorithm": "scaffold", "local_optimizer": "adam"}, "SGD"),
        ({"baselines": "yes"}, "baselines must be bool"),
        ({"compress": "int2"}, "compress must be one of"),
        ({"error_feedback": True}, "error_feedback needs compress"),
        ({"compress": "int8", "method": "zo"}, "gradient methods"),
        ({"compress": "int8", "dp": "central", "dp_noise_multiplier": 1.0}, "cannot be combined with dp"),
        ({"compress": "int4", "algorithm": "scaffold", "local_optimizer": "sgd"}, "scaffold"),
        ({"devices": -1}, "devices must be >= 1"),
        ({"parallel_backend": "xmap"}, "parallel_backend"),
        ({"tpt_views": 0}, "tpt_views"),
        ({"tpt_alpha": 0.0}, "tpt_alpha"),
        ({"secagg": True, "clients_per_round": 8, "secagg_threshold": 4}, "exceed half"),
    ],
)
def test_bad_config_values_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_sources(overrides=values)


def test_bad_toml_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig.from_sources(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_sources(tmp_path / "missing.toml")


def test_cli_refuses_a_bad_value_before_any_work(capsys):
    start = time.perf_counter()
    assert main(["run", "--rounds", "0"]) == 2
    assert "rounds must be >= 1" in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_cli_run_writes_all_four_files_on_user_data(tmp_path):
    """The main job end to end on a small JSONL file with string labels (the tiny BERT with a
    word-level tokenizer: the MiniLM run is the README's, and tests/test_training.py's)."""
    rng = np.random.default_rng(0)
    words = {"animal": [f"w{i}" for i in range(3, 30)], "tool": [f"w{i}" for i in range(30, 60)]}
    rows = [{"text": " ".join(rng.choice(words[k], 4)) + " w99", "label": k} for k in words for _ in range(30)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    backbone = with_word_tokenizer(FIXTURES / "bert", tmp_path / "bert")
    args = ["run", "--data", str(data), "--backbone", str(backbone), "--rounds", "2", "--clients", "4",
            "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "8", "--max-length", "12",
            "--virtual-tokens", "4", "--out", str(out), "--no-progress", "--tpt", "--tpt-test-clients", "3"]
    cmd = [sys.executable, "-m", "fedprompt.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    written = {p.name for p in out.iterdir()}
    assert {"curves.png", "metrics.jsonl", "prompt.fpp", "summary.json", "checkpoint.msgpack", "checkpoint.prev.msgpack",
            "config.json"} == written
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["clients"] == 2 and m["bytes_up"] > 0 and m["bytes_down"] > 0
        assert {"train_loss", "eval_loss", "seconds"} <= set(m)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == lines[-1]["eval_accuracy"]
    assert summary["total_bytes_up"] == sum(m["bytes_up"] for m in lines)
    assert summary["config"]["data"] == str(data) and summary["test_examples"] == 12  # 20% of 60
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --tpt: test-time tuning of the trained prompt over 3 label-skewed test clients
    tpt = summary["tpt"]
    assert tpt["examples"] == 12 and tpt["test_clients"] == 3 and tpt["entropy_after"] < tpt["entropy_before"]
    assert "test-time tuning on 3 label-shifted test clients" in done.stdout
    from fedprompt.wire.artifact import load_prompt

    artifact = load_prompt(out / "prompt.fpp")
    assert artifact.params["embeddings"].shape == (4, 32) and artifact.label_names == ("animal", "tool")


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL mid-way and resumed ends with the same prompt and metrics (on the
    tiny BERT with a word-level tokenizer: three processes, each compiling its rounds)."""
    import os
    import signal

    from fedprompt.wire.artifact import load_prompt

    backbone = with_word_tokenizer(FIXTURES / "bert", tmp_path / "bert")
    common = ["--backbone", str(backbone), "--rounds", "6", "--clients", "4", "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "8",
              "--max-length", "12", "--virtual-tokens", "4", "--train-examples", "200", "--eval-examples", "48",
              "--algorithm", "fedadam", "--dropout", "0.2", "--no-progress"]
    base = [sys.executable, "-m", "fedprompt.cli", "run", *common]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run([*base, "--out", str(whole)], capture_output=True, timeout=600).returncode == 0

    proc = subprocess.Popen([*base, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    done = subprocess.run([sys.executable, "-m", "fedprompt.cli", "run", "--resume", str(killed), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    def rounds(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert rounds(killed) == rounds(whole)
    a = load_prompt(whole / "prompt.fpp").trainable()
    b = load_prompt(killed / "prompt.fpp").trainable()
    for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_ctrl_c_during_a_run_stops_after_the_round_is_saved():
    """The first SIGINT after a saved round is deferred to the next saved round; a second one,
    or one before any round was saved, stops at once; Python's handler is back afterwards."""
    import os
    import signal

    from fedprompt.simulation.run import StopAfterRound

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner may have its own
    try:
        _deferred_ctrl_c(StopAfterRound)
    finally:
        signal.signal(signal.SIGINT, outer)


def _deferred_ctrl_c(StopAfterRound):
    import os
    import signal

    notes = []
    with pytest.raises(KeyboardInterrupt), StopAfterRound(notes.append):
        os.kill(os.getpid(), signal.SIGINT)  # before any round is saved: at once
        time.sleep(1)
    assert notes == []
    with StopAfterRound(notes.append) as stop:
        stop.round_saved(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs; the run goes on
        assert stop.requested and notes == ["interrupted: stopping once this round is saved (Ctrl-C again to stop now)"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
            time.sleep(1)
        with pytest.raises(KeyboardInterrupt):
            stop.round_saved(2)  # the round under way is saved: stop here
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_baselines_train_with_adam_whatever_the_clients_use(tmp_path):
    """The centralized and local-only baselines are the same whether the federation's clients
    take Adam or SGD steps (they train with Adam at the clients' Adam rate, or Adam's default
    beside SGD clients), and they see the federation's budget of steps and examples."""
    import fedprompt
    from fedprompt.federation.plan import make_baseline_optimizer

    backbone = with_word_tokenizer(FIXTURES / "bert", tmp_path / "bert")
    common = {"backbone": str(backbone), "rounds": 1, "clients": 4, "clients_per_round": 2, "local_steps": 2,
              "batch_size": 8, "max_length": 12, "num_virtual_tokens": 4, "train_examples": 160,
              "eval_examples": 48, "baselines": True}
    adam = fedprompt.simulate(RunConfig(**common, local_optimizer="adam", local_lr=0.01)).summary
    sgd = fedprompt.simulate(RunConfig(**common, local_optimizer="sgd", local_lr=0.5)).summary
    assert adam["final_accuracy"] != sgd["final_accuracy"] or adam["final_eval_loss"] != sgd["final_eval_loss"]
    assert adam["baselines"] == sgd["baselines"]
    b = adam["baselines"]
    assert (b["centralized_steps"], b["centralized_batch_size"], b["local_only_steps"]) == (2, 16, 1)
    assert len(b["local_only_accuracies"]) == 4 and all(0 <= a <= 1 for a in b["local_only_accuracies"])
    # the Adam the baselines take: the clients' rate when they use Adam, Adam's default beside SGD
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    for config, lr in ((RunConfig(local_optimizer="adam", local_lr=0.003), 0.003), (RunConfig(local_optimizer="sgd"), 0.01)):
        optimizer = make_baseline_optimizer(config)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        np.testing.assert_allclose(updates["w"], -lr * np.sign(grads["w"]), rtol=1e-4)  # Adam's first step
