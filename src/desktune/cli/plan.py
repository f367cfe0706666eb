"""`desktune plan`: the longest sequence expected to train in a GPU memory budget,
before training (formula: docs/long-context.md, code: desktune.memory.planner)."""

from __future__ import annotations

import argparse
import json

from desktune.errors import DesktuneError, ModelPathError

_CHECKPOINTING = {"unsloth": "unsloth", "offload": "offload", "true": True, "false": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="longest context expected to fit a GPU memory budget",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder (with config.json), cached hub id, or a bench shape "
                                 "(llama-3.1-8b, qwen3-8b, gemma-3-12b)")
    p.add_argument("--budget-gib", type=float, action="append",
                   help="GPU memory budget in GiB (repeatable; default: this GPU's free memory)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--quantization", choices=("nf4", "int8", "16bit"), default="nf4",
                   help="base weights: nf4 (load_in_4bit, default), int8 (load_in_8bit) or 16bit")
    p.add_argument("--checkpointing", choices=tuple(_CHECKPOINTING), default="unsloth",
                   help="use_gradient_checkpointing mode (default unsloth = offloaded)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--host-ram-gib", type=float,
                   help="host RAM the offloaded checkpoints may use (default: what is free here, minus a reserve)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=run)


def load_config(name: str):
    """A transformers config from a bench shape name, a folder or a cached hub id."""
    from desktune.bench import shapes

    if name in shapes.SHAPES:
        return shapes.build_config(name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelPathError(
            f"cannot read a model config from {name!r}: pass a folder with config.json, a hub id in the local "
            f"cache, or one of {', '.join(s for s in shapes.SHAPES if s != 'tiny')}"
        ) from exc


def _budgets(args) -> list[int]:
    if args.budget_gib:
        if any(b <= 0 for b in args.budget_gib):
            raise DesktuneError("--budget-gib must be positive")
        return [int(b * (1 << 30)) for b in args.budget_gib]
    import torch

    if not torch.cuda.is_available():
        raise DesktuneError("no CUDA GPU here to measure free memory: pass --budget-gib, e.g. --budget-gib 32")
    free, _ = torch.cuda.mem_get_info()
    return [int(free)]


def run(args: argparse.Namespace) -> int:
    from desktune.memory import planner
    from desktune.memory.host import usable_host_bytes

    config = load_config(args.model)
    settings = planner.PlanSettings(lora_rank=args.rank, quantization=args.quantization,
                                    checkpointing=_CHECKPOINTING[args.checkpointing], batch_size=args.batch_size)
    host = int(args.host_ram_gib * (1 << 30)) if args.host_ram_gib is not None else usable_host_bytes()
    plans = [planner.plan(config, budget, settings, host_bytes=host) for budget in _budgets(args)]
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
        return 0
    print(f"{args.model}: LoRA r={args.rank}, {args.quantization} base weights, "
          f"use_gradient_checkpointing={_CHECKPOINTING[args.checkpointing]!r}, batch {args.batch_size}")
    first = plans[0]
    print("fixed: " + ", ".join(f"{k} {v / (1 << 30):.2f} GiB" for k, v in first.fixed.items()))
    for p in plans:
        costs = ", ".join(f"{k} {v / 1024:.1f}" for k, v in p.per_token.items())
        line = (f"budget {p.budget_bytes / (1 << 30):6.1f} GiB -> max_seq_length {p.max_seq_length:>9,}"
                f"   per token {p.per_token_bytes / 1024:.1f} KiB ({costs}; MLP tiles {p.mlp_tiles})")
        pinned = p.host_bytes_per_token * p.max_seq_length * args.batch_size
        if pinned:
            line += f"; host RAM for checkpoints {pinned / (1 << 30):.1f} GiB"
            if p.limited_by == "host":
                line += " (limited by this machine's free host RAM, not the GPU)"
        print(line)
    return 0
