"""Train a soft prompt (and a linear head) on the frozen all-MiniLM-L6-v2, on one machine.

The task: 26 WordNet noun supersenses from glosses ("a domesticated carnivorous mammal ..." ->
noun.animal), built into fedprompt. Runs in about a minute on a 2-core CPU:

    python examples/prompt_tune_minilm.py [--method prompt|prefix] [--examples 1024] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import fedprompt
from fedprompt.data.datasets import load_wordnet_supersenses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["prompt", "prefix"], default="prompt")
    parser.add_argument("--examples", type=int, default=1024, help="training examples drawn from the train split")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backbone = fedprompt.load_backbone("minilm")
    train, test = load_wordnet_supersenses()
    rng = np.random.default_rng(args.seed)
    train = train.subset(rng.choice(len(train), min(args.examples, len(train)), replace=False))
    test = test.subset(rng.choice(len(test), 512, replace=False))

    def encode(ds):
        return {**backbone.tokenize(list(ds.texts), 32, num_virtual=args.virtual_tokens), "labels": ds.labels}

    config = fedprompt.PromptConfig(method=args.method, num_virtual_tokens=args.virtual_tokens,
                                    random_std=0.02 if args.method == "prefix" else 1.0)
    task = fedprompt.SequenceClassification(num_labels=train.num_labels)
    trainable = fedprompt.init_trainable(backbone, config, task, jax.random.key(args.seed))
    eval_step = fedprompt.make_eval_step(backbone, config, task)

    def accuracy(params) -> float:
        metrics = [eval_step(params, b, backbone.weights) for b in fedprompt.iterate_batches(encode(test), 64)]
        return sum(float(m.accuracy * m.examples) for m in metrics) / len(test)

    steps_per_epoch = -(-len(train) // 16)
    start = time.perf_counter()

    def progress(step: int, m: fedprompt.StepMetrics) -> None:
        if step % 16 == 0 or step == steps_per_epoch * args.epochs:
            print(f"step {step:4d}/{steps_per_epoch * args.epochs}  loss {float(m.loss):.3f}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)

    print(f"backbone {backbone.name} (fingerprint {backbone.fingerprint}), method {args.method}, "
          f"{len(train)} train / {len(test)} test examples, {train.num_labels} labels")
    print(f"test accuracy before training: {accuracy(trainable):.3f}")
    trainable, _, _ = fedprompt.local_train(backbone, config, task, trainable, encode(train), optax.adam(1e-2),
                                            epochs=args.epochs, batch_size=16, key=jax.random.key(args.seed + 1),
                                            callback=progress)
    print(f"test accuracy after training:  {accuracy(trainable):.3f}")
    print(f"trainable floats: {sum(x.size for x in jax.tree.leaves(trainable))} "
          f"(backbone: {backbone.weight_bytes() // 4} frozen floats)")


if __name__ == "__main__":
    main()
