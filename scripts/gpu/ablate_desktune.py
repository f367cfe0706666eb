#!/usr/bin/env python
"""Where desktune's QLoRA step time goes: one random-weight Llama-3.1-8B model, desktune's
fast paths switched off one at a time in one process, then the transformers + peft +
bitsandbytes baseline in the same run. Batch 4 x 2048, r=16 on all 7 projections, AdamW.

    python scripts/gpu/ablate_desktune.py [--steps 4] [--cache /tmp/desktune-bench-cache]

Prints tokens/s and peak GiB per variant (median step after 2 warm-ups).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 2048


def time_steps(model, steps: int) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128256, (BATCH, SEQ), generator=gen).cuda()
    model.train()
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return BATCH * SEQ / statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache", default="/tmp/desktune-bench-cache")
    args = parser.parse_args()

    import desktune.models.patches as patches
    from desktune import FastLanguageModel
    from desktune.bench.shapes import is_complete, model_folder, write_model_folder
    from desktune.lora.fast_lora import _is_peft_4bit_lora
    from desktune.memory.checkpointing import apply_gradient_checkpointing
    from desktune.memory.tiled_mlp import TiledMLPConfig, set_tiled_mlp

    folder = model_folder(args.cache, "llama-3.1-8b", 3407)
    if not is_complete(folder):
        write_model_folder("llama-3.1-8b", folder, 3407, "cuda")
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=SEQ, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, random_state=3407)
    base = model.get_base_model()
    fused_linear = {m: m.__dict__["forward"] for m in model.modules() if _is_peft_4bit_lora(m)}
    fused_mlp = patches.fused_gated_mlp
    rows = []

    def run(name: str, *, tiled=True, checkpointing="unsloth", mlp=True, linear=True):
        set_tiled_mlp(model, TiledMLPConfig() if tiled else None)
        apply_gradient_checkpointing(base, checkpointing)
        patches.fused_gated_mlp = fused_mlp if mlp else (lambda *a: None)
        for module, forward in fused_linear.items():
            if linear:
                module.forward = forward
            else:
                module.__dict__.pop("forward", None)  # PEFT's own bitsandbytes layer
        tps, peak = time_steps(model, args.steps)
        rows.append((name, tps, peak))
        print(f"{name:58s} {tps:9,.0f} tok/s  {peak:6.2f} GiB", flush=True)

    run("desktune default (offload, tiled MLP, fused MLP + linear)")
    run("  tiled MLP off", tiled=False)
    run("  tiled off, fused MLP off", tiled=False, mlp=False)
    run("  tiled off, fused MLP + linear off", tiled=False, mlp=False, linear=False)
    run("  tiled off, plain checkpointing", tiled=False, checkpointing=True)
    run("  tiled off, plain ckpt, fused MLP off", tiled=False, checkpointing=True, mlp=False)
    run("  tiled off, plain ckpt, fused MLP + linear off", tiled=False, checkpointing=True, mlp=False, linear=False)
    del model, base, fused_linear
    torch.cuda.empty_cache()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = get_peft_model(plain, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    tps, peak = time_steps(plain, args.steps)
    print(f"{'transformers + peft + bitsandbytes (same run)':58s} {tps:9,.0f} tok/s  {peak:6.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
