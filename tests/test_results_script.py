"""examples/results/reproduce.py: the README's measured tables are exactly what their JSON
renders, a changed number changes its table, and a quick run records the run's own numbers."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import FIXTURES, with_word_tokenizer

import fedprompt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
README = ROOT / "README.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", RESULTS / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


reproduce = _load_script()


def test_the_readme_tables_are_what_their_json_renders(capsys):
    text = README.read_text()
    marked = re.findall(r"<!-- results:([a-z0-9_]+) -->", text)
    assert sorted(marked) == sorted(reproduce.EXPERIMENTS)  # every experiment's table is marked, once
    new, changed = reproduce.render_readme(text)
    assert changed == [] and new == text
    assert reproduce.main(["render", "--check"]) == 0
    assert capsys.readouterr().out == ""


def test_a_changed_number_changes_its_table_and_fails_the_check(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.py", "*.png", "__pycache__"))
    document = json.loads((results / "default_sweep.json").read_text())
    old = document["rows"][0]["final_accuracy"]
    document["rows"][0]["final_accuracy"] = 0.5
    (results / "default_sweep.json").write_text(json.dumps(document))
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())

    new, changed = reproduce.render_readme(readme.read_text(), results)
    assert changed == ["default_sweep"]
    row = "| Adam (lr 0.01) | 4 steps x 30 rounds | FedAdam, lr 0.03 | 20 tokens |"
    assert f"{row} {old:.3f} |" in readme.read_text()
    assert f"{row} 0.500 |" in new
    assert reproduce.main(["render", "--check", "--results", str(results), "--readme", str(readme)]) == 1
    assert "default_sweep" in capsys.readouterr().out
    assert reproduce.main(["render", "--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == new
    # only the table (between its markers) changed
    outside = re.compile(r"<!-- results:default_sweep -->.*<!-- /results:default_sweep -->", re.S)
    assert outside.sub("", new) == outside.sub("", README.read_text())
    assert reproduce.main(["render", "--check", "--results", str(results), "--readme", str(readme)]) == 0


def test_render_refuses_a_missing_json_and_quick_refuses_the_kept_results(tmp_path, capsys):
    with pytest.raises(reproduce.ResultsError, match=r"default_task.json is missing: run `python examples/results/reproduce.py run default_task`"):
        reproduce.render_readme(README.read_text(), tmp_path)
    assert reproduce.main(["run", "memory", "--quick"]) == 2
    assert "--quick writes only into a folder given with --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fmt, x, expected",
    [
        ("decimal_bytes", 254, "254 B"),
        ("decimal_bytes", 71_040, "71.0 KB"),
        ("decimal_bytes", 8_524_800, "8.52 MB"),
        ("decimal_bytes", 98_240_000, "98.2 MB"),
        ("duration", 2.2e-5, "0.02 ms"),
        ("duration", 0.0203, "20.3 ms"),
        ("duration", 0.2049, "205 ms"),
        ("duration", 1.2, "1.20 s"),
        ("gib", 106 * 2**30, "106 GiB"),
        ("significant", 99.96, "100"),
    ],
)
def test_cell_formats(fmt, x, expected):
    assert getattr(reproduce, fmt)(x) == expected


def test_a_quick_run_records_the_numbers_of_the_run(tmp_path):
    """One row of the default-task sweep, shrunk by --quick, on the tiny BERT: the JSON row holds
    what the seeded run gives again when rerun through the Python API with the row's config."""
    backbone = with_word_tokenizer(FIXTURES / "bert", tmp_path / "bert")
    table = reproduce.EXPERIMENTS["default_sweep"]
    one_row = dataclasses.replace(table, rows=table.rows[:1])  # local Adam, 4 steps x 30 rounds
    lines: list[str] = []
    path = reproduce.write_result(reproduce.run_experiment(one_row, quick=True, backbone=str(backbone),
                                                           log=lines.append), tmp_path / "out")
    document = json.loads(path.read_text())

    assert path.name == "default_sweep.json"
    assert document["fedprompt"] == fedprompt.__version__
    assert {"cpu", "cpu_count", "jax", "load_average", "load_average_end"} <= set(document["machine"])
    assert document["command"] == f"python examples/results/reproduce.py run default_sweep --quick --backbone {backbone}"
    assert document["measured"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert [re.sub(r"[\d.]+ s$", "N s", line) for line in lines] == [
        "[default_sweep 1/1] Adam (lr 0.01) | 4 steps x 30 rounds | FedAdam, lr 0.03 | 20 tokens: started",
        "[default_sweep 1/1] Adam (lr 0.01) | 4 steps x 30 rounds | FedAdam, lr 0.03 | 20 tokens: done in N s",
    ]
    (row,) = document["rows"]
    config = row["config"]
    assert (config["algorithm"], config["server_lr"], config["local_optimizer"], config["local_steps"]) == (
        "fedadam", 0.03, "adam", 4)
    assert (config["rounds"], config["train_examples"], config["eval_examples"]) == (1, 512, 64)
    assert 1 <= config["clients_per_round"] <= config["clients"]

    again = fedprompt.simulate(fedprompt.RunConfig(**config))
    assert row["final_accuracy"] == again.summary["final_accuracy"]
    assert row["total_bytes_up"] == again.summary["total_bytes_up"] > 0
    assert row["total_bytes"] == again.summary["total_bytes_up"] + again.summary["total_bytes_down"]
    reports = sum(m["clients"] for m in again.metrics)
    assert row["bytes_up_per_client_round"] == again.summary["total_bytes_up"] / reports

    block = reproduce.render_block(one_row, document)
    assert f"| Adam (lr 0.01) | 4 steps x 30 rounds | FedAdam, lr 0.03 | 20 tokens | {row['final_accuracy']:.3f} |" in block
    assert f"_Measured with fedprompt {fedprompt.__version__}, " in block and "`--quick` run" in block


def test_deployment_rows_are_summarised_per_client_and_round():
    """The protections table's numbers from a deployed run's metrics: bytes per client (updates
    over the clients that sent one, downloads and protocol bytes over the sampled ones) and the
    median of the rounds after the first, which compiles."""
    metrics = [
        {"round": 1, "clients": 3, "sampled": 3, "bytes_up": 300, "bytes_down": 600, "secagg_bytes": 90,
         "wire_bytes_up": 3300, "seconds": 40.0, "epsilon": 0.5},
        {"round": 2, "clients": 2, "sampled": 3, "bytes_up": 200, "bytes_down": 600, "secagg_bytes": 60,
         "wire_bytes_up": 2200, "seconds": 10.0, "epsilon": 0.8},
        {"round": 3, "clients": 3, "sampled": 3, "bytes_up": 300, "bytes_down": 600, "secagg_bytes": 90,
         "wire_bytes_up": 3300, "seconds": 14.0, "epsilon": 1.0},
        {"round": 4, "clients": 3, "sampled": 3, "bytes_up": 300, "bytes_down": 600, "secagg_bytes": 90,
         "wire_bytes_up": 3300, "seconds": 12.0, "epsilon": 1.2},
    ]
    numbers = reproduce.deployment_numbers(metrics, {"final_accuracy": 0.5, "wall_seconds": 99.0})
    assert numbers["bytes_up_per_client"] == 100 and numbers["bytes_down_per_client"] == 200
    assert numbers["secagg_bytes_per_client"] == (90 + 60 + 90 + 90) / 3 / 4
    assert numbers["wire_bytes_up_per_client"] == 1100
    assert numbers["seconds_per_round"] == 12.0 and numbers["first_round_seconds"] == 40.0
    assert numbers["epsilon"] == 1.2 and numbers["clients_per_round"] == 2.75
    assert reproduce.deployment_numbers(metrics[:3], {})["seconds_per_round"] == 12.0  # the mean of the middle two
    with pytest.raises(reproduce.ResultsError, match="no round"):
        reproduce.deployment_numbers([], {})
    # every setting of a deployment row but the deployment's own is a run-config key of the app
    app = reproduce.APP / "pyproject.toml"
    keys = set(tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"])
    experiment = reproduce.EXPERIMENTS["protections"]
    for row in experiment.rows:
        config = reproduce.row_config(experiment, row)
        run_keys = {k.replace("_", "-") for k in config if k not in reproduce.DEPLOYMENT_KEYS}
        assert run_keys <= keys, run_keys - keys


def test_rows_measured_apart_merge_into_one_table_and_seeds_are_averaged(tmp_path, monkeypatch):
    """--rows: rows measured in separate runs join the kept JSON in the table's order, a kept row
    whose settings changed is dropped, and the caption says the rows come from several runs; a
    row with seeds holds the means over its seeds and each seed's numbers."""
    calls: list[dict] = []

    def measure(config, context):
        calls.append(dict(config))
        return {"final_accuracy": config["x"] / 10 + config.get("seed", 0) / 100, "rounds": 3}

    monkeypatch.setitem(reproduce.KINDS, "counted", reproduce.Kind(measure, lambda c: c))
    table = reproduce.Experiment(
        "counted_table", "counted", {"x": 1},
        rows=(reproduce.run_row({"name": "a"}), reproduce.run_row({"name": "b"}, x=2),
              reproduce.run_row({"name": "c"}, x=3, seeds=[0, 1, 2])),
        columns=(reproduce.text("name"), reproduce.value("accuracy", "final_accuracy", reproduce.accuracy)))
    monkeypatch.setitem(reproduce.EXPERIMENTS, "counted_table", table)
    out = tmp_path / "results"

    path = reproduce.write_result(reproduce.run_experiment(table, only=[2], log=lambda line: None), out, merge=True)
    assert [r["label"]["name"] for r in json.loads(path.read_text())["rows"]] == ["b"]
    reproduce.write_result(reproduce.run_experiment(table, only=[3, 1], log=lambda line: None), out, merge=True)
    document = json.loads(path.read_text())
    assert [r["label"]["name"] for r in document["rows"]] == ["a", "b", "c"]
    assert [r["final_accuracy"] for r in document["rows"][:2]] == [0.1, 0.2]
    seeded = document["rows"][2]
    assert [s["seed"] for s in seeded["by_seed"]] == [0, 1, 2]
    assert [s["final_accuracy"] for s in seeded["by_seed"]] == [0.3, 0.31, 0.32]
    assert seeded["final_accuracy"] == pytest.approx(0.31) and seeded["rounds"] == 3
    assert [c.get("seed") for c in calls] == [None, 0, 1, 2, None] and "seeds" not in calls[1]
    assert all(r["measured"] and "load_average" in r for r in document["rows"])
    block = reproduce.render_block(table, document)
    assert "| c | 0.310 |" in block and "rows in separate runs" in block and "[--rows N,...]" in block

    changed = dataclasses.replace(table, rows=(table.rows[0], reproduce.run_row({"name": "b"}, x=5), table.rows[2]))
    monkeypatch.setitem(reproduce.EXPERIMENTS, "counted_table", changed)
    reproduce.write_result(reproduce.run_experiment(changed, only=[1], log=lambda line: None), out, merge=True)
    assert [r["label"]["name"] for r in json.loads(path.read_text())["rows"]] == ["a", "c"]  # b measured x=2
    assert reproduce.main(["run", "counted_table", "--rows", "2", "--out", str(out)]) == 0  # the command line
    assert [r["final_accuracy"] for r in json.loads(path.read_text())["rows"]] == [0.1, 0.5, pytest.approx(0.31)]

    with pytest.raises(reproduce.ResultsError, match=r"counted_table has rows 1-3, not \[4\]"):
        reproduce.run_experiment(changed, only=[4])
    with pytest.raises(SystemExit):
        reproduce.main(["run", "memory", "--rows", "two"])
    assert reproduce.main(["run", "memory", "train_step", "--rows", "1", "--out", str(out)]) == 2


def test_seeds_of_one_row_measured_apart_gather_into_its_mean(tmp_path, monkeypatch):
    """--rows 1 --seeds S: each run measures some seeds of a seeded row; merged, the row holds
    every seed measured so far (a row measured before it had seeds counts as its seed), their
    mean, and config["seeds"] naming them; a seed measured again replaces its earlier run."""
    calls: list[int] = []

    def measure(config, context):
        calls.append(config["seed"])
        return {"final_accuracy": config["x"] / 10 + config["seed"] / 100 + len(calls) / 1000}

    monkeypatch.setitem(reproduce.KINDS, "counted", reproduce.Kind(measure, lambda c: c))
    one_seed = reproduce.Experiment(
        "seeded_table", "counted", {"x": 1, "seed": 0, "eval_every": 10},
        rows=(reproduce.run_row({"name": "a"}),),
        columns=(reproduce.text("name"), reproduce.seeded("accuracy", "final_accuracy")))
    monkeypatch.setitem(reproduce.EXPERIMENTS, "seeded_table", one_seed)
    out = tmp_path / "results"
    path = reproduce.write_result(reproduce.run_experiment(one_seed, only=[1], log=lambda line: None), out, merge=True)

    three = dataclasses.replace(one_seed, settings={"x": 1, "seed": 0, "eval_every": 20},
                                rows=(reproduce.run_row({"name": "a"}, seeds=[0, 1, 2]),))
    monkeypatch.setitem(reproduce.EXPERIMENTS, "seeded_table", three)
    assert reproduce.main(["run", "seeded_table", "--rows", "1", "--seeds", "2", "--out", str(out)]) == 0
    row = json.loads(path.read_text())["rows"][0]
    assert row["config"]["seeds"] == [0, 2] and [s["seed"] for s in row["by_seed"]] == [0, 2]
    assert row["final_accuracy"] == pytest.approx((0.101 + 0.122) / 2)
    assert reproduce.main(["run", "seeded_table", "--rows", "1", "--seeds", "1,2", "--out", str(out)]) == 0
    row = json.loads(path.read_text())["rows"][0]
    assert calls == [0, 2, 1, 2] and row["config"]["seeds"] == [0, 1, 2]
    assert [s["final_accuracy"] for s in row["by_seed"]] == pytest.approx([0.101, 0.113, 0.124])
    assert "| a | 0.113 (0.101, 0.113, 0.124) |" in reproduce.render_block(three, json.loads(path.read_text()))

    other = dataclasses.replace(three, settings={"x": 2, "seed": 0, "eval_every": 20})  # other settings: not its seeds
    monkeypatch.setitem(reproduce.EXPERIMENTS, "seeded_table", other)
    assert reproduce.main(["run", "seeded_table", "--rows", "1", "--seeds", "1", "--out", str(out)]) == 0
    assert json.loads(path.read_text())["rows"][0]["config"]["seeds"] == [1]
    assert reproduce.main(["run", "seeded_table", "--rows", "1", "--seeds", "7", "--out", str(out)]) == 2
    assert reproduce.main(["run", "seeded_table", "--seeds", "1", "--out", str(out)]) == 2


def test_the_generative_table_shows_a_run_and_its_baselines_as_rows():
    """The generative table's rows from its runs: the first run's untuned, centralized, federated
    and local-only scores as rows of their own, each seed's value beside the mean, and the
    federated rows' differences to the first run's baselines."""
    experiment = reproduce.EXPERIMENTS["generative_task"]

    def run(method, final, **baselines):
        seeds = [{"final_exact_match": final - 0.01, "final_rouge_l": final - 0.01,
                  **{k: v - 0.01 for k, v in baselines.items()}},
                 {"final_exact_match": final + 0.01, "final_rouge_l": final + 0.01,
                  **{k: v + 0.01 for k, v in baselines.items()}}]
        return {"label": {"method": method}, "final_exact_match": final, "final_rouge_l": final,
                "total_bytes": 1000, **baselines, "by_seed": seeds}

    rows = [run("soft prompt", 0.25, untuned_exact_match=0.0, untuned_rouge_l=0.02, centralized_exact_match=0.27,
                centralized_rouge_l=0.27, local_only_exact_match=0.12, local_only_rouge_l=0.12),
            run("prefix", 0.20)]
    header, *body = reproduce.table_lines(experiment, rows)
    assert [line[0].split(" ")[0] for line in body] == ["untuned", "centralized", "federated", "federated", "local-only"]
    cells = {line[0].split(" ")[0] + (" " + line[0].split(" ")[-1] if "prefix" in line[0] else ""): dict(zip(header, line))
             for line in body}
    assert cells["untuned"]["ROUGE-L"] == "0.020 (0.010, 0.030)"
    assert cells["federated"]["ROUGE-L"] == "**0.250 (0.240, 0.260)**"  # the soft prompt's, in bold
    assert cells["federated"]["ROUGE-L - local-only (points)"] == "+13.0"
    assert cells["federated"]["ROUGE-L - centralized (points)"] == "-2.0"
    prefix = next(line for line in body if "prefix" in line[0])
    assert dict(zip(header, prefix))["ROUGE-L - local-only (points)"] == "+8.0"
    assert cells["local-only"]["ROUGE-L - local-only (points)"] == ""  # baselines get no difference
