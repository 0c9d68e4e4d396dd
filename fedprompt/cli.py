"""The fedprompt command: federated prompt tuning of frozen language models.

commands:
  run                      federated prompt tuning (the built-in default with no arguments);
                           --overwrite replaces the run in --out, --resume DIR continues one
  compare DIR [DIR ...]    several runs side by side: accuracy, bytes sent, one plot
  info [BACKBONE]          load a backbone and print its architecture and fingerprint
  inspect FILE             a prompt artifact's metadata (readable text, or --json)
  apply FILE --text T      classify texts with a prompt and its head, or generate with a decoder
  export FILE --format peft --out DIR
                           a PEFT prompt-tuning / prefix-tuning adapter
  import DIR --out FILE    a PEFT prompt-tuning / prefix-tuning adapter as a prompt artifact
  bench train-step         time a compiled prompt-tuning step and show its memory analysis
  bench simulate           vmapped round vs sequential per-client / per-step loops, block memory
  bench aggregate          compiled aggregation vs a NumPy (Flower-style) weighted sum, GB/s
  bench train              train step FLOP/s as a fraction of this machine's matmul FLOP/s
  bench kernels            Pallas kernels vs their XLA references
  bench memory             compiled memory of gradient-free client steps; --abstract llama-7b|llama-70b|qwen2-0.5b
                           [--devices N]: a big backbone's prompt-tuning step, remat on and off

Errors are one line on stderr: exit status 2 for bad input, 1 for a system error (a full disk,
a read-only folder), 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError, run_command


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


# ``fedprompt run``: one flag per RunConfig field, named after it (``--clients-per-round``) unless
# renamed here, typed by its annotation, with this help and the field's default. The one table
# for ``fedprompt run --help`` and the README (:func:`run_flags_markdown`).
RUN_HELP: dict[str, str] = {
    "backbone": "checkpoint folder, built-in name or cached hub id",
    "data": "JSONL or CSV file of labelled texts (unset: the built-in WordNet supersenses)",
    "test_data": "separate test file (unset: a seeded 80/20 split of --data)",
    "text_key": "text column of --data",
    "label_key": "label column of --data (generate: the column that groups examples, where present)",
    "method": "prompt | prefix | bbt | zo",
    "num_virtual_tokens": "prompt length",
    "algorithm": "fedavg | fedavgm | fedprox | fedadagrad | fedadam | fedyogi | scaffold",
    "server_lr": "server learning rate (unset: the algorithm's own)",
    "server_momentum": "FedAvgM momentum",
    "tau": "FedAdagrad / FedAdam / FedYogi adaptivity",
    "b1": "FedAdam / FedYogi first-moment decay",
    "b2": "FedAdam / FedYogi second-moment decay",
    "prox_mu": "FedProx proximal coefficient",
    "rounds": "federated rounds",
    "clients": "number of clients",
    "clients_per_round": "clients sampled per round",
    "partition": "iid | dirichlet | shards | quantity",
    "alpha": "Dirichlet concentration",
    "labels_per_client": "labels per client for shards",
    "local_steps": "local optimizer steps per round",
    "batch_size": "examples per local step",
    "local_optimizer": "adam | sgd (unset: sgd for scaffold and the adaptive servers fedadagrad, fedadam, fedyogi; adam for the rest)",
    "local_lr": "local learning rate (unset: 0.01 for adam, 0.5 for sgd)",
    "head_init": "random | class_means (the head set once from the clients' class means) | lda (and their feature covariance)",
    "head_init_examples": "class_means: rows per client the class means are taken on",
    "zo_seeds": "zo: size of the shared seed pool (FedKSeed's K)",
    "zo_eps": "zo: perturbation scale of the two-point estimate",
    "zo_head": "zo: zo (perturb the head too) | frozen (keep the server's head, e.g. class means)",
    "zo_downlink": "zo: auto | seeds (clients are sent the seed pairs they missed, FedKSeed) | state",
    "bbt_dim": "bbt: dimension of the searched subspace",
    "bbt_popsize": "bbt: CMA-ES candidates per generation",
    "bbt_fitness_examples": "bbt: examples of a generation's batch the candidates are ranked on (0: all)",
    "logit_adjustment": "tau: local loss on logits + tau x log(own label frequencies), against label skew (0: off)",
    "max_length": "tokens per example (generate: prompt and response together)",
    "train_examples": "use at most this many training examples (unset: all)",
    "eval_examples": "evaluate on at most this many test examples",
    "eval_every": "evaluate every N rounds and after the last (unset: every max(1, rounds // 3))",
    "dropout": "probability that a sampled client drops out",
    "client_block": "clients trained together in one vmapped program: auto (by the block's work on a CPU, "
                    "by its compiled memory on an accelerator) or a number",
    "client_block_memory": "client-block auto: GiB one block program may use (unset: 0.9 x an accelerator's free "
                           "memory)",
    "seed": "the run's seed",
    "baselines": "also train centralized and local-only baselines (with Adam, whatever the clients use)",
    "aggregator": "mean | median | trimmed_mean | krum | multi_krum | norm_bound",
    "trim_beta": "trimmed_mean: fraction trimmed at each end",
    "num_byzantine": "krum / multi_krum: assumed attackers",
    "krum_m": "multi_krum: updates averaged (unset: all but the attackers)",
    "norm_bound": "norm_bound: L2 bound of each update",
    "update_clip": "the server clips every client update to this L2 norm, in every runtime (0: off; with DP: the DP clip)",
    "attack": "sign_flip | scaling | gaussian | label_flip (unset: none)",
    "attack_fraction": "fraction of malicious clients",
    "attack_scale": "factor of sign_flip / scaling attacks",
    "dp": "central | local differential privacy (unset: none)",
    "dp_clip": "DP clipping norm",
    "dp_noise_multiplier": "DP noise multiplier z",
    "dp_target_epsilon": "choose z so the run spends this epsilon",
    "dp_delta": "DP delta (unset: min(1e-5, 1 / clients))",
    "dp_adaptive": "adaptive DP clipping (Andrew et al. 2021)",
    "dp_accountant": "rdp | pld",
    "secagg": "secure aggregation (Bonawitz et al. 2017)",
    "secagg_threshold": "secure aggregation: Shamir threshold (unset: about 2/3 of a round's clients)",
    "compress": "int8 | int4 quantization of the client updates (unset: float32)",
    "error_feedback": "with --compress: carry the compression error to the next round",
    "devices": "local devices each round's clients are spread over, 0 for all",
    "parallel_backend": "shard_map | pmap (with --devices)",
    "tpt": "also evaluate with test-time prompt tuning on a label-shifted test split",
    "tpt_steps": "TPT: adaptation steps per test batch",
    "tpt_lr": "TPT: learning rate",
    "tpt_views": "TPT: augmented views per example",
    "tpt_test_clients": "TPT: test clients of the shifted split",
    "tpt_alpha": "TPT: Dirichlet label skew of the test clients",
    "out": "output folder",
    "task": "classify | generate (a decoder writes responses to prompts; loss on the response only)",
    "verbalizer": "decoders: classify by the LM head's logits of these label words (comma-separated, or 'names')",
    "prompt_key": "generate: the data's prompt column",
    "response_key": "generate: the data's response column",
    "max_new_tokens": "generate: the most tokens a greedy generation writes",
    "generate_examples": "generate: test examples generated for exact match and ROUGE-L after the last round",
}
RUN_FLAG_NAMES = {"num_virtual_tokens": "--virtual-tokens"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_METAVARS = {"int": "N", "float": "X", "str": "NAME", "data": "FILE", "test_data": "FILE", "out": "DIR"}


@dataclasses.dataclass(frozen=True)
class RunFlag:
    """One ``fedprompt run`` flag: the RunConfig field it sets, its type, default and help."""

    flag: str
    field: str
    type: type
    default: object
    help: str

    @property
    def help_with_default(self) -> str:
        if self.type is bool or self.default is None:
            return self.help
        return f"{self.help} (default: {self.default})"


def run_flags() -> list[RunFlag]:
    """The flags of ``fedprompt run``, one per :class:`~fedprompt.config.RunConfig` field, in field order."""
    flags = []
    for field in dataclasses.fields(RunConfig):
        kind = _TYPES[str(field.type).split("|")[0].strip()]
        flag = RUN_FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        flags.append(RunFlag(flag, field.name, kind, field.default, RUN_HELP.get(field.name, field.name.replace("_", " "))))
    return flags


def run_flags_markdown() -> str:
    """The flags of ``fedprompt run`` as a Markdown table (flag, default, meaning), for the README."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in run_flags():
        default = "off" if f.type is bool else ("unset" if f.default is None else f"`{f.default}`")
        meaning = f.help.replace("|", "\\|")  # a literal bar inside a table cell
        rows.append(f"| `{f.flag}` | {default} | {meaning} |")
    return "\n".join(rows)


