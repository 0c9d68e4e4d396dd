"""The ``fedprompt`` command.

Sub-commands:
  info [BACKBONE]          load a backbone and print its architecture and fingerprint
  bench train-step         time a compiled prompt-tuning step and show its memory analysis
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

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
