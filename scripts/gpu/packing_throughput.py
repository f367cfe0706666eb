#!/usr/bin/env python
"""Padding-free packing vs padded batches: real tokens per second and loss.

Alpaca-like lengths (log-normal, clipped to 50..500 tokens, random order), batches
of --batch examples. Three ways through the same model (Llama-3.1-8B shape by
default, random bf16 weights, LoRA r=16 on all projections, offloaded
checkpointing): right-padded with an attention mask; packed into one row with
SDPA (transformers' block-diagonal mask); packed with desktune's varlen flash
attention. Counts only real tokens. The issue's target: packed >= 2x padded.

    python scripts/gpu/packing_throughput.py [--batch 16] [--batches 12] [--layers 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from desktune.data.packing import PaddingFreeCollator  # noqa: E402
from desktune.memory.checkpointing import apply_gradient_checkpointing  # noqa: E402
from desktune.models import attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_step_time import build  # noqa: E402


def alpaca_like_lengths(count: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(count, generator=g) * 0.6 + 5.0)  # median ~150 tokens
    return lengths.clamp(50, 500).round().int().tolist()


def padded(examples, pad_id=0):
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e)] = torch.tensor(e)
        mask[row, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(model, batches, device, steps_warmup=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens, losses = 0, []
    for i, batch in enumerate(batches):
        if i == min(steps_warmup, len(batches) - 1):
            _sync()
            start, tokens = time.perf_counter(), 0
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()  # real tokens only
    _sync()
    return tokens / (time.perf_counter() - start), losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = parser.parse_args()
    lengths = alpaca_like_lengths(args.batch * args.batches)
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(1, 128256, (n,), generator=g).tolist() for n in lengths]
    groups = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    model = build(args.layers, args.device)
    apply_gradient_checkpointing(model.get_base_model(), "unsloth")
    state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" in k})
    results = {}
    collate = PaddingFreeCollator()
    ways = [("padded", lambda grp: padded(grp), "sdpa"), ("packed sdpa", lambda grp: collate(
        [{"input_ids": e} for e in grp]), "sdpa"), ("packed varlen", lambda grp: collate(
            [{"input_ids": e} for e in grp]), attention.NAME)]
    for name, make, attn in ways:
        model.load_state_dict(state, strict=False)  # same adapters for every way
        base = model.get_base_model()
        base.config._attn_implementation = "sdpa"
        if attn == attention.NAME and not attention.use_varlen_attention(base):
            print(f"{name}: skipped (no varlen attention on this torch)")
            continue
        tps, losses = run(model, [make(grp) for grp in groups], args.device)
        results[name] = {"tokens_per_s": tps, "first_loss": losses[0]}
        print(f"{name:<14} {tps:10.0f} real tokens/s   first-batch loss {losses[0]:.5f}", flush=True)
    base_tps = results["padded"]["tokens_per_s"]
    for name, r in results.items():
        print(f"{name:<14} x{r['tokens_per_s'] / base_tps:.2f} of padded")
    pad_fraction = 1 - sum(lengths) / sum(len(g) * max(len(e) for e in g) for g in groups)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"padding in padded batches: {pad_fraction:.0%}; device {gpu}, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "pad_fraction": pad_fraction}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