def cmd_run(args: argparse.Namespace) -> int:
    from fedprompt.simulation.run import resume, run

    progress = False if args.no_progress else None
    if args.resume is not None:
        result = resume(args.resume, progress=progress)
        _print_run_result(result, args.resume)
        return 0
    # An unset switch is None, not False, so that it leaves the TOML file's value alone.
    overrides = {f.field: (getattr(args, f.field) or None) if f.type is bool else getattr(args, f.field)
                 for f in run_flags()}
    config = RunConfig.from_sources(args.config, overrides)  # every value checked before any work
    result = run(config, progress=progress, overwrite=args.overwrite)
    _print_run_result(result, config.out)
    return 0


def _print_run_result(result, out: str) -> None:
    s = result.summary
    what = "final token accuracy" if s["config"].get("task") == "generate" else "final accuracy"
    print(f"{what} {s['final_accuracy']:.4f} after {s['rounds']} rounds; "
          f"{(s['total_bytes_up'] + s['total_bytes_down']) / 1e6:.2f} MB sent; {s['wall_seconds']:.0f} s")
    if "generation" in s:
        g = s["generation"]
        print(f"generations of {g['examples']} test prompts: exact match {g['exact_match']:.4f}, "
              f"ROUGE-L {g['rouge_l']:.4f}")
    if "baselines" in s:
        b = s["baselines"]
        print(f"centralized {b['centralized_accuracy']:.4f}, local-only {b['local_only_accuracy']:.4f}")
        if "centralized_rouge_l" in b:
            print(f"ROUGE-L: centralized {b['centralized_rouge_l']:.4f}, local-only {b['local_only_rouge_l']:.4f}")
    if "tpt" in s:
        t = s["tpt"]
        print(f"test-time tuning on {t['test_clients']} label-shifted test clients (Dirichlet {t['alpha']:g}): "
              f"accuracy {t['accuracy_before']:.4f} -> {t['accuracy_after']:.4f}")
    print(f"wrote {out}/: metrics.jsonl summary.json prompt.fpp curves.png")


