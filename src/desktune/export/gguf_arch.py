"""What each supported Hugging Face family looks like to llama.cpp: architecture name,
hyper-parameter keys, and the per-tensor transforms llama.cpp expects.

The facts here follow llama.cpp's own converter (convert_hf_to_gguf.py) and its model
loader: Llama/Mistral q/k rows are permuted from rotate-half to interleaved order,
Gemma RMSNorm weights are stored with the +1 folded in, Llama 3 rope scaling becomes a
`rope_freqs` tensor, and tied output embeddings are left out (llama.cpp reuses
token_embd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from desktune.errors import UnsupportedModelError
from desktune.log import logger


@dataclass(frozen=True)
class TensorView:
    """One GGUF tensor cut from one HF tensor: `name` is what gguf's name map knows,
    `part` says how to cut ("gate"/"up": even/odd columns; "T": transpose the last two)."""

    name: str
    part: str | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFFamily:
    """How one Hugging Face `model_type` maps onto a llama.cpp architecture."""

    model_type: str
    arch: str  # gguf.MODEL_ARCH member name, e.g. "LLAMA"
    permute_qk: bool = False  # HF rotate-half rows -> llama.cpp interleaved rows
    norm_shift: float = 0.0  # added to every "*norm.weight" (Gemma's 1 + w)
    extra_metadata: Callable[[Any, Any], None] | None = None  # (writer, config) -> None
    views: Callable[[str, tuple[int, ...]], list[TensorView]] | None = None  # HF tensor -> GGUF tensors


def _gemma2_metadata(writer: Any, config: Any) -> None:
    _check_query_scale(config)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3_metadata(writer: Any, config: Any) -> None:
    _check_query_scale(config)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        # llama.cpp builds of early 2025 hard-code "every 6th layer is global"; say so if this one differs.
        if [t == "full_attention" for t in layer_types] != [(i + 1) % 6 == 0 for i in range(len(layer_types))]:
            logger.warning("gemma3 layer_types differ from the 5:1 sliding pattern; older llama.cpp builds ignore it")
    local = rope_parameters(config, "sliding_attention")
    if local.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _check_query_scale(config: Any) -> None:
    # llama.cpp scales Gemma queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) only for 27B).
    scalar = getattr(config, "query_pre_attn_scalar", None)
    allowed = {config.head_dim, config.hidden_size // config.num_attention_heads}
    if scalar is not None and scalar not in allowed:
        logger.warning(
            "query_pre_attn_scalar=%s is neither head_dim nor hidden/heads: llama.cpp will scale attention differently",
            scalar,
        )


def _gpt_oss_metadata(writer: Any, config: Any) -> None:
    writer.add_expert_count(int(config.num_local_experts))
    writer.add_expert_used_count(int(config.num_experts_per_tok))
    writer.add_expert_feed_forward_length(int(config.intermediate_size))
    writer.add_sliding_window(int(config.sliding_window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


def _gpt_oss_views(hf_name: str, shape: tuple[int, ...]) -> list[TensorView]:
    """HF keeps each layer's experts fused: gate_up_proj [E, hidden, 2*ff] with gate and up
    in alternating columns, used as x @ W; llama.cpp wants separate [E, ff, hidden] gate/up
    and [E, hidden, ff] down tensors (rows = outputs)."""
    if hf_name.endswith(("_blocks", "_scales")):
        raise UnsupportedModelError(
            f"{hf_name} is MXFP4-packed; GGUF export reads a dequantized 16-bit folder: merge the model with "
            "save_pretrained_merged(..., save_method='merged_16bit') (or `desktune merge`) first."
        )
    base = hf_name.removesuffix("_bias")
    if base.endswith("experts.gate_up_proj"):
        stem = base.removesuffix("gate_up_proj")
        if hf_name.endswith("_bias"):
            half = (*shape[:-1], shape[-1] // 2)
            return [TensorView(stem + "gate_proj.bias", "gate", half), TensorView(stem + "up_proj.bias", "up", half)]
        out = (shape[0], shape[2] // 2, shape[1])
        return [TensorView(stem + "gate_proj.weight", "gate", out), TensorView(stem + "up_proj.weight", "up", out)]
    if base.endswith("experts.down_proj"):
        if hf_name.endswith("_bias"):
            return [TensorView(base + ".bias", None, shape)]
        return [TensorView(base + ".weight", "T", (shape[0], shape[2], shape[1]))]
    if hf_name.endswith("self_attn.sinks"):
        return [TensorView(hf_name + ".weight", None, shape)]
    return [TensorView(hf_name, None, shape)]


def cut_view(part: str | None, data: np.ndarray, is_bias: bool) -> np.ndarray:
    if part in ("gate", "up"):
        data = data[..., 0::2] if part == "gate" else data[..., 1::2]
        return data if is_bias else np.swapaxes(data, -1, -2)
    if part == "T":
        return np.swapaxes(data, -1, -2)
    return data


FAMILIES: dict[str, GGUFFamily] = {
    f.model_type: f
    for f in (
        GGUFFamily("llama", "LLAMA", permute_qk=True),
        GGUFFamily("mistral", "LLAMA", permute_qk=True),
        GGUFFamily("qwen2", "QWEN2"),
        GGUFFamily("qwen3", "QWEN3"),
        GGUFFamily("gemma2", "GEMMA2", norm_shift=1.0, extra_metadata=_gemma2_metadata),
        GGUFFamily("gemma3_text", "GEMMA3", norm_shift=1.0, extra_metadata=_gemma3_metadata),
        GGUFFamily("gpt_oss", "GPT_OSS", extra_metadata=_gpt_oss_metadata, views=_gpt_oss_views),
    )
}


def family_for(config: Any) -> GGUFFamily:
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        raise UnsupportedModelError(
            "GGUF export of multimodal gemma3 checkpoints is not supported; export the text model "
            "(Gemma3ForCausalLM, model_type 'gemma3_text') instead."
        )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """Rope settings across transformers versions: 5.x keeps them (and rope_theta) in
    `rope_parameters`, per layer type for Gemma 3; 4.x used `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    out: dict[str, Any] = dict(params or {})
    if out.get("rope_theta") is None and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict) and "rope_type" not in out:
        out.update(legacy)
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return out


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def write_hparams(writer: Any, config: Any, family: GGUFFamily) -> None:
    """The hyper-parameter keys llama.cpp reads for every supported architecture."""
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    hd = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_vocab_size(int(config.vocab_size))
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    _write_rope_scaling(writer, rope)
    if family.extra_metadata is not None:
        family.extra_metadata(writer, config)


def _write_rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
    import gguf

    kind = rope.get("rope_type", "default")
    if kind in (None, "default", "llama3"):  # llama3 travels as the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    else:
        raise UnsupportedModelError(
            f"rope scaling {kind!r} has no llama.cpp equivalent in this exporter (supported: default, linear, "
            "yarn, llama3); export without it or convert with llama.cpp's convert_hf_to_gguf.py."
        )


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Per-frequency divisors that reproduce HF's llama3 rope scaling in llama.cpp
    (llama.cpp divides each rotation frequency by its factor)."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim, base = head_dim(config), float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout (first half, second half) to
    llama.cpp's interleaved pairs; works for q/k weights and biases."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk (tests use it to compare a GGUF tensor with the HF one)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def transform_tensor(hf_name: str, data: np.ndarray, config: Any, family: GGUFFamily) -> np.ndarray:
    """The HF tensor as llama.cpp wants it (float32 in, float32 out)."""
    if family.permute_qk:
        n_head = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_kv)
    if family.norm_shift and hf_name.endswith("norm.weight"):
        data = data + np.float32(family.norm_shift)
    return data
