"""Train `wordnet-gpt2`, the project's own small GPT-2-format decoder, on WordNet text.

The model is trained from scratch, seeded, on one line per WordNet 3.0 synset of every part of
speech, ``"<lemma>: <definition>"``, read from Debian's ``wordnet-base`` database files. The
definitions the built-in tasks test on never appear: a definition whose text hash puts it in
the tasks' test split (:func:`fedprompt.data.build_wordnet.split_of`, the function that splits
the noun and verb supersense tasks) is left out, and so is its synset. A small share of the
remaining lines (by their own hash) is held out to evaluate the model.

Steps:

1. a byte-level BPE tokenizer (``tokenizers``) on the training lines;
2. a GPT-2 initialised as Hugging Face initialises one (normal 0.02, the output projections
   scaled by ``1 / sqrt(2 n_layer)``), written as a checkpoint folder;
3. that folder loaded with :func:`fedprompt.load_backbone` and all its weights trained with
   AdamW through the library's own GPT-2 module (the forward pass every run uses), on the
   lines packed into fixed-length rows, for a fixed number of steps;
4. the trained tensors written back under their checkpoint names (``config.json``,
   ``model.safetensors``, ``tokenizer.json``, the WordNet licence, ``training.json`` with the
   settings and the held-out evaluation).

Usage (needs ``wordnet-base``; about half an hour on a 2-core CPU)::

    python examples/wordnet_decoder/train.py --out fedprompt/backbones/wordnet_gpt2

``--steps 20 --vocab 512`` makes a quick trial run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fedprompt.backbones.gpt2 import GPT2Config, checkpoint_shapes  # noqa: E402
from fedprompt.backbones.loading import load_backbone  # noqa: E402
from fedprompt.data import build_wordnet  # noqa: E402

EOS = "<|endoftext|>"
SETTINGS = {
    "vocab": 4096, "n_embd": 224, "n_layer": 4, "n_head": 4, "n_positions": 128,
    "row_tokens": 64, "batch": 32, "steps": 2000, "lr": 3e-3, "warmup": 150, "weight_decay": 0.01,
    "held_out_per_1000": 20, "seed": 0,
}
POS = ("noun", "verb", "adj", "adv")
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: "galore(ip)"


def wordnet_lines(wordnet_dir: Path) -> list[str]:
    """``"<lemma>: <definition>"`` for every synset whose definition is outside the tasks' test
    split, sorted and unique."""
    lines = set()
    for pos in POS:
        for raw in (wordnet_dir / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if not raw.strip() or raw.startswith(" "):
                continue
            head, separator, gloss = raw.partition(" | ")
            fields = head.split()
            if not separator or len(fields) < 5:
                continue
            definition = build_wordnet.definition_of(gloss)
            if not definition or build_wordnet.split_of(definition) == "test":
                continue
            lemma = _MARKER.sub("", fields[4]).replace("_", " ")
            lines.add(f"{lemma}: {definition}")
    return sorted(lines)


def held_out(line: str, per_1000: int) -> bool:
    return int.from_bytes(hashlib.sha256(line.encode("utf-8")).digest()[:4], "big") % 1000 < per_1000


def train_tokenizer(lines: list[str], vocab: int, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    fast.save_pretrained(folder)
    return fast


def hf_config(s: dict, vocab: int, eos: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
        "n_positions": s["n_positions"], "n_ctx": s["n_positions"], "n_embd": s["n_embd"], "n_layer": s["n_layer"],
        "n_head": s["n_head"], "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
    }


def initial_tensors(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face's GPT-2 initialisation: weights N(0, 0.02) (the residual output
    projections N(0, 0.02 / sqrt(2 n_layer))), biases 0, layer-norm scales 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(checkpoint_shapes(GPT2Config.from_hf(config)).items()):
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            std = 0.02 / math.sqrt(2 * config["n_layer"]) if name.endswith("c_proj.weight") else 0.02
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def leaf_names(folder: Path, config: dict) -> list[str]:
    """The checkpoint name of each leaf of the loaded backbone's weights, in leaf order: a probe
    checkpoint whose k-th tensor is filled with k + 1 is loaded and read back."""
    names = sorted(checkpoint_shapes(GPT2Config.from_hf(config)))
    shapes = checkpoint_shapes(GPT2Config.from_hf(config))
    write_checkpoint(folder, config, {n: np.full(shapes[n], k + 1, np.float32) for k, n in enumerate(names)})
    leaves = jax.tree.leaves(load_backbone(folder).weights)
    found = []
    for leaf in leaves:
        value = np.asarray(leaf)
        k = int(round(float(value.flat[0]))) - 1
        if not (0 <= k < len(names) and np.all(value == k + 1) and value.shape == shapes[names[k]]):
            raise SystemExit("the loaded weights are not the checkpoint's tensors one to one")
        found.append(names[k])
    return found


def packed_rows(ids: list[list[int]], eos: int, width: int) -> np.ndarray:
    stream = np.fromiter((t for row in ids for t in (*row, eos)), np.int32)
    n = len(stream) // (width + 1)
    return stream[: n * (width + 1)].reshape(n, width + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the checkpoint folder to write")
    parser.add_argument("--wordnet-dir", default=str(build_wordnet.DEFAULT_WORDNET_DIR))
    parser.add_argument("--copyright", default=str(build_wordnet.DEFAULT_COPYRIGHT_PATH))
    for key, value in SETTINGS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    s = {key: getattr(args, key) for key in SETTINGS}
    started = time.perf_counter()

    lines = wordnet_lines(Path(args.wordnet_dir))
    train = [line for line in lines if not held_out(line, s["held_out_per_1000"])]
    evaluation = [line for line in lines if held_out(line, s["held_out_per_1000"])]
    print(f"{len(lines)} WordNet lines: {len(train)} to train on, {len(evaluation)} held out", flush=True)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="wordnet-gpt2-"))
    tokenizer = train_tokenizer(train, s["vocab"], work)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = hf_config(s, len(tokenizer), eos)
    names = leaf_names(work, config)
    write_checkpoint(work, config, initial_tensors(config, s["seed"]))
    backbone = load_backbone(work)
    encode = lambda rows: packed_rows(tokenizer(rows, add_special_tokens=False)["input_ids"], eos, s["row_tokens"])  # noqa: E731
    train_rows, eval_rows = encode(train), encode(evaluation)
    print(f"{train_rows.size:,} training tokens in {len(train_rows)} rows of {s['row_tokens'] + 1}; "
          f"{backbone.num_parameters():,} parameters", flush=True)

    def loss_and_accuracy(weights, rows):
        # the library's GPT-2 module on explicit weights; Backbone.apply would stop their gradient
        module = nnx.merge(backbone.graphdef, weights)
        inputs = rows[:, :-1]
        hidden = module(module.embed_tokens(inputs), jnp.ones(inputs.shape, jnp.int32))
        logits = module.lm_head(hidden).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:])
        return ce.mean(), (jnp.argmax(logits, -1) == rows[:, 1:]).mean()

    schedule = optax.warmup_cosine_decay_schedule(0.0, s["lr"], s["warmup"], s["steps"], s["lr"] * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=s["weight_decay"]))

    @jax.jit
    def step(weights, opt_state, rows):
        (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(weights, rows)
        updates, opt_state = optimizer.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    evaluate = jax.jit(loss_and_accuracy)
    weights = backbone.weights
    opt_state = optimizer.init(weights)
    rng = np.random.default_rng(s["seed"])
    order = np.zeros(0, np.int64)
    t0 = time.perf_counter()
    for i in range(s["steps"]):
        if len(order) < s["batch"]:
            order = np.concatenate([order, rng.permutation(len(train_rows))])
        batch, order = order[: s["batch"]], order[s["batch"]:]
        weights, opt_state, loss = step(weights, opt_state, jnp.asarray(train_rows[batch]))
        if (i + 1) % 100 == 0 or i + 1 == s["steps"]:
            elapsed = time.perf_counter() - t0
            print(f"step {i + 1}/{s['steps']}: loss {float(loss):.3f}, {elapsed / 60:.1f} min, "
                  f"about {elapsed / (i + 1) * (s['steps'] - i - 1) / 60:.1f} min left", flush=True)
    losses, accuracies = zip(*(evaluate(weights, jnp.asarray(eval_rows[k: k + 64]))
                               for k in range(0, len(eval_rows), 64)))
    sizes = [len(eval_rows[k: k + 64]) for k in range(0, len(eval_rows), 64)]
    held_loss = float(np.average(np.asarray(losses), weights=sizes))
    held_accuracy = float(np.average(np.asarray(accuracies), weights=sizes))
    trained = {name: np.asarray(leaf, np.float32) for name, leaf in zip(names, jax.tree.leaves(weights))}

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work, out, ignore=shutil.ignore_patterns("model.safetensors"))
    write_checkpoint(out, config, trained)
    copyright_text = Path(args.copyright).read_text(encoding="utf-8")
    (out / build_wordnet.LICENSE_FILE_NAME).write_text(
        "This model was trained on text derived from WordNet 3.0 (Princeton University): one line\n"
        "per synset, its first lemma and the definition part of its gloss, by\n"
        "examples/wordnet_decoder/train.py.\n\n" + "-" * 72 + "\n\n"
        + build_wordnet.wordnet_license_stanza(copyright_text))
    report = {
        "settings": s, "parameters": backbone.num_parameters(), "train_lines": len(train),
        "held_out_lines": len(evaluation), "train_tokens": int(train_rows.size),
        "held_out_tokens": int(eval_rows.size), "held_out_loss": held_loss,
        "held_out_token_accuracy": held_accuracy, "train_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - started, "jax": jax.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"held-out loss {held_loss:.3f}, token accuracy {held_accuracy:.4f}; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