def cmd_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedprompt.errors import InputError
    from fedprompt.federation import report

    labels = args.labels.split(",") if args.labels else [Path(d).name for d in args.dirs]
    if len(labels) != len(args.dirs):
        raise InputError(f"--labels names {len(labels)} runs, {len(args.dirs)} folders were given")
    runs = {}
    for label, folder in zip(labels, args.dirs):
        path = Path(folder) / report.METRICS_FILE
        if not path.is_file():
            raise InputError(f"{folder} holds no {report.METRICS_FILE} (not a `fedprompt run` output folder)")
        runs[label] = report.read_metrics(path)
    try:
        rows = report.compare_runs(runs)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'run':<20} {'rounds':>6} {'final acc':>9} {'best acc':>8} {'up total':>10} "
              f"{'up/client/round':>15} {'down total':>10} {'down/client/round':>17} {'time':>8}")
        for r in rows:
            up, down = (report.format_bytes(r[key]) if r[key] is not None else "-"
                        for key in ("bytes_up_per_client_round", "bytes_down_per_client_round"))
            print(f"{r['run']:<20} {r['rounds']:>6} {r['final_accuracy'] or float('nan'):>9.4f} "
                  f"{r['best_accuracy'] or float('nan'):>8.4f} {report.format_bytes(r['bytes_up']):>10} "
                  f"{up:>15} {report.format_bytes(r['bytes_down']):>10} {down:>17} "
                  f"{report.format_duration(r['seconds']):>8}")
    if args.out:
        report.plot_comparison(runs, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_bench_simulate(args: argparse.Namespace) -> int:
    import jax

    from fedprompt import bench
    from fedprompt.backbones.loading import load_backbone

    backbone = load_backbone(args.backbone)
    block = args.client_block if args.client_block == "auto" else (int(args.client_block) or None)
    loops = tuple(name for name in args.loops.split(",") if name)
    if set(loops) - {"per_client", "per_step"}:
        raise ConfigError(f"--loops takes per_client and per_step, got {args.loops!r}")
    rows = []
    for k in args.clients:  # each row printed as soon as it is measured (the largest rounds take minutes)
        rows.append(bench.simulate_round(backbone, clients_per_round=k, local_steps=args.local_steps,
                                         repeats=args.repeats, client_block=block, loops=loops))
        print(f"{k} clients: engine {rows[-1]['seconds']['vmapped']:.2f} s (blocks of {rows[-1]['client_block']}), "
              f"peak RSS {rows[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    device = jax.devices()[0]
    print(f"one round of local training, {backbone.name}, {args.local_steps} local steps x batch 16 x 32 tokens, "
          f"20 virtual tokens, client blocks {args.client_block}, "
          f"on {device.platform}:{device.device_kind}")
    print(f"{'clients':>7} {'vmapped':>10} {'per client':>11} {'per-client loop':>16} {'per-step loop':>14} "
          f"{'speed-up':>18} {'peak RSS':>10}")
    for r in rows:
        t = r["seconds"]
        loop_times = [f"{t[name]:.2f}s" if name in t else "-" for name in ("per_client", "per_step")]
        ups = [f"{r[f'speedup_vs_{name}']:.2f}x" if name in t else "-" for name in ("per_client", "per_step")]
        print(f"{r['clients_per_round']:>7} {t['vmapped']:>9.2f}s {t['vmapped'] / r['clients_per_round']:>10.3f}s "
              f"{loop_times[0]:>16} {loop_times[1]:>14} {' / '.join(ups):>18} {r['peak_rss_bytes'] / 2**30:>6.2f} GiB")
    peak = bench.matmul_flops()["flops_per_second"]
    print("achieved GFLOP/s (vmapped / per-client / per-step) against the measured matmul "
          f"{peak / 1e9:.1f} GFLOP/s: " + "; ".join(
              f"{r['clients_per_round']}: " + " / ".join(f"{v / 1e9:.1f}" for v in r["achieved_flops_per_second"].values())
              for r in rows))
    memory = bench.block_memory(backbone, clients=tuple(args.memory_clients), local_steps=args.local_steps) if args.memory_clients else []
    if memory:
        print(bench.format_block_memory(memory))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "machine": bench.machine(), "matmul_flops_per_second": peak, "rows": rows,
                       "memory": memory}, f, indent=2)
    return 0


