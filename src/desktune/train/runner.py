"""Run a training job from a TrainConfig: load, adapt, prepare data, train, save.

The run folder (`output.dir`) holds everything a run makes:
    config.yaml           the resolved config (what was really run)
    checkpoint-N/         atomic checkpoints every training.save_steps steps
    tensorboard/          TensorBoard event files
    metrics.jsonl         every logged step (loss, learning rate, grad norm, tokens)
    final/                the trained adapter (or full model) and tokenizer
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from desktune.log import logger
from desktune.train.config import TrainConfig, dump_config

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "float32": "float32"}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    global_step: int
    losses: list[tuple[int, float]]  # (step, loss) of every logged step, resumed runs included
    resumed_from: Path | None


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    key = _DTYPES.get(name.lower())
    if key is None:
        from desktune.errors import TrainConfigError

        raise TrainConfigError(f"model.dtype {name!r}: use bfloat16, float16 or float32 (or leave it empty)")
    return getattr(torch, key)


def load_model(config: TrainConfig):
    """(model with adapters or full weights trainable, tokenizer with the chat template)."""
    from desktune.api import FastLanguageModel
    from desktune.data.templates import get_chat_template

    q = config.quantization
    model, tokenizer = FastLanguageModel.from_pretrained(
        config.model.name,
        max_seq_length=config.model.max_seq_length,
        dtype=_dtype(config.model.dtype),
        load_in_4bit=q.load_in_4bit and not q.full_finetuning,
        load_in_8bit=q.load_in_8bit and not q.full_finetuning,
        full_finetuning=q.full_finetuning,
        use_gradient_checkpointing=config.lora.gradient_checkpointing,
    )
    if config.template.name:
        tokenizer = get_chat_template(tokenizer, config.template.name)
    if not q.full_finetuning:
        lora = config.lora
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing=lora.gradient_checkpointing,
            random_state=lora.random_state,
        )
    return model, tokenizer


def sft_arguments(config: TrainConfig, padding_free: bool = False):
    """TRL SFTConfig for the run (checkpoints into output.dir, our progress bar, no stock tqdm).

    padding_free (data.packing.use_padding_free decides it per model): each batch is one row
    of its examples back to back, positions restarting, no padding. prepare_dataset has
    already refused or skipped rows over max_seq_length, so TRL's own truncation is off
    then (it refuses max_length with padding-free and no packing)."""
    import torch
    from trl import SFTConfig

    t = config.training
    on_gpu = torch.cuda.is_available()
    dtype = _dtype(config.model.dtype)
    bf16 = on_gpu and (dtype == torch.bfloat16 or (dtype is None and torch.cuda.is_bf16_supported()))
    optim = t.optim
    if not on_gpu and "8bit" in optim:
        logger.info("no GPU: using adamw_torch instead of %s", optim)
        optim = "adamw_torch"
    return SFTConfig(
        output_dir=config.output.dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        max_length=None if padding_free and not config.data.packing else config.model.max_seq_length,
        packing=config.data.packing,
        padding_free=padding_free,
        bf16=bf16,
        fp16=on_gpu and not bf16 and not config.quantization.full_finetuning,
        use_cpu=not on_gpu,  # without it, processes started by torchrun on a CPU would not form one job
        report_to="none",  # TensorBoard is added as a callback with an explicit folder
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )


def build_trainer(config: TrainConfig, model=None, tokenizer=None, dataset=None):
    """The DesktuneSFTTrainer for `config` (model/tokenizer/dataset are built when not given)."""
    from desktune.data.masking import train_on_responses_only
    from desktune.data.packing import use_padding_free
    from desktune.data.pipeline import prepare_dataset
    from desktune.distributed import is_main_process
    from desktune.memory.oom import install_oom_advice
    from desktune.train.progress import TrainingProgress
    from desktune.train.trainer import DesktuneSFTTrainer

    if model is None:
        model, tokenizer = load_model(config)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        d = config.data
        dataset = prepare_dataset(
            d.path,
            tokenizer,
            format=d.format,
            max_seq_length=config.model.max_seq_length,
            on_bad_row=d.on_bad_row,
            system=d.system_prompt,
            split=d.split,
            max_rows=d.max_rows,
        )
    callbacks = []
    if config.output.tensorboard and is_main_process():  # a SummaryWriter creates its event file at once
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback
        except ImportError:
            logger.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs this run")
        else:
            callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard"))))
    padding_free = use_padding_free(model, config.training.per_device_train_batch_size, config.data.packing)
    trainer = DesktuneSFTTrainer(
        model=model,
        args=sft_arguments(config, padding_free),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    TrainingProgress.attach(trainer, metrics_file=out / "metrics.jsonl")
    install_oom_advice(trainer)  # an out-of-memory step says what to lower
    if config.template.train_on_responses_only and "messages" in dataset.column_names:
        train_on_responses_only(trainer, config.template.instruction_part, config.template.response_part)
    return trainer


def run(config: TrainConfig, resume: bool | str | Path = False) -> TrainResult:
    """Train as `config` says; `resume=True` continues from the run folder's last checkpoint."""
    from desktune.distributed import is_main_process
    from desktune.errors import TrainConfigError
    from desktune.train import checkpoints
    from desktune.train.progress import loss_history

    out = Path(config.output.dir)
    main = is_main_process()  # under torchrun / accelerate launch only rank 0 writes to the run folder
    if main:
        checkpoints.clean_staging(out)
    resume_from = None
    if resume:
        resume_from = Path(resume) if not isinstance(resume, bool) else checkpoints.last_checkpoint(out)
        if resume_from is None:
            raise TrainConfigError(f"--resume: {out} has no checkpoint-N folder to resume from; run without --resume")
        logger.info("resuming from %s", resume_from)
    elif checkpoints.list_checkpoints(out):
        raise TrainConfigError(
            f"{out} already holds checkpoints of a run: pass --resume to continue it, or choose another "
            "output.dir (e.g. output.dir=outputs/run2)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.yaml").write_text(dump_config(config))

    trainer = build_trainer(config)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    final = None
    if config.output.save_adapter and trainer.state.global_step >= trainer.state.max_steps:
        final = out / "final"
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(str(final))
            trainer.processing_class.save_pretrained(str(final))
        trainer.accelerator.wait_for_everyone()  # every process returns once final/ is complete
        logger.info("saved the trained %s to %s", "model" if config.quantization.full_finetuning else "adapter", final)
    return TrainResult(out, final, trainer.state.global_step, loss_history(trainer), resume_from)
