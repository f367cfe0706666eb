"""Attention for long and packed sequences: varlen flash attention on the GPU,
SDPA (exact block-diagonal masks) everywhere else.

transformers' SDPA path is already right for long single sequences (no mask ->
`is_causal` -> flash / cuDNN kernels, O(T) memory). Packed rows are where it
falls short: it turns restarting position_ids into a dense [T, T] block-diagonal
mask, which rules out the flash kernel and spends compute on every masked block.

`use_varlen_attention(model)` switches one model instance (its config's
`_attn_implementation`, read by its attention modules on every call) to
"desktune_varlen":

- mask function: on CUDA with torch's varlen flash attention and no padding
  mask, no mask is built at all; otherwise transformers' own `sdpa_mask`.
- attention: when no mask was built, the example boundaries (cu_seq_lens from
  the padding-free collator, else derived once per forward from position_ids)
  go to `torch.nn.attention.varlen.varlen_attn` with a causal (or sliding)
  window; otherwise transformers' `sdpa_attention_forward`, unchanged.

The two names are added to transformers' attention registries the first time a
model asks for them; no existing entry changes, so other models are unaffected.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from desktune.log import logger

NAME = "desktune_varlen"


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset[str]:
    fn = _varlen_attn()
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


def varlen_supported(device) -> bool:
    """True where packed batches run on varlen flash attention: CUDA and a torch
    varlen_attn that can be causal (torch 2.10: is_causal; 2.11+: window_size)."""
    causal = bool(_varlen_params() & {"window_size", "is_causal"})
    return torch.device(device).type == "cuda" and causal and torch.cuda.is_available()


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens int32 [n + 1], longest example) over the flattened batch: an example
    starts at each row start and wherever a position is not the previous one + 1."""
    rows = position_ids.expand(batch, -1)
    seq = rows.shape[1]
    flat = rows.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    start[::seq] = True
    starts = start.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _boundaries(kwargs: dict, batch: int, seq: int, device) -> tuple[torch.Tensor, int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and batch == 1:
        return cu.to(device=device, dtype=torch.int32), int(kwargs.get("max_length_q") or int(cu.diff().max()))
    positions = kwargs.get("position_ids")
    if positions is None:
        cu = torch.arange(0, (batch + 1) * seq, seq, device=device, dtype=torch.int32)
        return cu, seq
    # Every layer of one forward gets the same position_ids tensor: derive once (two syncs), keep on it.
    cached = getattr(positions, "_desktune_cu", None)
    if cached is None or cached[0] != batch:
        cached = (batch, *cu_seq_lens_from_position_ids(positions.to(device), batch))
        positions._desktune_cu = cached
    return cached[1], cached[2]


def _window(module: nn.Module, kwargs: dict) -> int | None:
    window = kwargs.get("sliding_window")
    return window if window is not None else getattr(module, "sliding_window", None)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface signature; query [b, hq, T, d] -> ([b, T, hq, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, seq, dim = query.shape
    usable = (attention_mask is None and key.shape[2] == seq and kwargs.get("softcap") is None and not dropout
              and varlen_supported(query.device))
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu, longest = _boundaries(kwargs, batch, seq, query.device)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value.shape[-1])
    params = _varlen_params()
    options = {"scale": scaling}
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    window = _window(module, kwargs)
    if "window_size" in params:
        # transformers' sliding window keeps W keys including the query's own: W - 1 to the left.
        options["window_size"] = (window - 1 if window else -1, 0)
    else:
        options["is_causal"] = True
    out = _varlen_attn()(q, k, v, cu, cu, longest, longest, **options)
    return out.reshape(batch, seq, heads, v.shape[-1]), None


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, device="cpu",
                **kwargs):
    """No mask where varlen_attention_forward will take the varlen path; else sdpa_mask's."""
    from transformers.masking_utils import sdpa_mask

    no_offset = not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0
    if attention_mask is None and q_length == kv_length and no_offset and varlen_supported(device):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, device=device, **kwargs)


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, varlen_attention_forward)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch this model instance from SDPA to desktune's varlen attention; returns
    whether it did. Models on other implementations (eager for soft-capped
    attention, flash_attention_2, flex) keep theirs, and so does a sliding-window
    model where torch's varlen_attn has no window argument."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        logger.debug("attention stays %r (desktune's varlen path replaces sdpa only)", current)
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    if getattr(config, "sliding_window", None) and "window_size" not in _varlen_params() and _varlen_attn():
        logger.info("torch's varlen_attn has no sliding window here: attention stays sdpa")
        return False
    _register()
    config._attn_implementation = NAME
    return True