def _bench_report(args: argparse.Namespace, result, text: str) -> int:
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cmd_bench_aggregate(args: argparse.Namespace) -> int:
    from fedprompt import bench

    shapes = tuple(tuple(int(d) for d in s.split("x")) for s in args.shapes.split(","))
    result = bench.aggregate(clients=tuple(args.clients), shapes=shapes, repeats=args.repeats)
    return _bench_report(args, result, bench.format_aggregate(result))


def cmd_bench_train(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from fedprompt import bench
    from fedprompt.backbones.loading import load_backbone

    dtype = jnp.dtype(args.precision)
    backbone = load_backbone(args.backbone, dtype=dtype, compute_dtype=dtype)
    result = bench.train_efficiency(backbone, method=args.method, batch_size=args.batch_size,
                                    tokens=args.tokens, virtual_tokens=args.virtual_tokens, steps=args.steps,
                                    matmul_n=args.matmul_n)
    return _bench_report(args, result, bench.format_train(result))


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from fedprompt import bench

    result = bench.kernels_bench(repeats=args.repeats)
    return _bench_report(args, result, bench.format_kernels(result))


def cmd_bench_memory(args: argparse.Namespace) -> int:
    if args.abstract is not None:
        return _bench_memory_abstract(args)
    if args.devices != 1:
        raise ConfigError("--devices applies to --abstract backbones (the weights split over N devices)")
    from fedprompt.backbones.loading import load_backbone
    from fedprompt.client.memory import format_memory_report, gradient_free_memory_report

    batch_size = 16 if args.batch_size is None else args.batch_size
    tokens = 64 if args.tokens is None else args.tokens
    backbone = load_backbone(args.backbone)
    report = gradient_free_memory_report(backbone, batch_size=batch_size, max_length=tokens)
    header = (f"compiled memory of one client step, {backbone.name}, batch {batch_size} x {tokens} tokens, "
              f"20 virtual tokens (XLA memory analysis; weights {report['inference']['arguments'] / 2**20:.1f} MiB "
              "are arguments)")
    return _bench_report(args, report, header + "\n" + format_memory_report(report))


def _bench_memory_abstract(args: argparse.Namespace) -> int:
    """``bench memory --abstract NAME``: a prompt-tuning step of a shape-only backbone, compiled only."""
    if args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    from fedprompt.sharding import use_host_devices

    # Before JAX starts: N host devices on CPU, and XLA's memory-minimising CPU scheduler.
    use_host_devices(args.devices)
    import jax.numpy as jnp

    from fedprompt import bench
    from fedprompt.backbones.abstract import abstract_backbone
    from fedprompt.bench import ANALYSIS_COMPILER_OPTIONS, format_step_memory_report, step_memory_report

    backbone = abstract_backbone(args.abstract, dtype=jnp.dtype(args.dtype))
    remat = {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]
    report = step_memory_report(
        backbone,
        batch_size=4 if args.batch_size is None else args.batch_size,
        tokens=512 if args.tokens is None else args.tokens,
        devices=args.devices,
        task=args.task,
        remat=remat,
        compiler_options=ANALYSIS_COMPILER_OPTIONS,
    )
    report["machine"] = bench.machine()
    text = format_step_memory_report(report) + "\nmachine: " + bench.machine_line(report["machine"])
    return _bench_report(args, report, text)


def add_bench_commands(bench_sub) -> None:
    """``bench aggregate``, ``bench train``, ``bench kernels``, ``bench memory``."""
    mem = bench_sub.add_parser(
        "memory", help="compiled memory of client steps; --abstract: a 7B/70B prompt-tuning step, remat on/off",
        description="Without --abstract: compiled memory of gradient-free client steps vs inference and a gradient "
                    "step of --backbone. With --abstract NAME: a prompt-tuning step of a shape-only backbone "
                    "(llama-7b, llama-70b, qwen2-0.5b; nothing downloaded or allocated), compiled for one device or "
                    "with the weights split over --devices N, with and without remat; XLA's per-device memory "
                    "analysis (on CPU: its buffer assignment for N forced host devices).")
    source = mem.add_mutually_exclusive_group()
    source.add_argument("--backbone", default="minilm")
    source.add_argument("--abstract", metavar="NAME", help="llama-7b | llama-70b | qwen2-0.5b: shape-only weights")
    mem.add_argument("--batch-size", type=int, default=None, help="default 16 (4 with --abstract)")
    mem.add_argument("--tokens", type=int, default=None, help="default 64 (512 with --abstract)")
    mem.add_argument("--devices", type=int, default=1, help="--abstract: split the weights over N devices (forced host devices on CPU)")
    mem.add_argument("--remat", choices=("both", "on", "off"), default="both", help="--abstract: which steps to compile")
    mem.add_argument("--task", choices=("classification", "lm"), default="classification",
                     help="--abstract: a linear head on the last token, or the causal LM loss (vocabulary logits)")
    mem.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="--abstract: weight dtype")
    mem.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    mem.set_defaults(func=cmd_bench_memory)
    agg = bench_sub.add_parser("aggregate", help="compiled aggregation vs a NumPy (Flower-style) weighted sum, GB/s")
    agg.add_argument("--clients", type=_int_list, default=[10, 100, 1000], help="comma-separated client counts")
    agg.add_argument("--shapes", default="20x384,100x4096", help="comma-separated prompt shapes, e.g. 20x384,100x4096")
    agg.add_argument("--repeats", type=int, default=5)
    agg.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    agg.set_defaults(func=cmd_bench_aggregate)
    train = bench_sub.add_parser("train", help="train step FLOP/s against this machine's matmul FLOP/s (and PEFT)")
    train.add_argument("--backbone", default="minilm")
    train.add_argument("--method", default="prompt", choices=["prompt", "prefix"])
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--tokens", type=int, default=64)
    train.add_argument("--virtual-tokens", type=int, default=20)
    train.add_argument("--steps", type=int, default=20, help="timed steps of each library (in turns of two)")
    train.add_argument("--matmul-n", type=int, default=2048, help="the size of the square matmul that measures the peak")
    train.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                       help="weights and activations of both steps (the prompt stays float32)")
    train.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    train.set_defaults(func=cmd_bench_train)
    kern = bench_sub.add_parser("kernels", help="Pallas kernels vs their XLA references (timed on GPU/TPU only)")
    kern.add_argument("--repeats", type=int, default=5)
    kern.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    kern.set_defaults(func=cmd_bench_kernels)


