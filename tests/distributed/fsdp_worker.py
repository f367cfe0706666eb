"""FSDP2 QLoRA steps on a tiny model: N processes (torchrun, gloo on CPU) each see 4 / N of a
fixed batch of 4 equal-length rows, or one process (`--single`) sees all 4 without sharding.
Rank 0 writes OUT/result.json: the mean loss of each step (the same quantity in both cases,
since all rows have the same length), and the trained LoRA weights gathered to full tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    result = train(args.model, args.single, args.load_in_4bit, args.steps, adapter_dir=Path(args.out) / "adapter")
    if result is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result))


def train(model_dir: str, single: bool, load_in_4bit: bool, steps: int, adapter_dir: Path) -> dict | None:
    """Losses and LoRA weights (on rank 0; None elsewhere); the adapter saved to `adapter_dir`."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from desktune import FastLanguageModel
    from desktune.distributed import is_main_process, save_sharded_adapter, shard_model

    model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True,
                                             random_state=3407)
    device = next(model.parameters()).device
    rows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0)).to(device)
    sharded = []
    if not single:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        shard_model(model)
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = rows.chunk(world)[rank]
        sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    # SGD with a large step: the adapters move far (lora_B starts at zero) and the update stays
    # linear in the gradient, so summation-order noise stays noise
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if not single:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    lora = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            full = param.full_tensor() if isinstance(param, DTensor) else param  # a collective: every rank
            lora[name] = full.detach().float().flatten().tolist()
    if single:
        model.save_pretrained(adapter_dir)
    else:
        save_sharded_adapter(model, adapter_dir)
        dist.destroy_process_group()
    return {"losses": losses, "lora": lora, "sharded": sharded} if is_main_process() else None


if __name__ == "__main__":
    main()
