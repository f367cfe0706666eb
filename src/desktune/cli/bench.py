"""`desktune bench`: training throughput (and with --context, the longest context per memory budget)
of desktune against transformers + peft + bitsandbytes, Liger-Kernel and Unsloth, each in its own process,
on one random-weight model of a real architecture (nothing is downloaded)."""

from __future__ import annotations

import argparse
import shlex
import sys


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    from desktune.bench.contenders import CONTENDERS
    from desktune.bench.shapes import SHAPES

    p = subparsers.add_parser("bench", help="benchmark training speed and memory against the other libraries",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", choices=list(SHAPES), help="model shape (random weights)")
    p.add_argument("--contenders", type=_csv(str), default=tuple(CONTENDERS),
                   help="comma-separated; those not installed are skipped and listed")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the throughput run")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--cache-dir", default="~/.cache/desktune/bench", help="where the model folder is written once")
    p.add_argument("--out", default="bench-results", help="folder for bench.json, the CSVs, the chart and logs")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="run the throughput steps under this GPU memory budget too")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop starting work after this many seconds; what did not run is listed as skipped")
    p.add_argument("--worker-timeout", type=float, default=1800, metavar="S", help="limit for one worker process")
    c = p.add_argument_group("context search (--context)")
    c.add_argument("--context", action="store_true", help="also find the longest context per memory budget")
    c.add_argument("--no-throughput", action="store_true", help="with --context: skip the throughput table")
    c.add_argument("--budgets", type=_csv(float), default=(8, 12, 16, 24, 32, 48, 80), help="GiB, in the order run")
    c.add_argument("--context-contenders", type=_csv(str), default=None,
                   help="contenders of the context search, in the order run (default: --contenders)")
    c.add_argument("--ranks", type=_csv(int), default=(32, 16), help="LoRA ranks, in the order run")
    c.add_argument("--tolerance", type=float, default=0.01, help="stop when the bracket is this narrow (relative)")
    c.add_argument("--start-length", type=int, default=1024, help="first probe length")
    c.add_argument("--max-length", type=int, default=1 << 20, help="longest length probed")
    c.add_argument("--max-probes", type=int, default=14, help="probes per cell at most")
    c.add_argument("--cell-time", type=float, default=900, metavar="S", help="time per cell at most")
    c.add_argument("--plot", action="store_true", help="write context.png (matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from desktune.bench import report as report_mod
    from desktune.bench.contenders import get_contender
    from desktune.bench.runner import BenchSettings, ContextSettings
    from desktune.bench.runner import run as run_bench

    for name in args.contenders + (args.context_contenders or ()):
        get_contender(name)  # an unknown name fails here, before anything runs
    settings = BenchSettings(
        shape=args.model, contenders=args.contenders, batch_size=args.batch_size, seq_len=args.seq_len,
        rank=args.rank, steps=args.steps, warmup=args.warmup, dtype=args.dtype, seed=args.seed,
        cache_dir=args.cache_dir, out_dir=args.out, device=args.device, throughput=not args.no_throughput,
        throughput_budget_gib=args.memory_budget, worker_timeout_s=args.worker_timeout, time_limit_s=args.time_limit,
        command="desktune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    ctx = None
    if args.context:
        ctx = ContextSettings(budgets_gib=args.budgets, ranks=args.ranks, tolerance=args.tolerance,
                              start=args.start_length, max_length=args.max_length, max_probes=args.max_probes,
                              cell_time_s=args.cell_time, plot=args.plot, contenders=args.context_contenders)
    report = report_mod.add_summary(run_bench(settings, ctx))
    paths = report_mod.write(report, args.out, plot=bool(ctx and ctx.plot))
    print(report_mod.format_text(report), flush=True)
    print("\nwritten: " + ", ".join(str(p) for p in paths), flush=True)
    failed = [r for r in report["throughput"] if r.get("status") == "failed"]
    return 1 if failed else 0