# ----------------------------------------------------------------------------- prompt artifacts


def _artifact_warnings(caught) -> None:
    for warning in caught:
        print(f"fedprompt: warning: {warning.message}", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedprompt.wire.artifact import load_prompt

    described = load_prompt(args.file).describe()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    b, task, training = described["backbone"], described["task"], described["training"]
    config = described["prompt_config"]
    init = config["init"] or ("sample_vocab" if described["method"] == "prompt" else "random")
    what = f"{config['num_virtual_tokens']} virtual tokens" + (", reparameterized" if config["reparameterize"] else "") + f", init {init}"
    arch = ", ".join(text for text, v in ((b["model_type"], b["model_type"]), (f"{b['num_layers']} layers", b["num_layers"]),
                                          (f"width {b['hidden_size']}", b["hidden_size"])) if v is not None)
    if task is None:
        task_text = "none recorded"
    elif task["type"] == "causal_lm":
        task_text = "causal language modelling"
    else:
        names = task["label_names"]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "") if names else "unnamed"
        how = "verbalizer" if task["verbalizer"] else f"{task['pooling'] or 'default'} pooling + linear head"
        task_text = f"sequence classification, {task['num_labels']} labels ({how}): {shown}"
    epsilon = training.get("privacy_epsilon")
    train_text = ", ".join(str(x) for x in (
        training.get("algorithm"),
        None if training.get("rounds") is None else f"{training['rounds']} rounds",
        None if training.get("clients") is None else f"{training['clients']} clients",
        "no differential privacy" if epsilon is None else f"differential privacy epsilon = {epsilon}",
    ) if x is not None)
    extra = {k: v for k, v in training.items() if k not in ("algorithm", "rounds", "clients", "privacy_epsilon")}
    rows = [
        ("file", f"{args.file} ({described['file_bytes']:,} bytes, schema {described['schema_version']})"),
        ("checksum", described["checksum"]),
        ("created", described["created"]),
        ("method", f"{described['method']}: {what}"),
        ("backbone", f"{b['name']} ({arch})" + (f" at {b['path']}" if b["path"] else "")),
        ("fingerprint", b["fingerprint"]),
        ("tokenizer", f"sha256 {b['tokenizer_hash']}" if b["tokenizer_hash"] else "no hash recorded"),
        ("task", task_text),
        ("training", train_text + (f"; {json.dumps(extra)}" if extra else "")),
        ("storage", described["storage"]),
        ("parameters", f"{described['parameters']:,}"),
    ]
    for name, tensor in described["tensors"].items():
        rows.append(("tensors" if name == next(iter(described["tensors"])) else "",
                     f"{name} {tensor['shape']} stored {tensor['storage']} (restored as {tensor['dtype']})"))
    if described["metadata"]:
        rows.append(("metadata", json.dumps(described["metadata"])))
    for key, value in rows:
        print(f"{key:<12} {value}")
    return 0


