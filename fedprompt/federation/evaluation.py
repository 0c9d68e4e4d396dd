"""Server-side evaluations beyond accuracy, the same in both runtimes: greedy generations
scored by exact match and ROUGE-L, and test-time prompt tuning."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedprompt.config import RunConfig
from fedprompt.data import datasets, instructions, partition
from fedprompt.errors import ConfigError

SAMPLES = 5
"""Generations kept in a summary (prompt, reference, generated) beside the scores."""

GENERATE_BATCH = 16
"""Prompts generated together (of one token length, so no row is padded)."""


def normalize_answer(text: str) -> str:
    """The form exact match compares: lower case, whitespace runs as one space, no leading or
    trailing space or punctuation."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?\"'").strip()


def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("scoring generations needs rouge-score: pip install 'fedprompt[generate]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def check_generation_scoring(config: RunConfig) -> None:
    """Refuse a generative run that could not score its generations, before it trains."""
    if config.task == "generate" and config.generate_examples:
        _rouge_scorer()


def generate_responses(plan: Any, trainable: Any, prompts: Sequence[str], *, max_length: int,
                       max_new_tokens: int) -> list[str]:
    """Greedy responses of the decoder with ``trainable``'s prompt to ``prompts``, formatted as
    in training (:func:`~fedprompt.data.instructions.format_prompt`, cut to its last
    ``max_length - 1`` tokens and to the backbone's positions), ending at end-of-text."""
    from fedprompt.inference.generate import generate
    from fedprompt.prompts import materialize

    backbone = plan.backbone
    tok = backbone.tokenizer
    prompt = materialize(plan.prompt_config, trainable["prompt"], backbone.config)
    virtual = plan.prompt_config.num_virtual_tokens if plan.prompt_config.method == "prompt" else 0
    room = max_length - 1
    if backbone.config.max_positions is not None:
        room = min(room, backbone.config.max_positions - virtual - max_new_tokens)
    if room < 1:
        raise ConfigError(f"{virtual} virtual + {max_new_tokens} new tokens leave no room for a prompt in the "
                          f"{backbone.config.max_positions} positions of {backbone.name!r}")
    rows = [instructions.format_prompt(backbone, p)[-room:] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_length[len(row)].append(i)
    out = [""] * len(rows)
    eos = tok.eos_token_id
    for indices in by_length.values():
        for start in range(0, len(indices), GENERATE_BATCH):
            chunk = indices[start : start + GENERATE_BATCH]
            tokens = generate(backbone, prompt, np.asarray([rows[i] for i in chunk], np.int32),
                              max_new_tokens=max_new_tokens, eos_token_id=eos)
            for i, row in zip(chunk, tokens.tolist()):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out[i] = tok.decode(row, skip_special_tokens=True)
    return out


def generation_summary(config: RunConfig, plan: Any, trainable: Any, test: datasets.TextDataset | None,
                       initial: Any = None) -> dict[str, Any]:
    """A generative run's summary entries, the same in both runtimes: ``generation``
    (:func:`evaluate_generation` of ``trainable``; with the ``initial`` trainable, its scores
    under ``untuned``: the prompt the run started from), ``final_exact_match`` and
    ``final_rouge_l``; ``{}`` for a classification run, without ``generate_examples`` or
    without a test set."""
    if config.task != "generate" or not config.generate_examples or test is None:
        return {}
    generation = evaluate_generation(config, plan, trainable, test)
    if initial is not None:
        start = evaluate_generation(config, plan, initial, test)
        generation["untuned"] = {"exact_match": start["exact_match"], "rouge_l": start["rouge_l"]}
    return {"generation": generation, "final_exact_match": generation["exact_match"],
            "final_rouge_l": generation["rouge_l"]}


def generation_rows(test_size: int, examples: int) -> np.ndarray:
    """The test rows a generative run scores: ``examples`` of the ``test_size`` rows, spread
    evenly from the first to the last (all of them when there are no more), so that a test set
    sorted by category is not scored on its first category alone."""
    if examples >= test_size:
        return np.arange(test_size)
    return np.linspace(0, test_size - 1, examples).round().astype(np.int64)


def evaluate_generation(config: RunConfig, plan: Any, trainable: Any, test: datasets.TextDataset) -> dict[str, Any]:
    """Exact match and ROUGE-L F1 of greedy generations on ``generate_examples`` test examples
    (instruction data; :func:`generation_rows`), with a few samples.

    Exact match compares :func:`normalize_answer` forms; ROUGE-L is ``rouge-score``'s F1 with
    stemming, averaged over the examples.
    """
    if test.responses is None:
        raise ConfigError("generation scores need instruction data (prompts with responses)")
    rows = generation_rows(len(test), config.generate_examples)
    n = len(rows)
    prompts, references = [test.texts[i] for i in rows], [test.responses[i] for i in rows]
    generated = generate_responses(plan, trainable, prompts, max_length=config.max_length,
                                   max_new_tokens=config.max_new_tokens)
    scorer = _rouge_scorer()
    exact = [normalize_answer(g) == normalize_answer(r) for g, r in zip(generated, references)]
    rouge = [scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references)]
    return {
        "exact_match": float(np.mean(exact)) if n else 0.0, "rouge_l": float(np.mean(rouge)) if n else 0.0,
        "examples": n, "max_new_tokens": config.max_new_tokens,
        "samples": [{"prompt": p, "reference": r, "generated": g}
                    for p, r, g in list(zip(prompts, references, generated))[:SAMPLES]],
    }


def evaluate_tpt(config: RunConfig, plan: Any, trainable: Any, encoded_test: dict[str, np.ndarray]) -> dict[str, Any]:
    """Test-time prompt tuning of the trained prompt on a label-shifted split of the test set.

    The test rows are split over ``tpt_test_clients`` test clients with a Dirichlet(``tpt_alpha``)
    label skew (the key schedule's ``tpt_split``); each client's unlabeled batches adapt a fresh
    copy of the prompt (:func:`fedprompt.inference.tpt_evaluate`). Returns accuracy, loss and
    entropy before and after adaptation, plus the settings.
    """
    from fedprompt.inference.tpt import tpt_evaluate

    labels = np.asarray(encoded_test["labels"])
    clients = partition.dirichlet_partition(labels, min(config.tpt_test_clients, len(labels)), config.tpt_alpha,
                                            seed=plan.keys.tpt_split, min_size=0)
    result = tpt_evaluate(
        plan.backbone, plan.prompt_config, plan.task, trainable, encoded_test, key=plan.keys.tpt_adapt(),
        batch_size=config.batch_size, steps=config.tpt_steps, lr=config.tpt_lr, num_views=config.tpt_views,
        clients=clients,
    )
    return {**result, "test_clients": len(clients), "alpha": config.tpt_alpha, "steps": config.tpt_steps,
            "lr": config.tpt_lr, "views": config.tpt_views}
