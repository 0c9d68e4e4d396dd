"""Federated prompt tuning from Python, with your own in-memory data.

    python examples/federated_python_api.py

Builds a small labelled data set in memory, splits it over 6 clients with label skew, runs
FedAdam for a few rounds on the frozen MiniLM, and prints the accuracy per round.
"""

from __future__ import annotations

import numpy as np

import fedprompt
from fedprompt.data.datasets import from_lists, train_test_split

rng = np.random.default_rng(0)
topics = {
    "animal": ["dog", "cat", "horse", "eagle", "salmon", "wolf", "rabbit", "owl"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "pliers", "shovel", "axe"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "salad"],
}
templates = ["a {} in the picture", "she talked about the {}", "there was a {} on the table", "the old {}"]
texts, labels = [], []
for label, words in topics.items():
    for _ in range(120):
        texts.append(rng.choice(templates).format(rng.choice(words)))
        labels.append(label)
train, test = train_test_split(from_lists(texts, labels), test_fraction=0.25, seed=0)

config = fedprompt.RunConfig(
    algorithm="fedadam", server_lr=0.03, rounds=5, clients=6, clients_per_round=3, alpha=0.3,
    local_steps=4, batch_size=8, max_length=12, num_virtual_tokens=8,
)
result = fedprompt.simulate(
    config, train=train, test=test,
    callback=lambda m: print(f"round {m['round']}: accuracy {m['eval_accuracy']:.3f}, {m['bytes_up']} bytes up"),
)
print("label histograms per client:\n", result.label_histograms)