def _artifact_backbone(artifact, override: str | None):
    """The backbone to apply an artifact to: --backbone, else the recorded folder, else the recorded name."""
    from fedprompt.backbones.loading import load_backbone
    from fedprompt.errors import ModelNotFoundError

    if override is not None:
        return load_backbone(override)
    recorded = artifact.backbone
    candidates = [c for c in (recorded.path, recorded.name) if c]
    for candidate in candidates:
        try:
            return load_backbone(candidate)
        except ModelNotFoundError:
            continue
    raise ModelNotFoundError(
        f"cannot find the backbone the prompt was trained on ({' or '.join(map(repr, candidates))}); pass --backbone"
    )


def cmd_apply(args: argparse.Namespace) -> int:
    import warnings

    import jax
    import numpy as np

    from fedprompt.errors import ConfigError, InputError
    from fedprompt.wire.artifact import check_backbone, load_prompt

    artifact = load_prompt(args.file)
    backbone = _artifact_backbone(artifact, args.backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_backbone(artifact, backbone, force=args.force)
    _artifact_warnings(caught)
    prompt = artifact.materialize(backbone.config)
    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    classify = artifact.task is not None and artifact.task.type == "sequence_classification" and not args.generate
    if not classify:
        if not backbone.is_decoder:
            reason = "--generate needs a decoder backbone" if args.generate else "the prompt has no classification task"
            raise ConfigError(f"{reason}: {backbone.name!r} is an encoder and cannot generate text")
        return _apply_generate(args, artifact, backbone, prompt)
    task = artifact.task.to_task().resolve(backbone)
    n_soft = artifact.prompt_config.num_virtual_tokens if artifact.method == "prompt" else 0
    limit = backbone.config.max_positions
    max_length = args.max_length if limit is None else min(args.max_length, limit - n_soft)
    batch = backbone.tokenize(list(args.text), max_length, num_virtual=n_soft)
    for index, text in enumerate(args.text, start=1):
        tokens = len(backbone.tokenizer(text)["input_ids"])
        if tokens > max_length:
            cap = "--max-length" if max_length == args.max_length else "the backbone's positions"
            print(f"fedprompt: warning: text {index} has {tokens} tokens and was cut to {max_length} ({cap})",
                  file=sys.stderr)
    output = backbone.forward(batch["input_ids"], batch["attention_mask"], prompt, with_logits=task.needs_logits())
    probs = np.asarray(jax.nn.softmax(task.logits(artifact.head, output), axis=-1))
    names = artifact.label_names or tuple(str(i) for i in range(task.num_labels))
    results = []
    for text, row in zip(args.text, probs):
        order = np.argsort(-row)
        top = order[: args.top]
        results.append({"text": text, "label": names[order[0]], "probabilities": {names[i]: float(row[i]) for i in top}})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(f"{result['label']}\t{result['text']}")
        for name, p in result["probabilities"].items():
            print(f"  {p:7.4f}  {name}")
    return 0


def _apply_generate(args: argparse.Namespace, artifact, backbone, prompt) -> int:
    """Generate after each text; a prompt trained on instruction data (``fedprompt run --task
    generate``) reads each text laid out as in training."""
    import jax
    import numpy as np

    from fedprompt.data import instructions
    from fedprompt.federation.records import INSTRUCTION_FORMAT

    from fedprompt.errors import InputError
    from fedprompt.inference.generate import generate

    tokenizer = backbone.tokenizer
    if tokenizer is None:
        raise InputError(f"backbone {backbone.name!r} has no tokenizer")
    results = []
    instruction = artifact.training.get("prompt_format") == INSTRUCTION_FORMAT
    for index, text in enumerate(args.text):
        ids = instructions.format_prompt(backbone, text) if instruction else list(tokenizer(text)["input_ids"])
        if not ids:
            raise InputError(f"the text {text!r} tokenizes to no tokens")
        tokens = generate(
            backbone, prompt, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, key=jax.random.key(args.seed + index),
            eos_token_id=tokenizer.eos_token_id,
        )[0]
        results.append({"text": text, "generated": tokenizer.decode(tokens.tolist(), skip_special_tokens=True),
                        "tokens": tokens.tolist()})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(f"{result['text']}{result['generated']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from fedprompt.wire.artifact import load_prompt
    from fedprompt.wire.peft import export_peft

    artifact = load_prompt(args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_peft(artifact, args.out, base_model_name_or_path=args.base_model, task_type=args.task_type)
    _artifact_warnings(caught)
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {out}/: {' '.join(written)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import warnings

    from fedprompt.backbones.loading import load_backbone
    from fedprompt.errors import ConfigError, PromptMismatchError
    from fedprompt.prompts import check_prompt_params
    from fedprompt.tasks import CausalLM
    from fedprompt.wire.artifact import save_prompt
    from fedprompt.wire.peft import read_peft_adapter

    adapter = read_peft_adapter(args.dir)
    source = args.backbone or adapter.base_model_name_or_path
    if not source:
        raise ConfigError("the adapter names no base model; pass --backbone")
    backbone = load_backbone(source)
    check_prompt_params(adapter.prompt_config, adapter.params, backbone)
    task = adapter.task
    if adapter.fingerprint not in (None, backbone.fingerprint):
        text = f"the adapter's head was trained on a backbone with fingerprint {adapter.fingerprint}, not {backbone.fingerprint}"
        if not args.force:
            raise PromptMismatchError(f"{text}; pass --force to import it anyway")
        print(f"fedprompt: warning: {text}; importing it anyway (forced)", file=sys.stderr)
    if task is None and adapter.task_type == "CAUSAL_LM" and backbone.is_decoder:
        task = CausalLM()
    if adapter.extra_tensors:
        print(f"fedprompt: note: not imported: {', '.join(adapter.extra_tensors)} (PEFT's own classifier pools "
              "differently from fedprompt's head)", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_prompt(
            args.out, {"prompt": adapter.params, "head": adapter.head}, config=adapter.prompt_config, backbone=backbone,
            task=task, storage=args.storage,
            metadata={"imported_from": "peft", "peft_task_type": adapter.task_type,
                      "peft_base_model": adapter.base_model_name_or_path},
        )
    _artifact_warnings(caught)
    print(f"wrote {path} ({path.stat().st_size:,} bytes): {adapter.config['peft_type']} adapter, "
          f"{adapter.prompt_config.num_virtual_tokens} virtual tokens, on {backbone.name}")
    return 0


def add_artifact_commands(sub) -> None:
    """``inspect``, ``apply``, ``export`` and ``import``: the prompt artifact (``.fpp``) on the command line."""
    inspect = sub.add_parser("inspect", help="show a prompt artifact's metadata")
    inspect.add_argument("file", help="a .fpp prompt artifact")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)

    apply = sub.add_parser("apply", help="classify texts with a prompt, or generate with a decoder backbone")
    apply.add_argument("file", help="a .fpp prompt artifact")
    apply.add_argument("--text", action="append", required=True, help="an input text (repeat for several)")
    apply.add_argument("--backbone", help="the backbone (default: the one recorded in the artifact)")
    apply.add_argument("--force", action="store_true", help="apply even if the backbone's fingerprint differs")
    apply.add_argument("--json", action="store_true", help="print JSON")
    apply.add_argument("--max-length", type=int, default=128, help="classification: tokens per text")
    apply.add_argument("--top", type=int, default=5, help="classification: how many labels to list (also with --json)")
    apply.add_argument("--generate", action="store_true", help="generate even if the prompt has a classification task")
    apply.add_argument("--max-new-tokens", type=int, default=32, help="generation: tokens to generate")
    apply.add_argument("--temperature", type=float, default=0.0, help="generation: 0 is greedy")
    apply.add_argument("--top-k", type=int, default=None, help="generation: sample from the k most likely tokens")
    apply.add_argument("--seed", type=int, default=0, help="generation: the sampling seed")
    apply.set_defaults(func=cmd_apply)

    export = sub.add_parser("export", help="export a prompt artifact (as a PEFT adapter)")
    export.add_argument("file", help="a .fpp prompt artifact")
    export.add_argument("--format", choices=["peft"], required=True, help="the output format")
    export.add_argument("--out", required=True, metavar="DIR", help="the adapter folder to write")
    export.add_argument("--base-model", help="PEFT's base_model_name_or_path (default: the recorded backbone)")
    export.add_argument("--task-type", choices=["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"],
                        help="PEFT task type (default: CAUSAL_LM for decoders, FEATURE_EXTRACTION for encoders)")
    export.set_defaults(func=cmd_export)

    imp = sub.add_parser("import", help="import a PEFT prompt-tuning or prefix-tuning adapter as a .fpp")
    imp.add_argument("dir", help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    imp.add_argument("--out", required=True, metavar="FILE", help="the .fpp to write")
    imp.add_argument("--backbone", help="the backbone (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--storage", choices=["float16", "float32", "int8"], default="float16", help="tensor storage")
    imp.add_argument("--force", action="store_true", help="import even if fedprompt's head was made for another backbone")
    imp.set_defaults(func=cmd_import)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run federated prompt tuning (built-in default without arguments)",
                         description="Federated prompt tuning. Flags override --config; a folder that holds a "
                                     "finished run is replaced only with --overwrite.")
    run.add_argument("--config", metavar="TOML", help="a TOML file of settings; flags override it")
    for f in run_flags():
        if f.type is bool:
            run.add_argument(f.flag, dest=f.field, action="store_true", help=f.help_with_default)
        else:
            run.add_argument(f.flag, dest=f.field, type=f.type, default=None, help=f.help_with_default,
                             metavar=_METAVARS.get(f.field) or _METAVARS[f.type.__name__])
    run.add_argument("--no-progress", action="store_true",
                     help="print no progress (default: a bar on a terminal, one line per round elsewhere)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run --out holds (deleted only once this run has finished)")
    again.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR with its own settings")
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
    sim.add_argument("--clients", type=_int_list, default=[8, 32],
                     help="comma-separated clients per round, e.g. 8,32,128,512")
    sim.add_argument("--memory-clients", type=_int_list, default=[8, 32, 128, 512],
                     help="block sizes for the compiled memory analysis (compiled, not run); empty to skip")
    sim.add_argument("--local-steps", type=int, default=4)
    sim.add_argument("--client-block", default="auto",
                     help="clients per vmapped program: auto (the engine's choice), a number, or 0: all")
    sim.add_argument("--repeats", type=int, default=3)
    sim.add_argument("--loops", default="per_client,per_step",
                     help="the loops timed beside the engine: per_client, per_step (comma-separated; empty: none)")
    sim.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    sim.set_defaults(func=cmd_bench_simulate)
    add_bench_commands(bench_sub)
    add_artifact_commands(sub)
    compare = sub.add_parser("compare", help="several runs side by side: accuracy and bytes sent, one plot")
    compare.add_argument("dirs", nargs="+", metavar="DIR", help="output folders of `fedprompt run`")
    compare.add_argument("--labels", help="comma-separated names of the runs (default: the folder names)")
    compare.add_argument("--out", metavar="PNG", help="also plot accuracy against rounds and upload")
    compare.add_argument("--json", action="store_true", help="print JSON")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error becomes one line on stderr and an exit status.

    Returns 0 on success, 2 for bad input (a :class:`~fedprompt.errors.FedPromptError`), 1 for
    an operating-system error (a full disk, a read-only or missing folder) and 130 for Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return run_command(lambda: args.func(args))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    print(f"fedprompt: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
