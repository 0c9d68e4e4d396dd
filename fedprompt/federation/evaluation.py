"""Server-side evaluations beyond accuracy, the same in both runtimes: test-time prompt tuning."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedprompt.config import RunConfig
from fedprompt.data import partition


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
