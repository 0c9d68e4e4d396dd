"""Federated prompt tuning from forward passes only: BBT/FedBPT (CMA-ES) or FedKSeed/MeZO (seeds).

    python examples/gradient_free_federation.py --method zo --rounds 15
    python examples/gradient_free_federation.py --method bbt --rounds 15

The default federation of ``fedprompt run`` (MiniLM, WordNet supersenses, 16 clients with
Dirichlet(0.5) label skew, 8 per round), with the clients' gradient steps replaced by a
gradient-free :class:`~fedprompt.client.program.ClientProgram` and FedAvg on the server
(FedBPT and FedKSeed both average). Prints accuracy and the real encoded bytes per round.
"""

from __future__ import annotations

import argparse

import fedprompt
from fedprompt.client.bbt import make_bbt_program
from fedprompt.client.zeroth_order import make_zo_program
from fedprompt.federation.plan import make_algorithm, make_local_optimizer, make_prompt_config, make_task
from fedprompt.data.loading import encode_dataset, load_data, partition_clients, select_examples
from fedprompt.simulation.engine import FederatedSimulation, build_client_data, run_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("bbt", "zo"), default="zo")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--frozen-head", action="store_true", help="keep the server's initial head")
    args = parser.parse_args()

    config = fedprompt.RunConfig(rounds=args.rounds, algorithm="fedavg")
    backbone = fedprompt.load_backbone(config.backbone)
    train, test = select_examples(config, *load_data(config))
    prompt_config = make_prompt_config(config)
    task = make_task(train.num_labels)
    parts = partition_clients(config, train.labels)
    client_data = build_client_data(
        encode_dataset(backbone, train, config.max_length, config.num_virtual_tokens), parts, train.num_labels
    )
    encoded_test = encode_dataset(backbone, test, config.max_length, config.num_virtual_tokens)
    if args.method == "bbt":  # one CMA-ES generation per local step
        program = make_bbt_program(
            backbone, prompt_config, task, local_steps=config.local_steps, batch_size=config.batch_size,
            seed=config.seed, head="frozen" if args.frozen_head else "gradient",
        )
    else:
        program = make_zo_program(  # local_steps ZO steps per round: that many (seed, scalar) pairs sent
            backbone, prompt_config, task, local_steps=config.local_steps, batch_size=config.batch_size, seed=config.seed,
            head="frozen" if args.frozen_head else "zo",
        )
    simulation = FederatedSimulation.build(
        backbone, prompt_config, task, make_algorithm(config), make_local_optimizer(config), client_data,
        clients_per_round=config.clients_per_round, local_steps=config.local_steps, batch_size=config.batch_size,
        seed=config.seed, program=program,
    )

    def show(m):
        print(f"round {m['round']}: accuracy {m['eval_accuracy']:.4f}, {m['bytes_up'] // m['clients']} bytes up per client")

    run_rounds(simulation, config.rounds, encoded_test, callback=show)


if __name__ == "__main__":
    main()
