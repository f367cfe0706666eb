"""gpt-oss experts computed grouped: tokens sorted by expert, one GEMM per weight stack.

`GroupedExperts` replaces transformers' `GptOssExperts` on one model instance, under the
same name and with the same parameter names (`gate_up_proj` [E, H, 2I] with gate/up
interleaved, `gate_up_proj_bias`, `down_proj` [E, I, H], `down_proj_bias`), so checkpoints
and PEFT `target_parameters` adapters keep their keys. Its weights are either 16/32-bit
parameters or NF4 (one bitsandbytes-layout quantisation per expert, double-quantised),
dequantised a few experts at a time inside the grouped product.

With NF4 weights `gate_up_proj` / `down_proj` are stride-0 placeholders with the real
shape, dtype and device: PEFT reads those to size per-expert LoRA factors, and no 16-bit
copy of the experts exists. LoRA factors are passed to `forward` by the patched PEFT
wrapper (see gpt_oss_lora.py); PEFT's own parametrisation (W + BA materialised for all
experts) is refused rather than silently applied to a placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from desktune.kernels.grouped_matmul import grouped_matmul, grouped_matmul_frozen
from desktune.kernels.nf4 import QuantState4bit, dequantize_4bit, dequantize_4bit_reference, quantize_nf4

# Experts dequantised at once by the NF4 path: 8 x (2880 x 5760) bf16 is 265 MB, a small
# transient next to the 10 GB of 4-bit experts of gpt-oss-20b.
EXPERT_CHUNK = 8
NF4_BLOCKSIZE = 64

# gpt-oss's clamped SwiGLU constants (the released checkpoints' values)
GPT_OSS_SWIGLU_ALPHA = 1.702
GPT_OSS_SWIGLU_LIMIT = 7.0


@dataclass
class ExpertLora:
    """Per-expert LoRA factors of one weight stack, in PEFT ParamWrapper's layout."""

    weight_a: torch.Tensor  # [E * r, in]: rows e * r .. e * r + r - 1 are expert e's A
    weight_b: torch.Tensor  # [out, r * E]: column j * E + e is expert e's column j of B
    scaling: float

    def stacks(self, num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T stack [E, in, r], B^T stack [E, r, out]) so that x @ A_e^T @ B_e^T is grouped twice."""
        a = self.weight_a.reshape(num_experts, -1, self.weight_a.shape[-1]).transpose(1, 2)
        b = self.weight_b.reshape(self.weight_b.shape[0], -1, num_experts).permute(2, 1, 0)
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()


class Nf4ExpertStack(nn.Module):
    """[E, K, M] weights as E separate NF4 quantisations (bitsandbytes layout, double-quantised)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device=None):
        super().__init__()
        experts, k, m = shape
        n = k * m
        if n % NF4_BLOCKSIZE:
            raise ValueError(f"expert weight of {k} x {m} values is not a whole number of {NF4_BLOCKSIZE}-value blocks")
        blocks = n // NF4_BLOCKSIZE
        self.shape, self.dtype = tuple(shape), dtype
        self.register_buffer("packed", torch.zeros(experts, n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.zeros(experts, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.zeros(experts, -(-blocks // 256), dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(experts, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.zeros(16, dtype=torch.float32, device=device))
        self.register_buffer("code2", torch.zeros(256, dtype=torch.float32, device=device))

    @torch.no_grad()
    def quantize_expert_(self, e: int, weight: torch.Tensor) -> None:
        """Fill expert e from its dense [K, M] weight (any float dtype)."""
        if tuple(weight.shape) != self.shape[1:]:
            raise ValueError(f"expert weight has shape {tuple(weight.shape)}, expected {self.shape[1:]}")
        packed, state = quantize_nf4(weight.to(self.packed.device), blocksize=NF4_BLOCKSIZE, compress_statistics=True)
        self.packed[e] = packed.reshape(-1)
        self.absmax_q[e] = state.absmax
        self.absmax2[e] = state.state2.absmax
        self.offset[e] = state.offset
        self.code.copy_(state.code)
        self.code2.copy_(state.state2.code)

    def _state(self, e: int) -> QuantState4bit:
        state2 = QuantState4bit(absmax=self.absmax2[e], shape=(self.absmax_q.shape[1],), dtype=torch.float32,
                                blocksize=256, code=self.code2, quant_type="int8")
        return QuantState4bit(absmax=self.absmax_q[e], shape=self.shape[1:], dtype=self.dtype,
                              blocksize=NF4_BLOCKSIZE, code=self.code, offset=self.offset[e], state2=state2)

    def dequantize(self, first: int, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weights of experts first..last-1: [last - first, K, M]."""
        out = torch.empty((last - first, *self.shape[1:]), dtype=self.dtype, device=self.packed.device)
        for i, e in enumerate(range(first, last)):
            if self.packed.is_cuda:
                dequantize_4bit(self.packed[e], self._state(e), out=out[i])
            else:
                out[i] = dequantize_4bit_reference(self.packed[e], self._state(e))
        return out if dtype is None or dtype == out.dtype else out.to(dtype)


def _placeholder(shape, dtype, device) -> nn.Parameter:
    # Shape, dtype and device for PEFT; zero bytes of storage (stride 0).
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(*shape), requires_grad=False)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss' activation over interleaved (gate, up) columns."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@dataclass
class Routing:
    """Token-expert pairs sorted by expert."""

    token: torch.Tensor  # [N * k] token row of each sorted pair
    expert: torch.Tensor  # [N * k] its expert
    weight: torch.Tensor  # [N * k] its routing weight
    ends: torch.Tensor  # [E] int32 cumulative pair counts
    counts: list[int]  # the same counts on the host


def sort_by_expert(router_indices: torch.Tensor, routing_weights: torch.Tensor, num_experts: int) -> Routing:
    top_k = router_indices.shape[-1]
    flat = router_indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return Routing(
        token=order // top_k,
        expert=flat[order],
        weight=routing_weights.reshape(-1)[order],
        ends=counts.cumsum(0).to(torch.int32),
        counts=counts.tolist(),
    )


class GroupedExperts(nn.Module):
    """Drop-in for GptOssExperts with a grouped forward and optional NF4 weights."""

    is_transposed = True  # weights are [E, in, out]: PEFT's ParamWrapper reads this

    def __init__(self, config, quantize_4bit: bool, dtype: torch.dtype, device=None):
        super().__init__()
        experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = experts, hidden, inter
        # transformers 5.17 (the GPU machine's) has no swiglu_alpha in the config: its experts
        # hard-code gpt-oss's 1.702; the limit has been a config field throughout (7.0).
        self.alpha = getattr(config, "swiglu_alpha", GPT_OSS_SWIGLU_ALPHA)
        self.limit = getattr(config, "swiglu_limit", GPT_OSS_SWIGLU_LIMIT)
        self.quantized = quantize_4bit
        shapes = {"gate_up_proj": (experts, hidden, 2 * inter), "down_proj": (experts, inter, hidden)}
        for name, shape in shapes.items():
            if quantize_4bit:
                setattr(self, name, _placeholder(shape, dtype, device))
                setattr(self, f"{name}_nf4", Nf4ExpertStack(shape, dtype, device))
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * inter, dtype=dtype, device=device))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden, dtype=dtype, device=device))

    @torch.no_grad()
    def load_expert_(self, name: str, e: int, value: torch.Tensor) -> None:
        """Set expert e's [in, out] slice of gate_up_proj / down_proj (quantised when 4-bit)."""
        if self.quantized:
            getattr(self, f"{name}_nf4").quantize_expert_(e, value)
            return
        target = getattr(self, name)
        if tuple(target.shape[1:]) != tuple(value.shape):
            raise ValueError(f"{name} experts are {tuple(target.shape[1:])}, the checkpoint gives {tuple(value.shape)}")
        target[e].copy_(value)

    @torch.no_grad()
    def load_weight_(self, name: str, value: torch.Tensor) -> None:
        """Set a whole weight stack (expert by expert) or a bias from a dense tensor."""
        if name in ("gate_up_proj", "down_proj"):
            if value.shape[0] != self.num_experts:
                raise ValueError(f"{name} has {value.shape[0]} experts in the checkpoint, the config says "
                                 f"{self.num_experts}")
            for e in range(self.num_experts):
                self.load_expert_(name, e, value[e])
            return
        target = getattr(self, name)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{name} has shape {tuple(target.shape)}, the checkpoint gives {tuple(value.shape)}")
        target.copy_(value)

    @torch.no_grad()
    def dense_weight(self, name: str) -> torch.Tensor:
        """The 16/32-bit value of parameter `name` (expert stacks dequantised when NF4), for merging."""
        if self.quantized and name in ("gate_up_proj", "down_proj"):
            return getattr(self, f"{name}_nf4").dequantize(0, self.num_experts)
        return getattr(self, name).detach()

    def _product(self, name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.quantized:
            stack = getattr(self, f"{name}_nf4")
            return grouped_matmul_frozen(x, lambda g0, g1: stack.dequantize(g0, g1, x.dtype), routing.counts,
                                         EXPERT_CHUNK)
        weight = getattr(self, name)
        return grouped_matmul(x, weight.to(x.dtype), routing.ends, routing.counts)

    def _lora(self, x, lora: list[ExpertLora], routing: Routing) -> torch.Tensor | None:
        total = None
        for factors in lora:
            a, b = factors.stacks(self.num_experts, x.dtype)
            delta = grouped_matmul(grouped_matmul(x, a, routing.ends, routing.counts), b, routing.ends, routing.counts)
            delta = delta * factors.scaling
            total = delta if total is None else total + delta
        return total

    def grouped_forward(self, hidden_states, router_indices, routing_weights, lora=None) -> torch.Tensor:
        """sum over the token's k experts of weight * (down(act(gate_up(x))) (+ LoRA on both stacks))."""
        lora = lora or {}
        routing = sort_by_expert(router_indices, routing_weights, self.num_experts)
        x = hidden_states[routing.token]
        gate_up = self._product("gate_up_proj", x, routing) + self.gate_up_proj_bias.to(x.dtype)[routing.expert]
        if lora.get("gate_up_proj"):
            gate_up = gate_up + self._lora(x, lora["gate_up_proj"], routing)
        act = clamped_swiglu(gate_up, self.alpha, self.limit)
        out = self._product("down_proj", act, routing) + self.down_proj_bias.to(act.dtype)[routing.expert]
        if lora.get("down_proj"):
            out = out + self._lora(act, lora["down_proj"], routing)
        out = out * routing.weight[:, None].to(out.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, routing.token, out.to(hidden_states.dtype))

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        if nn.utils.parametrize.is_parametrized(self):
            raise RuntimeError(
                "PEFT's parametrised LoRA reached desktune's grouped experts unpatched; add adapters with "
                "FastLanguageModel.get_peft_model (or desktune.models.gpt_oss_lora.patch_expert_lora) so the "
                "per-expert LoRA runs inside the grouped computation"
            )
        return self.grouped_forward(hidden_states, router_indices, routing_weights)

    @classmethod
    def from_experts(cls, experts: nn.Module, config, quantize_4bit: bool) -> "GroupedExperts":
        """Convert a loaded GptOssExperts (same device and dtype; quantised when asked)."""
        weight = experts.gate_up_proj
        new = cls(config, quantize_4bit, weight.dtype, weight.device)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            new.load_weight_(name, getattr(experts, name).detach())
        new.requires_grad_(False)
        return new

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, " \
               f"nf4={self.quantized}"
