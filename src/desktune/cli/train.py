"""`desktune train CONFIG [section.key=value ...]`: a headless training run from a YAML config.

CONFIG is a YAML file or the name of an example shipped with desktune
(`desktune train --list-configs`). Overrides use dotted keys, e.g.
`training.max_steps=200 data.path=/workspace/data.jsonl`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train from a YAML config (headless, resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML config file, or the name of a packaged example")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a config value")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint folder")
    parser.add_argument("--list-configs", action="store_true", help="list the example configs and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=main)


def _resolve_config_path(name: str) -> Path:
    from desktune.train.config import packaged_configs

    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    examples = packaged_configs()
    if name in examples:
        return examples[name]
    return path  # load_config reports it missing


def main(args) -> int:
    from desktune.distributed import is_main_process, quiet_other_ranks
    from desktune.errors import DesktuneError, GPUOutOfMemoryError
    from desktune.log import logger
    from desktune.train.config import dump_config, load_config, packaged_configs

    if args.list_configs:
        for name, path in sorted(packaged_configs().items()):
            print(f"{name:28s} {path}")
        return 0
    if args.config is None:
        logger.error("give a config file (or an example name from `desktune train --list-configs`)")
        return 2
    # `desktune train key=value` with no file: every value from the defaults plus overrides
    config_path, overrides = args.config, list(args.overrides)
    if "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [args.config, *overrides]
    quiet_other_ranks()
    try:
        config = load_config(_resolve_config_path(config_path) if config_path else None, overrides)
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        from desktune.train.runner import run

        result = run(config, resume=args.resume_from or args.resume)
    except DesktuneError as err:
        logger.error("%s", err)
        if isinstance(err, GPUOutOfMemoryError):
            logger.error(
                "in the config these are training.per_device_train_batch_size, "
                "training.gradient_accumulation_steps, model.max_seq_length, lora.gradient_checkpointing, "
                "quantization.load_in_4bit and lora.r; change one and continue with --resume"
            )
        return 1
    except KeyboardInterrupt:
        from desktune.train.checkpoints import last_checkpoint

        last = last_checkpoint(config.output.dir)
        where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        logger.error("interrupted: %s; continue with the same command and --resume", where)
        return 130
    if not is_main_process():  # under torchrun / accelerate launch rank 0 reports for the job
        return 0
    last = f", last loss {result.losses[-1][1]:.4f}" if result.losses else ""
    print(f"trained {result.global_step} steps{last}; run folder: {result.output_dir}")
    if result.final_dir:
        print(f"adapter: {result.final_dir}")
    return 0
