"""Per-expert LoRA (PEFT `target_parameters`) run inside the grouped expert computation.

PEFT wraps each targeted expert parameter in a `ParamWrapper` (nested when both
`gate_up_proj` and `down_proj` are targeted) whose forward would add B @ A to the whole
[E, in, out] stack before calling the experts. We keep PEFT's modules, names and saved
adapters, and bind a forward on the outermost wrapper of each experts module that hands
the factors to `GroupedExperts.grouped_forward` instead: the delta weight is never built.
"""

from __future__ import annotations

import types

from torch import nn

from desktune.models.gpt_oss_moe import ExpertLora, GroupedExperts

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
# Unsloth-style target names that mean the experts' stacks on gpt-oss
_EXPERT_ALIASES = {"gate_up_proj": "gate_up_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                   "down_proj": "down_proj"}


def split_lora_targets(targets) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters): expert names become `mlp.experts.<stack>` parameters."""
    modules, parameters = [], []
    for name in targets:
        stack = _EXPERT_ALIASES.get(name)
        if stack is None:
            modules.append(name)
        elif f"mlp.experts.{stack}" not in parameters:
            parameters.append(f"mlp.experts.{stack}")
    return modules, parameters


def _wrapper_chain(module: nn.Module):
    """The ParamWrappers from `module` inward and the GroupedExperts at the bottom (or None)."""
    chain = []
    while type(module).__name__ == "ParamWrapper":
        chain.append(module)
        module = module.base_layer
    return chain, (module if isinstance(module, GroupedExperts) else None)


def _factors(chain) -> dict[str, list[ExpertLora]]:
    lora: dict[str, list[ExpertLora]] = {}
    for wrapper in chain:
        if wrapper.disable_adapters or wrapper.merged:
            continue
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            lora.setdefault(wrapper.parameter_name, []).append(
                ExpertLora(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, wrapper.scaling[adapter])
            )
    return lora


def patch_expert_lora(model: nn.Module) -> int:
    """Bind the grouped LoRA forward on every outermost expert ParamWrapper; returns how many."""
    patched = 0
    for module in model.modules():
        chain, experts = _wrapper_chain(module)
        if not chain or experts is None or getattr(module, "_desktune_grouped_lora", False):
            continue
        # inner wrappers are reached through this one: mark them so they are not bound again
        for wrapper in chain:
            wrapper._desktune_grouped_lora = True

        def forward(self, hidden_states, router_indices=None, routing_weights=None, *, _chain=chain, _experts=experts):
            return _experts.grouped_forward(hidden_states, router_indices, routing_weights, _factors(_chain))

        module.forward = types.MethodType(forward, module)
        patched += 1
    return patched
