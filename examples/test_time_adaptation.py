"""Test-time prompt tuning (TPT) on test clients whose label mix differs from training.

    fedprompt run --out runs/latest                      # trains the default prompt + head
    python examples/test_time_adaptation.py --prompt runs/latest/prompt.fpp

The WordNet test set is split over test clients with a Dirichlet(alpha) label skew (alpha 0.1:
each test client sees mostly one to three supersenses, far from the training mix). Every test
client's unlabeled data is read in batches; each batch adapts a fresh copy of the prompt by
minimizing the entropy of the averaged prediction over token-masked views of its examples
(confidence selection keeps the most confident views), then is classified with it. Printed:
accuracy without and with adaptation, on the shifted clients and on an IID control split, and
optionally with federated TPT (the test clients adapt the prompt together, the server averages
their prompt changes, every client then uses the one adapted prompt).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import fedprompt
from fedprompt.inference import make_tpt_program, tpt_evaluate
from fedprompt.server import algorithms
from fedprompt.data.datasets import load_wordnet_supersenses
from fedprompt.data.loading import encode_dataset
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds
from fedprompt.data.partition import dirichlet_partition, iid_partition
from fedprompt.wire.artifact import load_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", required=True, help="a prompt.fpp written by `fedprompt run`")
    parser.add_argument("--examples", type=int, default=1024, help="test examples used")
    parser.add_argument("--test-clients", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew of the test clients")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--federated-rounds", type=int, default=0, help="also run federated TPT for this many rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backbone = fedprompt.load_backbone("minilm")
    artifact = load_prompt(args.prompt, backbone=backbone)
    trainable = jax.tree.map(np.asarray, artifact.trainable())
    _, test = load_wordnet_supersenses()
    rows = np.sort(np.random.default_rng(args.seed + 7).choice(len(test), args.examples, replace=False))
    test = test.subset(rows)
    config = artifact.prompt_config
    task = fedprompt.SequenceClassification(num_labels=test.num_labels)
    encoded = encode_dataset(backbone, test, 32, config.num_virtual_tokens)
    labels = encoded["labels"]
    splits = {
        f"shifted (Dirichlet {args.alpha})": dirichlet_partition(labels, args.test_clients, args.alpha, seed=args.seed),
        "IID control": iid_partition(len(labels), args.test_clients, seed=args.seed),
    }
    key = jax.random.key(args.seed)
    for name, parts in splits.items():
        result = tpt_evaluate(
            backbone, config, task, trainable, encoded, key=key, batch_size=args.batch_size,
            steps=args.steps, lr=args.lr, num_views=args.views, clients=parts,
        )
        print(f"{name}: accuracy {result['accuracy_before']:.4f} -> {result['accuracy_after']:.4f} with TPT "
              f"({result['examples']} examples)")
        if args.federated_rounds:
            program = make_tpt_program(
                backbone, config, task, trainable, batch_size=args.batch_size, lr=args.lr, num_views=args.views
            )
            simulation = FederatedSimulation.build(
                backbone, config, task, algorithms.fedavg(), optax.sgd(0.0), build_client_data(encoded, parts, test.num_labels),
                clients_per_round=len(parts), local_steps=1, batch_size=1, program=program, seed=args.seed,
                client_block=1,  # one client's views x batch through forward and backward at a time
            )
            state, _, history = run_rounds(simulation, args.federated_rounds, encoded)
            print(f"  federated TPT, {args.federated_rounds} rounds: accuracy {history[-1]['eval_accuracy']:.4f}")


if __name__ == "__main__":
    main()
