"""Model shapes the benchmark builds from configs (nothing is downloaded).

Each shape is the published config of a real model (dimensions, attention layout,
rope); its weights are random. `ensure_model_folder` writes one folder per shape and
seed into a cache (safetensors + the in-code tokenizer); every contender loads that
same folder, so all of them start from the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")

# Written last into a model folder: a folder without it is a half-written one.
MARKER = "desktune-bench-model.json"


@dataclass(frozen=True)
class Shape:
    name: str
    make_config: Callable  # (special token ids: dict) -> transformers config
    target_modules: tuple[str, ...]
    note: str = ""


def _llama_3_1_8b(special: dict):
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        **special,
    )


def _qwen3_8b(special: dict):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        **special,
    )


def _gemma_3_12b(special: dict):
    from transformers import Gemma3TextConfig

    # The text tower of Gemma-3-12B; every 6th layer is global, the rest slide over 1024.
    return Gemma3TextConfig(
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        **special,
    )


def _gpt_oss_20b(special: dict):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
            "rope_theta": 150000.0,
        },
        **special,
    )


def _tiny(special: dict):
    from desktune.fixtures.tiny_models import tiny_config
    from desktune.fixtures.tokenizer import make_tokenizer

    return tiny_config("llama", make_tokenizer())


SHAPES: dict[str, Shape] = {
    "llama-3.1-8b": Shape("llama-3.1-8b", _llama_3_1_8b, ALL_PROJECTIONS),
    "qwen3-8b": Shape("qwen3-8b", _qwen3_8b, ALL_PROJECTIONS),
    "gemma-3-12b": Shape("gemma-3-12b", _gemma_3_12b, ALL_PROJECTIONS, "text tower only (Gemma3ForCausalLM)"),
    # Its experts are fused 3-D parameters, not Linear layers: 4-bit and LoRA reach attention only.
    "gpt-oss-20b": Shape("gpt-oss-20b", _gpt_oss_20b, ATTENTION_PROJECTIONS, "experts stay 16-bit, LoRA on attention"),
    "tiny": Shape("tiny", _tiny, ALL_PROJECTIONS, "2-layer llama for tests; numbers mean nothing"),
}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; choose one of: {', '.join(SHAPES)}") from None


def build_config(name: str):
    """The transformers config of shape `name`, with the in-code tokenizer's special ids."""
    from desktune.fixtures.tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return get_shape(name).make_config(special)


def model_folder(cache_dir: str | Path, name: str, seed: int) -> Path:
    return Path(cache_dir).expanduser() / f"{name}-seed{seed}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def write_model_folder(name: str, folder: Path, seed: int, device: str) -> Path:
    """Random-init shape `name` on `device` in bf16 and save it (safetensors) + tokenizer into `folder`.

    Written into a sibling temp folder and renamed, so an interrupted build never
    leaves a folder that looks complete.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from desktune.fixtures.tokenizer import make_tokenizer

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = build_config(name)
    torch.manual_seed(seed)
    # Initialising on the GPU in bf16 takes seconds for 8B; on the CPU in fp32 it takes minutes.
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(tmp, max_shard_size="4GB")
    make_tokenizer().save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"shape": name, "seed": seed, "init_device": device}))
    del model
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
