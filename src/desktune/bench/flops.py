"""Arithmetic per token of one LoRA / QLoRA training step, from the model's shape.

Counted: every matrix product (2 FLOPs per multiply-add); norms, activations,
softmax and the optimizer are left out (a few percent at most). With the base weights
frozen, backward needs the gradient with respect to the input of each frozen product
(as much arithmetic as its forward) but no weight gradient. With checkpointing each
decoder layer's forward runs twice. Per token:

    frozen products   2*N_layers * 3  (forward, recompute, input gradient)
                    + 2*N_head   * 2  (the LM head is not checkpointed)
    attention         4 * A      (forward, recompute, backward = 2x forward)
    LoRA              4 * R      (forward, recompute, input grad, weight grad)

N_layers: frozen weights used per token in the decoder layers (for a mixture of
experts, the experts a token is routed to); N_head = hidden * vocab; A = 4 * ctx *
heads * head_dim per layer, where ctx is the mean number of positions a token attends
to under the causal (and sliding-window) mask; R = sum over adapted projections of
2 * r * (fan_in + fan_out). The ceiling of a card is its measured matmul rate over
this number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StepFlops:
    layer_weights: int  # N_layers
    head_weights: int  # N_head
    attention_forward: float  # A summed over layers, per token
    lora_forward: int  # R summed over layers, per token
    total: float  # FLOPs per token of the whole step

    def as_dict(self) -> dict:
        return asdict(self)


def mean_context(seq_len: int, window: int | None = None) -> float:
    """Mean over positions 1..seq_len of how many positions each attends to (itself included)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    inside = window * (window + 1) / 2  # positions 1..window see all before them
    return (inside + (seq_len - window) * window) / seq_len


def _layer_windows(config) -> list[int | None]:
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not layer_types or not window:
        return [None] * n
    return [window if kind == "sliding_attention" else None for kind in layer_types[:n]]


def projection_shapes(config) -> dict[str, tuple[int, int, int]]:
    """name -> (fan_in, fan_out, copies used per token) for each decoder-layer projection."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    experts_per_token = getattr(config, "num_experts_per_tok", None) or 1
    return {
        "q_proj": (hidden, heads * head_dim, 1),
        "k_proj": (hidden, kv_heads * head_dim, 1),
        "v_proj": (hidden, kv_heads * head_dim, 1),
        "o_proj": (heads * head_dim, hidden, 1),
        "gate_proj": (hidden, inter, experts_per_token),
        "up_proj": (hidden, inter, experts_per_token),
        "down_proj": (inter, hidden, experts_per_token),
    }


def step_flops_per_token(
    config, seq_len: int, lora_rank: int, target_modules, checkpointing: bool = True
) -> StepFlops:
    """FLOPs per token of one training step (forward, backward) of LoRA on a frozen base."""
    layers = config.num_hidden_layers
    shapes = projection_shapes(config)
    per_layer = sum(fan_in * fan_out * copies for fan_in, fan_out, copies in shapes.values())
    experts = getattr(config, "num_local_experts", None)
    if experts:
        per_layer += config.hidden_size * experts  # the router
    layer_weights = layers * per_layer
    head_weights = config.hidden_size * config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = sum(4 * mean_context(seq_len, w) * heads * head_dim for w in _layer_windows(config))
    lora = layers * sum(2 * lora_rank * (shapes[m][0] + shapes[m][1]) * shapes[m][2] for m in target_modules if m in shapes)
    layer_passes = 3 if checkpointing else 2
    attention_passes = 4 if checkpointing else 3
    total = 2 * layer_weights * layer_passes + 2 * head_weights * 2 + attention_passes * attention
    total += attention_passes * lora
    return StepFlops(layer_weights, head_weights, attention, lora, total)
