"""`fedprompt run --task generate`: instruction data, the response-only loss, generations scored by
exact match and ROUGE-L, every method, and `fedprompt apply` with the trained prompt.

The backbone is the tiny GPT-2 fixture with a word-level tokenizer ("w3".."w99"); the data is a
seeded instruction set whose response depends on the prompt's first word (its group).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import FIXTURES, with_word_tokenizer
from rouge_score import rouge_scorer

from fedprompt.backbones.loading import load_backbone
from fedprompt.cli import main
from fedprompt.config import RunConfig
from fedprompt.data import instructions
from fedprompt.data.loading import encode_dataset, load_data, select_examples
from fedprompt.errors import ConfigError, DataError
from fedprompt.federation.evaluation import evaluate_generation, normalize_answer
from fedprompt.federation.plan import make_plan
from fedprompt.prompts import materialize
from fedprompt.simulation.run import run, simulate

RESPONSES = {"a": "w7 w8", "b": "w9"}


def _rows(rng, n):
    rows = []
    for _ in range(n):
        group = "a" if rng.random() < 0.5 else "b"
        words = " ".join(f"w{int(x)}" for x in rng.integers(10, 99, size=int(rng.integers(2, 6))))
        rows.append({"prompt": f"w{3 if group == 'a' else 4} {words}", "response": RESPONSES[group],
                     "category": group})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    rng = np.random.default_rng(0)
    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, 240)))
    test.write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, 40)))
    return {"backbone": with_word_tokenizer(FIXTURES / "gpt2", root / "gpt2"), "train": train, "test": test,
            "root": root}


def _config(files, **extra) -> RunConfig:
    values = dict(backbone=str(files["backbone"]), task="generate", data=str(files["train"]),
                  test_data=str(files["test"]), label_key="category", rounds=12, clients=4, clients_per_round=2,
                  local_steps=8, batch_size=8, max_length=12, num_virtual_tokens=8, eval_examples=40,
                  generate_examples=5, max_new_tokens=4, algorithm="fedavg", local_optimizer="adam", local_lr=0.3,
                  out=str(files["root"] / "run"))
    return RunConfig(**{**values, **extra})


def _reference_loss(backbone, prompt_config, trainable, rows) -> float:
    """The mean cross-entropy of the response tokens, from the backbone's logits in NumPy."""
    prompt = materialize(prompt_config, trainable["prompt"], backbone.config)
    out = backbone.forward(rows["input_ids"], rows["attention_mask"], prompt)
    p = out.num_virtual
    logits = np.asarray(out.logits[:, p:-1], np.float64)
    targets = rows["input_ids"][:, 1:]
    mask = (rows["loss_mask"][:, 1:] * rows["attention_mask"][:, 1:]).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float(-(picked * mask).sum() / mask.sum())


