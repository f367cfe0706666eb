"""FastLanguageModel: the public surface, call-compatible with Unsloth's.

Thin on purpose: it wires models.loader (load + patch), lora (adapters, saving) and
export (merging, GGUF) together and attaches the save helpers to the one model
instance it returns.
"""

from __future__ import annotations

import types

import torch

from desktune.distributed import is_main_process, quiet_other_ranks
from desktune.lora.fast_lora import patch_qlora_layers
from desktune.lora.peft_setup import LoraSettings, add_lora
from desktune.lora.save import save_adapter
from desktune.memory.checkpointing import apply_gradient_checkpointing
from desktune.models import loader, registry


def is_bfloat16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
    from desktune.export.merge import save_merged

    if not is_main_process():  # under torchrun every rank holds the same model: rank 0 writes it
        return None

    return save_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)


def _save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs):
    from desktune.export.gguf import save_pretrained_gguf

    if not is_main_process():
        return None

    return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


def _attach_save_methods(peft_model) -> None:
    original_save = peft_model.save_pretrained

    def save_pretrained(self, save_directory, **kwargs):
        """PEFT's adapter save, refusing a folder of another model and writing atomically (rank 0 only)."""
        if not is_main_process():
            return None
        return save_adapter(self, save_directory, original_save, **kwargs)

    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    peft_model.save_pretrained_merged = types.MethodType(_save_pretrained_merged, peft_model)
    peft_model.save_pretrained_gguf = types.MethodType(_save_pretrained_gguf, peft_model)


class FastLanguageModel:
    """Load, adapt and save causal language models for fast LoRA / QLoRA training."""

    @staticmethod
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.1-8B-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map=None,
        trust_remote_code: bool = False,
        use_gradient_checkpointing="unsloth",
        fallback_to_transformers: bool = False,
        **kwargs,
    ):
        """(model, tokenizer). `model_name` is a local folder or a hub id in the HF cache.

        dtype=None: bf16 where the GPU supports it, else fp16; float32 on the CPU.
        load_in_4bit: NF4 with double quantisation (QLoRA). full_finetuning=True
        trains all weights in 16-bit (and ignores the quantisation flags).
        use_gradient_checkpointing applies to full fine-tuning; LoRA takes it in
        get_peft_model.
        """
        quiet_other_ranks()  # under torchrun / accelerate launch only rank 0 logs desktune's progress
        ignored = sorted(set(kwargs) - {"rope_scaling", "fix_tokenizer", "use_exact_model_name", "revision"})
        if ignored:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(ignored)}")
        request = loader.LoadRequest(
            model_name=model_name,
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            full_finetuning=full_finetuning,
            token=token,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            fallback_to_transformers=fallback_to_transformers,
        )
        model, tokenizer = loader.load(request)
        if full_finetuning:
            apply_gradient_checkpointing(model, use_gradient_checkpointing)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing="unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config=None,
        modules_to_save=None,
        layers_to_transform=None,
        max_seq_length: int | None = None,
        **kwargs,
    ):
        """Add LoRA adapters (PEFT's) to every target projection; returns the PeftModel."""
        if max_seq_length is not None:
            model.max_seq_length = loader.validate_max_seq_length(max_seq_length)
        settings = LoraSettings(
            r=r,
            target_modules=tuple(target_modules) if isinstance(target_modules, list) else target_modules,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            use_rslora=use_rslora,
            loftq_config=loftq_config,
            modules_to_save=tuple(modules_to_save) if modules_to_save else None,
            layers_to_transform=tuple(layers_to_transform) if isinstance(layers_to_transform, list) else layers_to_transform,
            extra=kwargs,
        )
        peft_model = add_lora(model, settings, registry.default_target_modules(model.config))
        patches = getattr(model, "_desktune_patches", None)
        if patches is not None:  # fallback models keep PEFT's own layers
            patches["qlora_linear"] = patch_qlora_layers(peft_model)
        peft_model.max_seq_length = model.max_seq_length
        _attach_save_methods(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        """Eval mode with the KV cache on, for generate()."""
        model.eval()
        _base(model).config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Back to training mode after for_inference."""
        model.train()
        _base(model).config.use_cache = not use_gradient_checkpointing
        return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model

