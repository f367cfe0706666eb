"""gpt-oss attention with sinks and sliding windows, in training without an L x L mask.

Math (per head h, query i, keys j <= i, and i - j < window on sliding layers):
    s_ij = scale * q_i . k_j,    p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h))
    out_i = sum_j p_ij v_j
The sink is a per-head logit that takes probability mass but has no value. With
lse_i = log sum_j exp(s_ij) from a sink-free attention O_i:
    out_i = O_i * exp(lse_i) / (exp(lse_i) + exp(sink_h)) = O_i * sigmoid(lse_i - sink_h)
so any attention that returns its log-sum-exp handles sinks, and gradients reach the
sink and lse through that one product.

On CUDA the sink-free part is compiled FlexAttention with a block-sparse causal (and
window) mask: memory is linear in L and sliding layers skip the blocks outside the
window. Elsewhere (CPU tests) `sink_attention_reference` computes the same math densely.

The patched forward is used in training (no KV cache, right-padded or unpadded rows:
see gpt_oss.py's mask hook); evaluation and generate() keep transformers' forward.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn


def sink_attention_reference(q, k, v, sinks, scaling: float, window: int | None) -> torch.Tensor:
    """q [B, Hq, L, D], k/v [B, Hkv, L, D], sinks [Hq] -> [B, Hq, L, D] (dense; tests and CPU)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(q.shape[0], -1, length, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex attention materialises the scores; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _block_mask(length: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    if window is None:
        def mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    else:
        def mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return create_block_mask(mask, None, None, length, length, device=device)


def _flex_with_lse(flex, q, k, v, block_mask, scaling):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True, return_lse=True)
    out, aux = flex(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def sink_attention_flex(q, k, v, sinks, scaling: float, window: int | None, compiled: bool = True) -> torch.Tensor:
    """The sink attention through FlexAttention's output and log-sum-exp (see the module docstring)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = _compiled_flex() if compiled else flex_attention
    block_mask = _block_mask(q.shape[2], window, str(q.device))
    out, lse = _flex_with_lse(flex, q, k, v, block_mask, scaling)
    keep = torch.sigmoid(lse.float() - sinks.float().reshape(1, -1, 1))
    return (out * keep.unsqueeze(-1).to(out.dtype)).to(q.dtype)


def sink_attention(q, k, v, sinks, scaling: float, window: int | None) -> torch.Tensor:
    if q.is_cuda:
        return sink_attention_flex(q, k, v, sinks, scaling, window)
    return sink_attention_reference(q, k, v, sinks, scaling, window)


def patch_attention(module: nn.Module) -> None:
    """Route one GptOssAttention's training forward through sink_attention."""
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    original = module.forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        # transformers >= 5.2x names the KV cache `cache`, earlier 5.x `past_key_values`
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self.training or cache is not None or attention_mask is not None:
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            **kwargs)
        batch, length = hidden_states.shape[:2]
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = sink_attention(q, k, v, self.sinks, self.scaling, self.sliding_window)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), None

    module.forward = types.MethodType(forward, module)


def _right_padded_only(mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (or all ones): causal attention never sees the pads."""
    mask = mask.to(torch.int32)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def drop_training_masks(backbone: nn.Module) -> None:
    """In training, replace a right-padded 2-D mask by "no mask" before any L x L mask is built.

    transformers accepts a per-layer-type dict of prepared masks; None there means plain
    causal (+ window), which is what the patched attention computes. Left padding or
    packed rows (position_ids that restart) keep the original mask and transformers' attention.
    """

    def hook(module, args, kwargs):
        if not module.training or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and (mask.dim() != 2 or not _right_padded_only(mask))):
            return None
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[-1] > 1 and bool((positions[..., 1:] != positions[..., :-1] + 1).any()):
            return None  # packed rows (positions restart): transformers builds the per-document mask
        kwargs["attention_mask"] = {"full_attention": None, "sliding_attention": None}
        kwargs["use_cache"] = False
        return args, kwargs

    backbone.register_forward_pre_hook(hook, with_kwargs=True)

