"""Memory planner: the longest sequence expected to train one step in a GPU budget.

Peak GPU memory of one LoRA / QLoRA step at batch b and sequence length T
(N = b x T tokens) is modelled as

    peak(N) = fixed + N x per_token(N)

fixed (bytes that do not grow with the sequence):
  base weights     decoder projections x bytes/param (NF4 with double-quantised
                   absmax 0.516, int8 1.0, 16-bit 2.0) + embeddings and LM head
                   in 16-bit (counted once when tied)
  LoRA             r x (in + out) per adapted projection, fp32, x4 for weight,
                   grad and Adam's two moments (16 bytes per adapter parameter)
  loss buffer      the fused cross-entropy's one [chunk, vocab] buffer (256 MiB)
  reserve          cuBLAS / kernel workspaces and allocator slack (512 MiB)

per_token (bytes per token, s = activation bytes, 2 for bf16/fp16):
  checkpoints      True: layers x hidden x s (each layer's saved input);
                   "unsloth"/"offload": 2 x hidden x s (the layer being
                   recomputed and the prefetched one; the rest is in host RAM);
                   False: every layer keeps all of `layer` below
  layer            what one layer's backward holds while it runs (the recompute):
                   s x (3 hidden + 2 q + 3 kv + q + hidden) for norms, q/k/v
                   before and after RoPE, attention output and o_proj output,
                   4 x heads for the attention log-sum-exp, s x 7 x r for the
                   LoRA x@A products, and the MLP: s x 3 x intermediate (gate,
                   up, act) -- divided by the tile count when tiled
  grads            transient gradients in that backward: s x (2 q + 2 kv) for
                   attention, s x 2 x intermediate (/ tiles) for the MLP
  stream           the residual stream outside the layers: s x 4 x hidden
                   (gradient in and out, final hidden and its fused-loss
                   gradient), RoPE cos/sin s x 2 x head_dim, 24 bytes of ids

Mixture-of-experts models (gpt-oss): the experts' weights are counted with the
base weights (all experts, same bytes per parameter), LoRA only on the dense
projections, and the MLP terms use experts_per_token x intermediate, untiled, plus
2 x hidden x experts_per_token for the tokens gathered per expert.

The budget is what `torch.cuda.set_per_process_memory_fraction` allows the
caching allocator (the CUDA context is outside it). `max_context` solves
peak(N) <= budget for N, rounds down to a multiple of 64 and divides by the
batch. `desktune bench --context` prints this estimate beside each measured
cell; docs/long-context.md keeps the comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Union

from desktune.memory.tiled_mlp import TiledMLPConfig, chunk_count

GIB = 1 << 30
MIB = 1 << 20
Quantization = Literal["nf4", "int8", "16bit"]
Checkpointing = Union[bool, Literal["unsloth", "offload"]]

BYTES_PER_PARAM = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "16bit": 2.0}
LOSS_BUFFER_BYTES = 256 * MIB
RESERVE_BYTES = 512 * MIB
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer the planner needs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    experts: int = 0  # mixture of experts: experts per layer (0: a dense MLP)
    experts_per_token: int = 0

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
        per_token = getattr(text, "num_experts_per_tok", None) or 0
        if experts and not per_token:
            raise ValueError(f"{getattr(text, 'model_type', 'this model')} has {experts} experts but no "
                             "num_experts_per_tok: the planner cannot tell how many run per token")
        intermediate = (getattr(text, "moe_intermediate_size", None) if experts else None) or text.intermediate_size
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=intermediate,
            heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
            vocab=text.vocab_size, tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
            experts=experts, experts_per_token=per_token,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each dense projection of one layer (a MoE's experts are counted apart)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                  "o_proj": (q, self.hidden)}
        if not self.experts:
            shapes.update(gate_proj=(self.hidden, self.intermediate), up_proj=(self.hidden, self.intermediate),
                          down_proj=(self.intermediate, self.hidden))
        return shapes

    def expert_params(self) -> int:
        """All experts' gate, up and down weights (+ router) over all layers; 0 for a dense model."""
        if not self.experts:
            return 0
        return self.layers * (self.experts * 3 * self.hidden * self.intermediate + self.hidden * self.experts)


@dataclass(frozen=True)
class PlanSettings:
    lora_rank: int = 16
    quantization: Quantization = "nf4"
    checkpointing: Checkpointing = "unsloth"
    batch_size: int = 1
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    activation_bytes: int = 2
    tiled_mlp: TiledMLPConfig | None = field(default_factory=TiledMLPConfig)

    def __post_init__(self):
        if self.quantization not in BYTES_PER_PARAM:
            raise ValueError(f"quantization must be one of {sorted(BYTES_PER_PARAM)}, got {self.quantization!r}")
        if self.checkpointing not in (True, False, "unsloth", "offload"):
            raise ValueError(f"checkpointing must be True, False, 'unsloth' or 'offload', got {self.checkpointing!r}")
        if self.lora_rank < 0 or self.batch_size < 1:
            raise ValueError("lora_rank must be >= 0 and batch_size >= 1")