def test_instruction_rows_put_the_loss_on_the_response_and_its_end_token(files):
    backbone = load_backbone(files["backbone"])
    tok = backbone.tokenizer
    ds = instructions.from_records([{"prompt": "w3 w11 w12", "response": "w7 w8"},
                                    {"prompt": " ".join(f"w{i}" for i in range(10, 30)), "response": "w9 w9 w9"}])
    rows = instructions.encode_instructions(backbone, ds, 10)
    head = tok("w3 w11 w12\n")["input_ids"]
    tail = tok("w7 w8", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(rows["input_ids"][0, : len(head) + len(tail)], head + tail)
    np.testing.assert_array_equal(rows["loss_mask"][0], [0] * len(head) + [1] * len(tail) + [0] * (10 - len(head) - len(tail)))
    # a prompt too long keeps its end and the whole response
    long_tail = tok("w9 w9 w9", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(rows["input_ids"][1], list(range(10, 30))[-(10 - len(long_tail)):] + long_tail)
    assert rows["loss_mask"][1].tolist() == [0] * (10 - len(long_tail)) + [1] * len(long_tail)
    assert rows["attention_mask"][1].all()
    # a chat template lays the prompt out, in training and for generation alike
    tok.chat_template = "{% for m in messages %}w5 {{ m['content'] }} w6{% endfor %}"
    try:
        assert instructions.format_prompt(backbone, "w11 w12") == tok("w5 w11 w12 w6")["input_ids"]
        assert instructions.encode_instructions(backbone, ds, 10)["input_ids"][0, :5].tolist() == [5, 3, 11, 12, 6]
    finally:
        tok.chat_template = None


def test_instruction_files_of_every_format_and_their_errors(files, tmp_path):
    import datasets as hf_datasets

    rows = [{"prompt": "w3 w10", "response": "w7", "category": "a"}, {"prompt": "w4 w11", "response": "w9", "category": "b"}]
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_list(rows),
                             "test": hf_datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "hf"))
    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.csv").write_text("prompt,response,category\nw3 w10,w7,a\nw4 w11,w9,b\n")
    for source in ("hf", "rows.parquet", "rows.csv"):
        ds = instructions.load_instruction_file(tmp_path / source, label_key="category")
        assert ds.texts == ("w3 w10", "w4 w11") and ds.responses == ("w7", "w9") and ds.label_names == ("a", "b")
    # a DatasetDict folder as --data gives its train and test splits
    train, test = load_data(_config(files, data=str(tmp_path / "hf"), test_data=None))
    assert len(train) == 2 and test.texts == ("w3 w10",)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "w3", "response": null}\n')
    with pytest.raises(DataError, match="'response' is null"):
        instructions.load_instruction_file(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="missing key 'answer'"):
        instructions.load_instruction_file(tmp_path / "rows.csv", response_key="answer")


def test_a_generative_run_learns_and_its_figures_match_their_references(files, capsys):
    config = _config(files)
    result = run(config, progress=False)
    summary, plan = result.summary, result.plan
    train, test = select_examples(config, *load_data(config))
    rows = encode_dataset(plan.backbone, test, config.max_length, config.num_virtual_tokens)
    # the eval loss is the response tokens' cross-entropy (one batch of 40), perplexity its exp
    last = result.metrics[-1]
    np.testing.assert_allclose(last["eval_loss"], _reference_loss(plan.backbone, plan.prompt_config,
                                                                  result.trainable, rows), rtol=1e-4)
    np.testing.assert_allclose(last["eval_perplexity"], np.exp(last["eval_loss"]), rtol=1e-6)
    untuned = _reference_loss(plan.backbone, plan.prompt_config, plan.trainable(plan.init_params()), rows)
    assert last["eval_loss"] < untuned - 1.0, (untuned, last["eval_loss"])
    # the scores are those of the generations, by rouge-score and normalized exact match
    generation = summary["generation"]
    samples = generation["samples"]
    assert len(samples) == generation["examples"] == 5
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want_rouge = np.mean([scorer.score(s["reference"], s["generated"])["rougeL"].fmeasure for s in samples])
    want_exact = np.mean([s["generated"].strip().lower() == s["reference"] for s in samples])
    np.testing.assert_allclose(summary["final_rouge_l"], want_rouge, rtol=1e-6)
    assert summary["final_exact_match"] == pytest.approx(want_exact)
    # the scored rows spread evenly over the test set, first and last included
    spread = np.linspace(0, len(test) - 1, 5).round().astype(int)
    assert [s["reference"] for s in samples] == [test.responses[i] for i in spread]
    assert [s["prompt"] for s in samples] == [test.texts[i] for i in spread]
    start = evaluate_generation(config, plan, plan.trainable(plan.init_params()), test)
    assert generation["untuned"] == {"exact_match": start["exact_match"], "rouge_l": start["rouge_l"]}
    # `fedprompt apply` with the run's prompt writes the same responses (the prompt laid out as in training)
    capsys.readouterr()
    code = main(["apply", str(files["root"] / "run" / "prompt.fpp"), "--backbone", str(files["backbone"]),
                 "--max-new-tokens", "4", "--json", *[a for s in samples for a in ("--text", s["prompt"])]])
    applied = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [normalize_answer(a["generated"]) for a in applied] == [normalize_answer(s["generated"]) for s in samples]


