"""The contenders: how each one loads the benchmark model with QLoRA adapters, as its users do.

Every contender gets the same folder, NF4 with double quantisation, LoRA of the same
rank and alpha on the same projections, gradient checkpointing, and later the same
optimizer, batches and autocast. Only the library's own loading path differs.

Each loader runs inside its own worker process (worker.py), so a contender that
patches transformers classes globally (Liger, Unsloth) touches no other contender.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LoadSpec:
    model_dir: str
    max_seq_length: int
    rank: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    dtype: object  # torch.dtype
    device: str  # "cuda" or "cpu"
    seed: int


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    requires: tuple[str, ...]  # importable module names it needs
    needs_cuda: bool
    load: Callable[[LoadSpec], object]  # -> the trainable (PEFT) model
    version_of: tuple[str, ...]  # distributions whose versions the report lists for it


def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def _device_map(spec: LoadSpec):
    return {"": 0} if spec.device == "cuda" else "cpu"


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _peft_lora(model, spec: LoadSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _unsloth_style_lora(spec: LoadSpec) -> dict:
    """get_peft_model arguments shared by desktune and Unsloth (the same call signature)."""
    return dict(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=spec.seed,
    )


def load_desktune(spec: LoadSpec):
    from desktune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        spec.model_dir, max_seq_length=spec.max_seq_length, dtype=spec.dtype, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=spec.seed,
    )


def _baseline(auto_class, spec: LoadSpec):
    """bitsandbytes NF4 + SDPA + non-reentrant checkpointing + PEFT LoRA, loaded through `auto_class`."""
    model = auto_class.from_pretrained(
        spec.model_dir,
        dtype=spec.dtype,
        quantization_config=_bnb_config(spec.dtype),
        attn_implementation="sdpa",
        device_map=_device_map(spec),
    )
    _enable_checkpointing(model)
    return _peft_lora(model, spec)


def load_transformers(spec: LoadSpec):
    """The recipe every transformers + peft + bitsandbytes user has: SDPA attention, non-reentrant checkpointing.

    Not prepare_model_for_kbit_training: it casts the embedding and LM head to fp32,
    which makes the baseline slower and bigger than it needs to be.
    """
    from transformers import AutoModelForCausalLM

    return _baseline(AutoModelForCausalLM, spec)


def load_liger(spec: LoadSpec):
    """The baseline with Liger-Kernel's patches for this model type (RMSNorm, RoPE, SwiGLU, fused linear CE)."""
    from liger_kernel.transformers import AutoLigerKernelForCausalLM

    return _baseline(AutoLigerKernelForCausalLM, spec)


def load_unsloth(spec: LoadSpec):
    # worker.py imports unsloth before transformers, as Unsloth requires.
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec.model_dir, max_seq_length=spec.max_seq_length, dtype=spec.dtype, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(model, **_unsloth_style_lora(spec), max_seq_length=spec.max_seq_length)


CONTENDERS: dict[str, Contender] = {
    "desktune": Contender("desktune", "desktune", ("transformers", "peft", "bitsandbytes"), False, load_desktune,
                          ("desktune",)),
    "transformers": Contender("transformers", "transformers+peft+bnb", ("transformers", "peft", "bitsandbytes"),
                              False, load_transformers, ()),
    "liger": Contender("liger", "Liger-Kernel", ("liger_kernel", "transformers", "peft", "bitsandbytes"), True,
                       load_liger, ("liger_kernel",)),
    "unsloth": Contender("unsloth", "Unsloth", ("unsloth", "transformers", "peft", "bitsandbytes"), True,
                         load_unsloth, ("unsloth", "unsloth_zoo")),
}


def get_contender(name: str) -> Contender:
    try:
        return CONTENDERS[name]
    except KeyError:
        raise ValueError(f"unknown contender {name!r}; choose from: {', '.join(CONTENDERS)}") from None


def unavailable_reason(name: str, cuda: bool) -> str | None:
    """Why contender `name` cannot run here (None when it can), checked without importing it."""
    contender = get_contender(name)
    missing = [m for m in contender.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed ({', '.join(missing)} missing)"
    if contender.needs_cuda and not cuda:
        return "needs a CUDA GPU"
    return None


def set_max_seq_length(model, length: int) -> None:
    """Tell a loaded model the context it now trains at, on every module that keeps one.

    desktune refuses a longer batch; Unsloth silently truncates it to the max_seq_length of
    each module it set at load, which would make a probe measure a shorter sequence.
    """
    for module in model.modules():
        if "max_seq_length" in vars(module) or hasattr(module, "max_seq_length"):
            module.max_seq_length = length