@dataclass
class MemoryPlan:
    budget_bytes: int
    max_seq_length: int  # per row; 0 when not even the fixed part fits
    fixed: dict[str, int]
    per_token: dict[str, float]
    mlp_tiles: int
    host_bytes_per_token: int  # pinned host RAM the offloaded checkpoints take
    limited_by: str = "gpu"  # "host" when host RAM for the offloaded checkpoints is the tighter limit

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    @property
    def per_token_bytes(self) -> float:
        return sum(self.per_token.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(fixed_bytes=self.fixed_bytes, per_token_bytes=self.per_token_bytes)
        return out


def fixed_bytes(shape: ModelShape, settings: PlanSettings) -> dict[str, int]:
    projections = shape.projection_shapes()
    linear_params = shape.layers * sum(i * o for i, o in projections.values()) + shape.expert_params()
    embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    lora_params = shape.layers * sum(settings.lora_rank * sum(projections[name]) for name in settings.target_modules
                                     if name in projections)
    return {
        "base_weights": int(linear_params * BYTES_PER_PARAM[settings.quantization]),
        "embeddings": embed * 2 + shape.layers * 2 * shape.hidden * 2,
        "lora_and_optimizer": lora_params * 16,
        "loss_buffer": LOSS_BUFFER_BYTES,
        "reserve": RESERVE_BYTES,
    }


def per_token_bytes(shape: ModelShape, settings: PlanSettings, tokens: int) -> tuple[dict[str, float], int]:
    s = settings.activation_bytes
    h, inter = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tiles = 1
    routed = 0
    if shape.experts:  # each token runs experts_per_token experts (untiled), plus its gathered copies
        inter *= shape.experts_per_token
        routed = s * 2 * h * shape.experts_per_token
    elif settings.tiled_mlp is not None and tokens >= settings.tiled_mlp.min_tokens:
        tiles = chunk_count(tokens, h, inter, settings.tiled_mlp)
    lora = settings.lora_rank * sum(1 for name in settings.target_modules if name in shape.projection_shapes())
    layer = s * (3 * h + 2 * q + 3 * kv + q + h) + 4 * shape.heads + s * lora + s * 3 * inter / tiles + routed
    grads = s * (2 * q + 2 * kv) + s * 2 * inter / tiles
    stream = s * 4 * h + s * 2 * shape.head_dim + 24
    if settings.checkpointing is False:
        checkpoints = (shape.layers - 1) * layer
    elif settings.checkpointing is True:
        checkpoints = shape.layers * h * s
    else:
        checkpoints = 2 * h * s
    return {"checkpoints": checkpoints, "layer": layer, "grads": grads, "stream": stream}, tiles


def plan(config, budget_bytes: int, settings: PlanSettings | None = None, host_bytes: int | None = None,
         **overrides) -> MemoryPlan:
    """The longest sequence (per row of `settings.batch_size`) expected to train one
    step within `budget_bytes` of GPU memory, with the breakdown. With `host_bytes`
    (usable host RAM), offloaded checkpoints must also fit there."""
    settings = settings or PlanSettings(**overrides)
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    fixed = fixed_bytes(shape, settings)
    room = budget_bytes - sum(fixed.values())
    per_token, tiles = per_token_bytes(shape, settings, 1)
    tokens = max(0, int(room // sum(per_token.values())))
    threshold = settings.tiled_mlp.min_tokens if settings.tiled_mlp is not None else None
    if threshold is not None and tokens >= threshold - 1:
        # Past the threshold the MLP tiles and each token costs less: solve again with tiling.
        tiled, n_tiles = per_token_bytes(shape, settings, threshold)
        fit = int(room // sum(tiled.values()))
        if fit >= threshold:
            tokens, per_token, tiles = fit, tiled, n_tiles
        else:
            tokens = threshold - 1
    host = shape.layers * shape.hidden * settings.activation_bytes if settings.checkpointing in ("unsloth",
                                                                                                 "offload") else 0
    limited_by = "gpu"
    if host and host_bytes is not None and host_bytes // host < tokens:
        tokens, limited_by = host_bytes // host, "host"
    seq = (tokens // settings.batch_size) // 64 * 64
    return MemoryPlan(budget_bytes=int(budget_bytes), max_seq_length=seq, fixed=fixed, per_token=per_token,
                      mlp_tiles=tiles, host_bytes_per_token=host, limited_by=limited_by)


def max_context(config, budget_bytes: int, lora_rank: int = 16, **settings) -> int:
    """Longest sequence (batch 1 unless given) expected to train one step in `budget_bytes`.

    The call `desktune bench --context` makes beside each measured cell."""
    return plan(config, budget_bytes, lora_rank=lora_rank, **settings).max_seq_length


def peak_bytes(config, seq_len: int, settings: PlanSettings | None = None, **overrides) -> int:
    """The planner's peak-memory estimate for one step at `seq_len` tokens per row."""
    settings = settings or PlanSettings(**overrides)
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    tokens = seq_len * settings.batch_size
    per_token, _ = per_token_bytes(shape, settings, tokens)
    return int(sum(fixed_bytes(shape, settings).values()) + tokens * sum(per_token.values()))
