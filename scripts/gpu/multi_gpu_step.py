#!/usr/bin/env python
"""QLoRA training steps on several GPUs: DDP throughput, or an FSDP2-sharded model.

Run under torchrun (one process per GPU); with --nproc-per-node 1 it is the single-GPU baseline.

    torchrun --standalone --nproc-per-node 2 scripts/gpu/multi_gpu_step.py --mode ddp --shape llama-8b
    torchrun --standalone --nproc-per-node 2 scripts/gpu/multi_gpu_step.py --mode fsdp --shape llama-70b

The model is a random-weight Llama of the given shape built in GPU memory (a 70B checkpoint
would not fit this machine's disk): each decoder layer is made in bf16 on the GPU and turned
into bitsandbytes NF4 layers at once, then desktune patches it and adds LoRA adapters
(`FastLanguageModel.get_peft_model`) exactly as for a loaded checkpoint.
  ddp:  every GPU holds the whole model; DistributedDataParallel all-reduces LoRA gradients.
  fsdp: every GPU builds the whole 4-bit model, then `desktune.distributed.shard_model`
        (FSDP2) keeps 1/N of every weight per GPU and gathers one decoder layer at a time.
Rank 0 prints one JSON line: tokens/s over the timed steps (all GPUs together), seconds per
step, peak GPU memory (max over ranks) and, for fsdp, the memory held after sharding.
`--shape tiny --device cpu` runs the same code on a CPU with gloo (the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def build_qlora_llama(shape: str, device, max_seq_length: int, rank: int, checkpointing):
    """A random NF4 Llama of `shape` on `device`, patched by desktune, with LoRA adapters."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from desktune import FastLanguageModel
    from desktune.models import registry

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, rope_parameters=dict(_ROPE), dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(0)  # the same weights on every rank

    def materialise(module: nn.Module) -> None:
        module.to_empty(device=device, recurse=False)
        for name, param in module.named_parameters(recurse=False):
            data = torch.ones if "norm" in type(module).__name__.lower() else None
            value = data(param.shape, device=device, dtype=dtype) if data else (
                torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * 0.02)
            setattr(module, name, nn.Parameter(value, requires_grad=False))

    for module in [model.model.embed_tokens, model.model.norm, model.lm_head]:
        materialise(module)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its inv_freq is computed, not loaded
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    weight = torch.randn(child.out_features, child.in_features, device=device, dtype=dtype,
                                         generator=generator) * 0.02
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", module=q).to(device)  # quantises here
                    setattr(parent, child_name, q)
                    del weight
                elif not list(child.children()):
                    materialise(child)
    model.is_loaded_in_4bit = True  # what PEFT checks to pick its 4-bit LoRA layers
    model.max_seq_length = max_seq_length
    model._desktune_full_finetuning = False
    registry.patch(model, registry.family_for(config), max_seq_length)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank,
                                             use_gradient_checkpointing=checkpointing, random_state=3407)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--checkpointing", default="unsloth", help="true | unsloth | false")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", help="also append the JSON line to this file (rank 0)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from desktune.distributed import local_device, process_info, shard_model

    info = process_info()
    device = local_device() if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    checkpointing = {"true": True, "false": False}.get(args.checkpointing.lower(), args.checkpointing)

    t0 = time.perf_counter()
    model = build_qlora_llama(args.shape, device, args.seq, args.rank, checkpointing)
    build_s = time.perf_counter() - t0
    sharded_gib = None
    if args.mode == "fsdp":
        shard_model(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            sharded_gib = torch.cuda.memory_allocated(device) / 2**30
        train_model = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(1000 + info.rank)  # each rank its own rows
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses = []

    def step():
        rows = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=gen)
        loss = train_model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start

    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                        device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    last = losses[-1].float().clone()
    dist.all_reduce(last, op=dist.ReduceOp.AVG)
    result = {
        "mode": args.mode, "shape": args.shape, "gpus": info.world_size, "batch_per_gpu": args.batch,
        "seq": args.seq, "lora_r": args.rank, "checkpointing": args.checkpointing,
        "tokens_per_s": round(info.world_size * args.batch * args.seq * args.steps / elapsed, 1),
        "step_s": round(elapsed / args.steps, 4), "peak_gib_max_rank": round(peak.item(), 2),
        "sharded_gib": None if sharded_gib is None else round(sharded_gib, 2), "build_s": round(build_s, 1),
        "last_loss": round(last.item(), 4), "finite": bool(torch.isfinite(last).item()),
        # PEFT 4-bit LoRA layers running desktune's fused QLoRA kernel (0 would mean PEFT's own path)
        "fused_qlora_layers": model.get_base_model()._desktune_patches.get("qlora_linear", 0),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if info.is_main:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    dist.destroy_process_group()
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
