#!/usr/bin/env python
"""Run a notebook's code cells as a script, with its parameters overridden, and time each cell.

For machines without Jupyter (the GPU machine): the cells run in order in one namespace,
exactly as written; after the first (parameters) cell, each `--set NAME=VALUE` is applied
(VALUE is a Python literal, else a string). Figures are saved to --plots DIR as PNG.

    # notebook 1 on a random-weight Llama-3.1-8B-shaped model with the tiny in-repo dataset
    python scripts/gpu/run_notebook.py notebooks/01_quickstart_llama31_qlora.ipynb \\
        --random-llama-8b /tmp/llama8b --tiny-data --set MAX_STEPS=60 --plots $OUT

`--random-llama-8b DIR` writes (once) a bf16 model of Llama-3.1-8B's shape with random
weights and desktune's small test tokenizer to DIR and sets MODEL to it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

def make_random_llama_8b(folder: Path, layers: int | None = None) -> Path:
    """A random-weight Llama-3.1-8B-shaped folder (desktune.bench.shapes' config), written once."""
    import torch
    from transformers import AutoModelForCausalLM

    from desktune.bench.shapes import build_config
    from desktune.fixtures.tokenizer import make_tokenizer

    if (folder / "config.json").is_file():
        return folder
    t0 = time.perf_counter()
    config = build_config("llama-3.1-8b")
    if layers:
        config.num_hidden_layers = layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight in bf16: no 32 GB fp32 copy
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"[run_notebook] random Llama-3.1-8B shape: {n / 1e9:.2f}B parameters written to {folder} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    del model
    return folder


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    parser.add_argument("--random-llama-8b", type=Path, metavar="DIR", help="random-weight Llama-3.1-8B as MODEL")
    parser.add_argument("--layers", type=int, help="with --random-llama-8b: fewer layers (to check the script)")
    parser.add_argument("--tiny-data", action="store_true", help="DATASET = the tiny in-repo Alpaca file")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="save each figure there as PNG")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {name: _value(value) for name, value in overrides.items()}
    if args.random_llama_8b:
        overrides["MODEL"] = str(make_random_llama_8b(args.random_llama_8b, args.layers))
    if args.tiny_data:
        from desktune.fixtures.dataset import tiny_alpaca_path

        overrides["DATASET"] = tiny_alpaca_path()

    book = json.loads(args.notebook.read_text())
    cells = ["".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code"]
    namespace: dict = {"__name__": "__main__"}
    total = time.perf_counter()
    for i, source in enumerate(cells):
        first_line = source.strip().splitlines()[0][:70] if source.strip() else ""
        print(f"\n[run_notebook] cell {i}: {first_line}", flush=True)
        t0 = time.perf_counter()
        exec(compile(source, f"{args.notebook.name}:cell{i}", "exec"), namespace)
        if i == 0:
            unknown = sorted(set(overrides) - set(namespace))
            if unknown:
                raise SystemExit(f"--set: {', '.join(unknown)} not parameters of this notebook")
            namespace.update(overrides)
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            for number in plt.get_fignums():
                plt.figure(number).savefig(args.plots / f"{args.notebook.stem}-cell{i}-fig{number}.png", dpi=100)
            plt.close("all")
        print(f"[run_notebook] cell {i} took {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\n[run_notebook] {args.notebook.name}: {len(cells)} cells in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
