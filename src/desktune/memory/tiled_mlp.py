"""Tiled MLP: a long sequence's MLP run in token chunks, forward and backward.

A gated MLP holds gate, up and act(gate) * up, each [tokens, intermediate], for
its backward: at Llama-3.1-8B's 14336-wide MLP that is 84 KiB per token, over 5x
the hidden state. Rows of an MLP are independent, so:

- forward: under no_grad, y[c] = mlp(x[c]) for each chunk c; only x is saved.
- backward: for each chunk, recompute mlp(x[c]) with grad (and the chunk's
  forward RNG state, so dropout draws the same mask) and backpropagate
  grad_y[c] through it: grad_x[c] comes out, and the trainable weights' grads
  accumulate chunk by chunk (torch.autograd.backward adds into .grad).

So only one chunk's intermediates exist at a time. The price is one more MLP
forward per step, which is why it is only switched on above a token threshold
(`TiledMLPConfig.min_tokens`). Results equal the untiled MLP up to float
summation order (weight grads are summed per chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TiledMLPConfig:
    # Below this many tokens per call the MLP runs untiled (the recompute costs
    # time and the intermediates are small). Measured on the H200 (docs/gpu-notes.md,
    # run 4): tiling a Llama-8B QLoRA step of 4 x 2048 tokens cost 22% of the step
    # time (9,967 -> 7,771 tokens/s) to save 0.44 GiB. 32768 tokens of that MLP hold
    # 2.8 GB of intermediates in bf16: from there on the memory is worth the time.
    min_tokens: int = 32768
    # Chunk count; None picks ceil(intermediate / hidden), which makes one chunk's
    # intermediates about as large as the hidden states of the whole sequence.
    num_chunks: int | None = None

    def __post_init__(self):
        if self.min_tokens < 1:
            raise ValueError(f"TiledMLPConfig.min_tokens must be at least 1, got {self.min_tokens}")
        if self.num_chunks is not None and self.num_chunks < 1:
            raise ValueError(f"TiledMLPConfig.num_chunks must be at least 1, got {self.num_chunks}")


def chunk_count(tokens: int, hidden: int, intermediate: int, config: TiledMLPConfig) -> int:
    wanted = config.num_chunks or math.ceil(intermediate / hidden)
    return max(1, min(wanted, tokens))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp: Callable, x: torch.Tensor, chunks: int, *params: torch.Tensor):
        ctx.mlp, ctx.chunks = mlp, chunks
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        ctx.rng = []  # each chunk's RNG state, so a LoRA dropout recomputes the same mask
        outs = []
        with torch.no_grad():
            for part in flat.chunk(chunks, dim=0):
                ctx.rng.append(_rng_state(x.device))
                outs.append(mlp(part))
        return torch.cat(outs, dim=0).view(*x.shape[:-1], outs[0].shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[1] else None
        enabled, dtype = ctx.autocast
        start = 0
        devices = [x.device] if x.device.type == "cuda" else []
        chunks = zip(flat.chunk(ctx.chunks, dim=0), grad_flat.chunk(ctx.chunks, dim=0), ctx.rng)
        for part, grad_part, rng in chunks:
            part = part.detach().requires_grad_(grad_x is not None)
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                    torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                _set_rng_state(x.device, rng)
                out = ctx.mlp(part)
            if out.requires_grad:
                torch.autograd.backward(out, grad_part)
            if grad_x is not None:
                grad_x[start:start + part.shape[0]] = part.grad
            start += part.shape[0]
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        # Weight grads were accumulated into .grad by the per-chunk backward above.
        return (None, grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def tiled_mlp(mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunks: int,
              trainable: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """mlp(x) computed in `chunks` token chunks; `trainable` are the weights that
    need grads (passed so the output requires grad even when x does not)."""
    return _TiledMLP.apply(mlp, x, chunks, *trainable)


def set_tiled_mlp(model: torch.nn.Module, config: TiledMLPConfig | None) -> int:
    """Change (None: switch off) MLP tiling on every desktune-patched MLP of `model`;
    returns how many MLPs it applies to."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_desktune_tiling"):
            module._desktune_tiling = config
            count += 1
    return count