@pytest.mark.parametrize("method", ["prefix", "zo", "bbt"])
def test_every_method_trains_on_the_responses(files, method):
    extra = {"prefix": dict(rounds=8), "zo": dict(rounds=6, local_lr=0.01, zo_seeds=64),
             "bbt": dict(rounds=4, local_steps=3, bbt_dim=16, local_lr=None)}[method]
    config = _config(files, method=method, generate_examples=2, **extra)
    result = simulate(config)
    plan = result.plan
    test = select_examples(config, *load_data(config))[1]
    rows = encode_dataset(plan.backbone, test, config.max_length, config.num_virtual_tokens)
    final = result.metrics[-1]["eval_loss"]
    np.testing.assert_allclose(final, _reference_loss(plan.backbone, plan.prompt_config, result.trainable, rows),
                               rtol=1e-4)
    untuned = _reference_loss(plan.backbone, plan.prompt_config, plan.trainable(plan.init_params()), rows)
    assert final < untuned, (method, untuned, final)
    assert len(result.summary["generation"]["samples"]) == 2


def test_generate_is_refused_where_it_cannot_run(files, tmp_path):
    with pytest.raises(ConfigError, match="needs a decoder backbone"):
        make_plan(_config(files), load_backbone(FIXTURES / "bert"), 1)
    with pytest.raises(ConfigError, match="trains no classification head: head_init"):
        _config(files, head_init="class_means")
    ungrouped = tmp_path / "ungrouped.jsonl"
    ungrouped.write_text('{"prompt": "w3 w10", "response": "w7"}\n' * 8)
    config = _config(files, data=str(ungrouped), test_data=None, partition="dirichlet")
    with pytest.raises(ConfigError, match="one group"):
        simulate(config)
    grouped = dataclasses.replace(config, partition="iid", eval_examples=None, rounds=1)
    assert simulate(grouped).summary["final_eval_loss"] > 0


def test_a_decoder_classifies_by_its_lm_heads_label_words(files, tmp_path, capsys):
    """--verbalizer: the class scores are the frozen LM head's logits of the label words' tokens
    at the last real position; no head is trained, and `fedprompt apply` classifies the same way."""
    rng = np.random.default_rng(3)
    data = tmp_path / "labelled.jsonl"
    rows = [{"text": f"w{3 if y == 'pos' else 4} " + " ".join(f"w{int(x)}" for x in rng.integers(10, 99, 3)),
             "label": y} for y in rng.choice(["neg", "pos"], 120)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig(backbone=str(files["backbone"]), data=str(data), verbalizer="w9,w7", rounds=6, clients=4,
                       clients_per_round=2, local_steps=8, batch_size=8, max_length=8, num_virtual_tokens=4,
                       partition="iid", algorithm="fedavg", local_optimizer="adam", local_lr=0.3,
                       out=str(tmp_path / "run"))
    result = run(config, progress=False)
    plan = result.plan
    assert plan.task.verbalizer == (9, 7) and result.trainable["head"] == {}
    _, test = select_examples(config, *load_data(config))
    rows = encode_dataset(plan.backbone, test, config.max_length, config.num_virtual_tokens)
    prompt = materialize(plan.prompt_config, result.trainable["prompt"], plan.backbone.config)
    out = plan.backbone.forward(rows["input_ids"], rows["attention_mask"], prompt)
    last = rows["attention_mask"].sum(1) - 1 + out.num_virtual
    scores = np.asarray(out.logits)[np.arange(len(last)), last][:, [9, 7]]  # neg, pos
    want = float(np.mean(scores.argmax(1) == test.labels))
    np.testing.assert_allclose(result.metrics[-1]["eval_accuracy"], want, atol=1e-6)
    assert want > 0.5
    capsys.readouterr()
    main(["apply", str(tmp_path / "run" / "prompt.fpp"), "--backbone", str(files["backbone"]), "--json",
          "--text", test.texts[0]])
    applied = json.loads(capsys.readouterr().out)[0]
    assert applied["label"] == test.label_names[int(scores[0].argmax())]
    with pytest.raises(ConfigError, match="2 words for 3 classes|3 classes"):
        make_plan(dataclasses.replace(config, verbalizer="w9,w7"), plan.backbone, 3)
    with pytest.raises(ConfigError, match="different tokens"):
        make_plan(dataclasses.replace(config, verbalizer="w9,w9"), plan.backbone, 2)
