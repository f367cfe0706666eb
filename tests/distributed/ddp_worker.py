"""One training process of the distributed tests: the notebook API (FastLanguageModel + TRL's
SFTTrainer), run either alone (`python ddp_worker.py ...`) or as one of N processes under
`python -m torch.distributed.run`. Rank 0 writes `result.json` (logged losses, world size);
the adapter goes to OUT/adapter through the model's own save_pretrained, on every rank, so
the test sees that only rank 0 writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2, help="per-process batch size")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--checkpointing", default="false")
    args = parser.parse_args()

    import torch
    from trl import SFTConfig, SFTTrainer

    from desktune import FastLanguageModel, TrainingProgress, get_chat_template, prepare_dataset
    from desktune.distributed import is_main_process
    from desktune.fixtures.dataset import tiny_alpaca_path

    torch.set_num_threads(1)  # two processes share two cores
    checkpointing = {"false": False, "true": True}.get(args.checkpointing, args.checkpointing)
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=128,
                                                         load_in_4bit=args.load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing,
                                             random_state=3407)
    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    dataset = prepare_dataset(tiny_alpaca_path(), tokenizer, max_seq_length=128, max_rows=64)
    out = Path(args.out)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(out / "trainer"),
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum,
            max_steps=args.steps,
            # Plain SGD: the update is linear in the gradient, so float noise in a near-zero gradient
            # stays noise (Adam's first steps move every weight by about +-lr, whatever its sign noise)
            learning_rate=1.0,
            lr_scheduler_type="constant",
            optim="sgd",
            max_length=128,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=3407,
            data_seed=3407,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),  # without it a CPU run under torchrun is not distributed
            bf16=False,
            fp16=False,
        ),
    )
    TrainingProgress.attach(trainer, metrics_file=out / f"metrics-{os.environ.get('RANK', '0')}.jsonl", notebook=False)
    trainer.train()
    model.save_pretrained(str(out / "adapter"))
    if is_main_process():
        losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        (out / "result.json").write_text(json.dumps({"losses": losses, "world_size": trainer.args.world_size}))
    print(f"rank {os.environ.get('RANK', '0')} done", file=sys.stderr)


if __name__ == "__main__":
    main()
