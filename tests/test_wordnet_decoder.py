"""The built-in `wordnet-gpt2` decoder: what transformers' GPT2LMHeadModel computes from the same
checkpoint (golden logits and a greedy continuation, tests/make_golden.py), the checkpoint's
size and licence, and a training corpus that holds none of the tasks' test glosses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import fedprompt
from fedprompt.backbones.loading import resolve_checkpoint
from fedprompt.data import build_wordnet
from fedprompt.inference.generate import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decoder() -> fedprompt.Backbone:
    return fedprompt.load_backbone("wordnet-gpt2")


def test_the_built_in_decoder_computes_what_transformers_computes(decoder):
    golden = dict(np.load(FIXTURES / "wordnet_gpt2_golden.npz"))
    ids, mask = golden["input_ids"], golden["attention_mask"]
    assert decoder.tokenizer(list(golden["texts"]), padding="max_length", max_length=16,
                             truncation=True)["input_ids"] == ids.tolist()
    logits = np.asarray(decoder.forward(ids, mask).logits)
    keep = mask.astype(bool)
    np.testing.assert_allclose(logits[keep], golden["logits"][keep], atol=1e-4, rtol=1e-4)
    first = ids[:1, : int(mask[0].sum())]
    np.testing.assert_array_equal(generate(decoder, None, first, max_new_tokens=8,
                                           eos_token_id=decoder.tokenizer.eos_token_id), golden["greedy"])


def test_the_checkpoint_is_small_licensed_and_says_how_it_was_trained(decoder):
    folder, name = resolve_checkpoint("wordnet-gpt2")
    assert name == "wordnet-gpt2" and decoder.is_decoder
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 15 * 2**20
    assert "Princeton University under the following license" in (folder / build_wordnet.LICENSE_FILE_NAME).read_text()
    report = json.loads((folder / "training.json").read_text())
    assert report["parameters"] == decoder.num_parameters()
    assert 0.0 < report["held_out_token_accuracy"] < 1.0


def test_the_training_lines_leave_out_every_test_gloss(tmp_path):
    spec = importlib.util.spec_from_file_location("train_decoder", ROOT / "examples" / "wordnet_decoder" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    candidates = [f"a kind of thing number {i} seen in tests" for i in range(200)]
    test_gloss = next(c for c in candidates if build_wordnet.split_of(c) == "test")
    train_gloss = next(c for c in candidates if build_wordnet.split_of(c) == "train")
    for pos in train.POS:
        lines = [f"0000000{k} 03 n 01 {pos}_word_{k} 0 000 | {gloss}; \"an example\""
                 for k, gloss in enumerate((test_gloss, train_gloss))]
        (tmp_path / f"data.{pos}").write_text("  licence header line\n" + "\n".join(lines) + "\n")
    assert train.wordnet_lines(tmp_path) == sorted(f"{pos} word 1: {train_gloss}" for pos in train.POS)
