"""The ``fedprompt`` command.

Sub-commands:
  run                      federated prompt tuning (the built-in default with no arguments)
  info [BACKBONE]          load a backbone and print its architecture and fingerprint
  bench train-step         time a compiled prompt-tuning step and show its memory analysis
  bench simulate           vmapped round vs sequential per-client / per-step loops
"""

from __future__ import annotations

import argparse
import json
import sys

from fedprompt.errors import FedPromptError


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def cmd_info(args: argparse.Namespace) -> int:
    from fedprompt.backbones.loading import load_backbone

    backbone = load_backbone(args.backbone)
    info = {
        "name": backbone.name,
        "path": str(backbone.path),
        "fingerprint": backbone.fingerprint,
        "weights_bytes": backbone.weight_bytes(),
        "tokenizer": type(backbone.tokenizer).__name__ if backbone.tokenizer is not None else None,
        **backbone.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_bench_train_step(args: argparse.Namespace) -> int:
    import jax

    from fedprompt import bench
    from fedprompt.backbones.loading import load_backbone

    backbone = load_backbone(args.backbone)
    rows = bench.train_step(
        backbone,
        methods=tuple(args.methods.split(",")),
        batch_size=args.batch_size,
        tokens=args.tokens,
        virtual_tokens=args.virtual_tokens,
        steps=args.steps,
    )
    device = jax.devices()[0]
    print(f"backbone {backbone.name} ({_mib(backbone.weight_bytes()).strip()} frozen weights) on {device.platform}:{device.device_kind}")
    print(f"batch {args.batch_size} x {args.tokens} tokens, {args.virtual_tokens} virtual tokens, {args.steps} timed steps")
    print(f"{'method':<8} {'trainable':>10} {'step (median)':>14} {'temporaries':>13} {'peak':>13}")
    for r in rows:
        print(
            f"{r['method']:<8} {r['trainable_floats']:>10} {r['step_seconds_median'] * 1e3:>11.1f} ms "
            f"{_mib(r['compiled_temporaries_bytes']):>13} {_mib(r['compiled_peak_bytes']):>13}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "rows": rows}, f, indent=2)
    return 0


# ``fedprompt run`` flags: (flag, RunConfig field, type, help).
RUN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--backbone", "backbone", str, "checkpoint folder, built-in name or cached hub id (default minilm)"),
    ("--data", "data", str, "JSONL or CSV file of labelled texts (default: built-in WordNet supersenses)"),
    ("--test-data", "test_data", str, "separate test file (default: a seeded 80/20 split of --data)"),
    ("--text-key", "text_key", str, "text column of --data"),
    ("--label-key", "label_key", str, "label column of --data"),
    ("--method", "method", str, "prompt | prefix"),
    ("--virtual-tokens", "num_virtual_tokens", int, "prompt length"),
    ("--algorithm", "algorithm", str, "fedavg | fedavgm | fedprox | fedadagrad | fedadam | fedyogi | scaffold"),
    ("--server-lr", "server_lr", float, "server learning rate"),
    ("--prox-mu", "prox_mu", float, "FedProx proximal coefficient"),
    ("--rounds", "rounds", int, "federated rounds"),
    ("--clients", "clients", int, "number of clients"),
    ("--clients-per-round", "clients_per_round", int, "clients sampled per round"),
    ("--partition", "partition", str, "iid | dirichlet | shards | quantity"),
    ("--alpha", "alpha", float, "Dirichlet concentration"),
    ("--labels-per-client", "labels_per_client", int, "labels per client for shards"),
    ("--local-steps", "local_steps", int, "local optimizer steps per round"),
    ("--batch-size", "batch_size", int, "examples per local step"),
    ("--local-optimizer", "local_optimizer", str, "adam | sgd"),
    ("--local-lr", "local_lr", float, "local learning rate"),
    ("--max-length", "max_length", int, "tokens per example"),
    ("--train-examples", "train_examples", int, "use at most this many training examples"),
    ("--eval-examples", "eval_examples", int, "evaluate on at most this many test examples"),
    ("--eval-every", "eval_every", int, "evaluate every N rounds"),
    ("--dropout", "dropout", float, "probability that a sampled client drops out"),
    ("--client-block", "client_block", int, "clients trained together in one vmapped program"),
    ("--seed", "seed", int, "the run's seed"),
    ("--out", "out", str, "output folder (default runs/latest)"),
]


def cmd_run(args: argparse.Namespace) -> int:
    from fedprompt.config import RunConfig
    from fedprompt.simulation.run import resume, run

    progress = False if args.no_progress else None
    if args.resume is not None:
        result = resume(args.resume, progress=progress)
        _print_run_result(result, args.resume)
        return 0
    overrides = {field: getattr(args, field) for _, field, _, _ in RUN_FLAGS}
    if args.baselines:
        overrides["baselines"] = True
    config = RunConfig.from_sources(args.config, overrides)  # every value checked before any work
    result = run(config, progress=progress)
    _print_run_result(result, config.out)
    return 0


def _print_run_result(result, out: str) -> None:
    s = result.summary
    print(f"final accuracy {s['final_accuracy']:.4f} after {s['rounds']} rounds; "
          f"{(s['total_bytes_up'] + s['total_bytes_down']) / 1e6:.2f} MB sent; {s['wall_seconds']:.0f} s")
    if "baselines" in s:
        b = s["baselines"]
        print(f"centralized {b['centralized_accuracy']:.4f}, local-only {b['local_only_accuracy']:.4f}")
    print(f"wrote {out}/: metrics.jsonl summary.json prompt.fpp curves.png")


def cmd_bench_simulate(args: argparse.Namespace) -> int:
    import jax

    from fedprompt import bench
    from fedprompt.backbones.loading import load_backbone

    backbone = load_backbone(args.backbone)
    rows = [bench.simulate_round(backbone, clients_per_round=k, local_steps=args.local_steps, repeats=args.repeats)
            for k in args.clients]
    device = jax.devices()[0]
    print(f"one round of local training, {backbone.name}, {args.local_steps} local steps x batch 16 x 32 tokens, "
          f"20 virtual tokens, on {device.platform}:{device.device_kind}")
    print(f"{'clients':>7} {'vmapped':>10} {'per-client loop':>16} {'per-step loop':>14} {'speed-up':>18}")
    for r in rows:
        t = r["seconds"]
        print(f"{r['clients_per_round']:>7} {t['vmapped']:>9.2f}s {t['per_client']:>15.2f}s {t['per_step']:>13.2f}s "
              f"{r['speedup_vs_per_client']:>6.2f}x / {r['speedup_vs_per_step']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "rows": rows}, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run federated prompt tuning (built-in default without arguments)")
    run.add_argument("--config", metavar="TOML", help="a TOML file of settings; flags override it")
    for flag, field, kind, text in RUN_FLAGS:
        run.add_argument(flag, dest=field, type=kind, default=None, help=text)
    run.add_argument("--baselines", action="store_true", help="also train centralized and local-only baselines")
    run.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR with its own settings")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="describe a backbone")
    info.add_argument("backbone", nargs="?", default="minilm", help="checkpoint folder, built-in name or cached hub id")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks (ratios and timings measured in one process)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    ts = bench_sub.add_parser("train-step", help="compiled prompt-tuning train step: time and memory")
    ts.add_argument("--backbone", default="minilm")
    ts.add_argument("--methods", default="prompt,prefix", help="comma-separated: prompt,prefix")
    ts.add_argument("--batch-size", type=int, default=16)
    ts.add_argument("--tokens", type=int, default=64)
    ts.add_argument("--virtual-tokens", type=int, default=20)
    ts.add_argument("--steps", type=int, default=10)
    ts.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ts.set_defaults(func=cmd_bench_train_step)
    sim = bench_sub.add_parser("simulate", help="vmapped round vs sequential per-client and per-step loops")
    sim.add_argument("--backbone", default="minilm")
    sim.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8],
                     help="comma-separated clients per round, e.g. 8,32")
    sim.add_argument("--local-steps", type=int, default=4)
    sim.add_argument("--repeats", type=int, default=3)
    sim.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    sim.set_defaults(func=cmd_bench_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedPromptError as err:
        print(f"fedprompt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
