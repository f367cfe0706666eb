"""Loading a model + tokenizer for training: path checks, dtype, quantisation, patching."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from desktune.errors import DesktuneError, GPUOutOfMemoryError, ModelPathError
from desktune.log import logger
from desktune.models import registry
from desktune.models.attention import use_varlen_attention
from desktune.models.patches import check_sequence_length
from desktune.quant.bnb import keep_storage_layout_on_cpu, quantization_config

# Volta is the oldest architecture with the bf16/fp16 tensor-core paths bitsandbytes and Triton build for.
MIN_COMPUTE_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class LoadRequest:
    model_name: str
    max_seq_length: int = 2048
    dtype: torch.dtype | None = None
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    full_finetuning: bool = False
    token: str | None = None
    device_map: object = None
    trust_remote_code: bool = False
    fallback_to_transformers: bool = False


def validate_max_seq_length(max_seq_length) -> int:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ValueError(
            f"max_seq_length must be a positive whole number of tokens (e.g. 2048), got {max_seq_length!r}"
        )
    return max_seq_length


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.count("/") > 1 or (
        os.altsep is not None and os.altsep in name
    )


def resolve_config(model_name: str, token: str | None, trust_remote_code: bool):
    """The model's config, from a local folder or the Hugging Face cache / hub."""
    from transformers import AutoConfig

    path = Path(os.path.expanduser(str(model_name)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(
                f"the folder {str(path)!r} holds no config.json, so it is not a model folder. Point model_name at "
                f"the folder that contains config.json and the *.safetensors weights."
            )
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), str(path)
    if path.exists():
        raise ModelPathError(f"{str(path)!r} is a file, not a model folder: pass the folder that holds config.json")
    if _looks_like_path(str(model_name)):
        raise ModelPathError(f"the model folder {str(path)!r} does not exist: check the path")
    try:
        config = AutoConfig.from_pretrained(model_name, token=token, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelPathError(
            f"{model_name!r} is neither a local model folder nor a Hugging Face model that could be resolved "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0]}). Check the spelling; for a hub id, check that "
            f"you are online or that the model is in the Hugging Face cache, and pass token= for gated models."
        ) from exc
    return config, model_name


def pick_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16; float32 on the CPU."""
    if dtype is not None:
        return dtype
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_gpu() -> None:
    if not torch.cuda.is_available():
        logger.warning("no CUDA GPU found: loading on the CPU (fine for tests, far too slow for real training)")
        return
    capability = torch.cuda.get_device_capability()
    if capability < MIN_COMPUTE_CAPABILITY:
        raise DesktuneError(
            f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}; desktune needs "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (Volta and later)."
        )


def default_device_map():
    """The whole model on this process's GPU (cuda:LOCAL_RANK under torchrun / accelerate launch)."""
    from desktune.distributed import device_map

    return device_map()


def load(request: LoadRequest):
    """(model, tokenizer) ready for get_peft_model or full fine-tuning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_seq_length = validate_max_seq_length(request.max_seq_length)
    load_in_4bit, load_in_8bit = request.load_in_4bit, request.load_in_8bit
    if request.full_finetuning and (load_in_4bit or load_in_8bit):
        logger.info("full_finetuning=True trains every weight in 16-bit: ignoring load_in_4bit / load_in_8bit")
        load_in_4bit = load_in_8bit = False
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both True: choose one")
    config, resolved = resolve_config(request.model_name, request.token, request.trust_remote_code)
    family = registry.family_for(config, fallback=request.fallback_to_transformers)
    check_gpu()
    dtype = pick_dtype(request.dtype)
    device_map = request.device_map if request.device_map is not None else default_device_map()
    try:
        if family is not None and family.load_model is not None:  # quantises while loading (gpt-oss)
            model = family.load_model(resolved, config, dtype, load_in_4bit, load_in_8bit, device_map, request.token)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                resolved,
                dtype=dtype,
                quantization_config=quantization_config(load_in_4bit, load_in_8bit, dtype),
                device_map=device_map,
                token=request.token,
                trust_remote_code=request.trust_remote_code,
            )
    except torch.OutOfMemoryError as exc:
        raise GPUOutOfMemoryError(
            f"the GPU ran out of memory loading {request.model_name!r}. Load it in 4-bit (load_in_4bit=True), "
            f"close other programs using the GPU (nvidia-smi), or pick a smaller model."
        ) from exc
    keep_storage_layout_on_cpu(model)
    tokenizer = AutoTokenizer.from_pretrained(resolved, token=request.token, trust_remote_code=request.trust_remote_code)
    _prepare_tokenizer(tokenizer, max_seq_length)
    model.max_seq_length = max_seq_length
    if family is not None:
        registry.patch(model, family, max_seq_length)
        # packed / unpadded rows: flash varlen on the GPU instead of SDPA's dense block mask
        use_varlen_attention(model)
    elif hasattr(model, "model"):
        check_sequence_length(model.model, lambda: model.max_seq_length)
    if max_seq_length > getattr(config, "max_position_embeddings", max_seq_length):
        logger.warning(
            "max_seq_length=%d is longer than the %d positions the model was trained on; quality may drop past it",
            max_seq_length,
            config.max_position_embeddings,
        )
    if request.full_finetuning:
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    model._desktune_full_finetuning = request.full_finetuning
    return model, tokenizer


def _prepare_tokenizer(tokenizer, max_seq_length: int) -> None:
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss, so reusing EOS as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
