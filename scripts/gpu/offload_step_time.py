#!/usr/bin/env python
"""Step time and peak memory: offloaded vs plain checkpointing (and tiled MLP).

A Llama-3.1-8B-shaped model (random bf16 weights; 4-bit needs bitsandbytes, which
the GPU machine may lack, and does not change what is compared), LoRA r=16 on all
projections, batch 1. For each sequence length, alternating modes, it times full
steps (forward, backward, AdamW) after warm-up and prints the median and the
peak allocated memory; the target is offload <= 1.05 x plain at 2k tokens.

    python scripts/gpu/offload_step_time.py [--seq 2048 16384] [--steps 5] [--layers 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from desktune.memory.checkpointing import apply_gradient_checkpointing  # noqa: E402
from desktune.memory.tiled_mlp import TiledMLPConfig, set_tiled_mlp  # noqa: E402
from desktune.models import patches  # noqa: E402


def build(layers: int, device: str = "cuda"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    for module in model.modules():
        if type(module).__name__ == "LlamaMLP":
            patches.patch_gated_mlp(module, "silu", TiledMLPConfig())
    patches.patch_causal_lm_loss(model, None)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(model, optimizer, ids, steps: int) -> tuple[float, int]:
    times = []
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() if cuda else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = parser.parse_args()
    model = build(args.layers, args.device)
    base = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    modes = [("plain", True, None), ("offload", "unsloth", None),
             ("offload+tiled", "unsloth", TiledMLPConfig(min_tokens=1024))]
    for seq in args.seq:
        ids = torch.randint(0, 128256, (1, seq), device=args.device)
        results = {}
        for warm_up in (True, False):  # a warm-up round (allocator, kernels, pinned cache), then the timed one
            for name, mode, tiling in modes:
                apply_gradient_checkpointing(base, mode)
                set_tiled_mlp(model, tiling)
                timed = time_steps(model, optimizer, ids, 1 if warm_up else args.steps)
                if not warm_up:
                    results[name] = timed
        plain_s = results["plain"][0]
        for name, (seconds, peak) in results.items():
            row = {"seq": seq, "mode": name, "step_s": seconds, "tokens_per_s": seq / seconds,
                   "vs_plain": seconds / plain_s, "peak_gib": peak / 2**30}
            rows.append(row)
            print(f"seq {seq:>6}  {name:<14} step {seconds * 1000:8.1f} ms  {row['tokens_per_s']:9.0f} tok/s  "
                  f"x{row['vs_plain']:.3f} of plain  peak {row['peak_gib']:.2f} GiB", flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {gpu}, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
