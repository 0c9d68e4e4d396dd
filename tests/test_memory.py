"""Compiled memory of gradient-free client steps against inference and a gradient step."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_backbone

from fedprompt.cli import main
from fedprompt.client.memory import format_memory_report, gradient_free_memory_report


@pytest.fixture(scope="module")
def report():
    return gradient_free_memory_report(tiny_backbone("bert"), batch_size=8, max_length=32, num_labels=3,
                                       bbt_dim=16, bbt_popsize=4)


def test_gradient_free_steps_stay_near_inference_memory(report):
    inference = report["inference"]["temporaries"]
    for name in ("zo_step", "bbt_fitness", "bbt_generation"):
        # forwards one after another: no stored activations, only prompt-sized buffers on top
        assert report[name]["temporaries"] <= 1.5 * inference, (name, report)
    # Backpropagation keeps every layer's activations: at least each layer's attention weights
    # ([B, H, S, S] float32 over the 20 virtual + 32 real positions) on top of what the largest
    # gradient-free step holds.
    cfg = tiny_backbone("bert").config
    attention_weights = cfg.num_layers * 8 * cfg.num_heads * (20 + 32) ** 2 * 4
    gradient_free = max(report[n]["temporaries"] for n in report if n != "gradient_step")
    assert report["gradient_step"]["temporaries"] > gradient_free + attention_weights, report
    for row in report.values():
        assert row["peak"] >= row["arguments"] + row["temporaries"] > 0


def test_memory_table_lists_every_step(report):
    text = format_memory_report(report)
    assert all(name in text for name in report) and "MiB" in text


def test_bench_memory_rejects_an_unknown_backbone(capsys):
    assert main(["bench", "memory", "--backbone", "/no/such/model"]) == 2
    assert "error" in capsys.readouterr().err


def test_peak_rss_can_be_reset_to_measure_one_stretch_of_work():
    from fedprompt import bench

    big = np.ones(64 * 2**20, np.float32)  # 256 MiB, touched
    during = bench.peak_rss()
    assert during >= big.nbytes
    del big
    assert bench.reset_peak_rss()  # Linux, as on every machine the suite runs on
    after = bench.peak_rss()
    assert after < during - 128 * 2**20, (after, during)


def test_matmul_peak_is_the_best_library_measured():
    from fedprompt import bench

    peak = bench.matmul_flops(n=128, repeats=2)
    assert {"xla", "numpy"} <= set(peak["by_library"])  # torch too where it is installed
    assert peak["flops_per_second"] == max(peak["by_library"].values()) == peak["by_library"][peak["best"]]
    assert peak["seconds"] == pytest.approx(2 * 128**3 / peak["flops_per_second"])
    bf16 = bench.matmul_flops(n=128, repeats=2, dtype="bfloat16")
    assert bf16["dtype"] == "bfloat16" and "numpy" not in bf16["by_library"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_bench_train_runs_the_step_in_the_backbone_precision(precision, tmp_path, capsys):
    import json

    from conftest import FIXTURES

    out = tmp_path / "train.json"
    assert main(["bench", "train", "--backbone", str(FIXTURES / "bert"), "--batch-size", "2", "--tokens", "8",
                 "--virtual-tokens", "2", "--steps", "2", "--precision", precision, "--matmul-n", "256",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == precision and result["step_flops"] > 0 and result["matmul_n"] == 256
    assert result["fraction_of_matmul_peak"] == pytest.approx(
        result["step_flops"] / result["step_seconds"] / result["matmul_flops_per_second"])
    assert precision in capsys.readouterr().out
