"""QLoRA r=16 training steps on a random-weight gpt-oss-20b-shaped model (nothing downloaded).

    python scripts/gpu/gpt_oss_step.py                      # desktune, then the transformers+peft baseline
    python scripts/gpu/gpt_oss_step.py --contender desktune --seq 1024 --steps 8

Each contender runs in its own process (clean peak-memory counters) and prints one JSON
line; the parent prints a table with the tokens/s ratio from the same run.
- desktune: experts NF4 (per expert) + grouped GEMMs, attention NF4 via bitsandbytes when
  it is installed (else 16-bit, reported), sink attention through compiled FlexAttention,
  LoRA r=16 on q/k/v/o and on both expert stacks, "unsloth" gradient checkpointing.
- transformers: GptOssForCausalLM in bf16 (bitsandbytes cannot quantise the 3-D expert
  parameters, so this baseline keeps them 16-bit), eager attention, PEFT LoRA on the same
  targets (target_parameters), gradient checkpointing. Needs ~45 GB: an H200 fits it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

GPT_OSS_20B = dict(
    num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880, intermediate_size=2880,
    head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, vocab_size=201088,
    max_position_embeddings=131072,
)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config(tiny: bool = False):
    from transformers import GptOssConfig

    if tiny:  # a CPU smoke run of this script's plumbing
        from desktune.fixtures.tiny_gpt_oss import tiny_gpt_oss_config

        return tiny_gpt_oss_config(vocab_size=GPT_OSS_20B["vocab_size"])
    return GptOssConfig(**GPT_OSS_20B)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def _desktune_model(seq: int, rank: int, tiny: bool):
    from desktune import FastLanguageModel
    from desktune.models import registry
    from desktune.models.gpt_oss import GPT_OSS
    from desktune.models.gpt_oss_load import random_gpt_oss
    from desktune.quant.bnb import bitsandbytes_problem

    quantize_attention = bitsandbytes_problem() is None
    model = random_gpt_oss(_config(tiny), torch.bfloat16, True, _device(), quantize_attention=quantize_attention)
    for param in model.parameters():
        param.requires_grad_(False)
    model.max_seq_length = seq
    registry.patch(model, GPT_OSS, seq)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing="unsloth")
    return model, {"attention": "nf4" if quantize_attention else "bf16 (no bitsandbytes)", "experts": "nf4"}


def _transformers_model(seq: int, rank: int, tiny: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    config = _config(tiny)
    config._attn_implementation = "eager"
    with torch.device(_device()):
        model = GptOssForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES,
                                             target_parameters=TARGET_PARAMETERS))
    return model, {"attention": "bf16", "experts": "bf16"}


def run(contender: str, seq: int, steps: int, rank: int, batch: int, tiny: bool = False) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    build = _desktune_model if contender == "desktune" else _transformers_model
    model, forms = build(seq, rank, tiny)
    _sync()
    load_s = time.perf_counter() - start
    loaded_gb = _peak_gb()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, GPT_OSS_20B["vocab_size"], (batch, seq), device=_device())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps):
        _sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    timed = times[2:] if len(times) > 3 else times  # the first steps compile FlexAttention / warm cuBLAS
    return {
        "contender": contender, **forms, "seq": seq, "batch": batch, "rank": rank, "load_s": round(load_s, 1),
        "weights_gb": loaded_gb, "peak_train_gb": _peak_gb(),
        "step_s": [round(t, 3) for t in times], "tokens_per_s": round(batch * seq * len(timed) / sum(timed), 1),
        "losses": losses, "trainable_params": sum(p.numel() for p in params),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (tiny smoke run)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=["both", "desktune", "transformers"], default="both")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny config: a CPU smoke run of the script itself")
    args = parser.parse_args()
    if args.contender != "both":
        print(json.dumps(run(args.contender, args.seq, args.steps, args.rank, args.batch, args.tiny)), flush=True)
        return
    rows = []
    for contender in ("desktune", "transformers"):
        cmd = [sys.executable, __file__, "--contender", contender, "--seq", str(args.seq), "--steps",
               str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"{contender} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    if rows:
        print(f"\n{'contender':<13}{'experts':>8}{'attention':>24}{'weights GB':>12}{'peak GB':>9}{'tokens/s':>10}")
        for r in rows:
            print(f"{r['contender']:<13}{r['experts']:>8}{r['attention']:>24}{r['weights_gb']:>12}"
                  f"{r['peak_train_gb']:>9}{r['tokens_per_s']:>10}")
    if len(rows) == 2:
        memory = rows[0]["peak_train_gb"] / rows[1]["peak_train_gb"] if rows[1]["peak_train_gb"] else float("nan")
        print(f"\ndesktune / transformers tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x, "
              f"peak memory {memory:.2f}x (same run, {rows[0]['gpu']})")


if __name__ == "__main__":
    main()
