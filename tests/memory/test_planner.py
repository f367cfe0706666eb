"""Memory planner: the breakdown adds up, the answer is the longest length that fits,
and each setting moves it the way memory says it must."""

from __future__ import annotations

import json

import pytest

from desktune.memory import planner
from desktune.memory.tiled_mlp import TiledMLPConfig

LLAMA_8B = planner.ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                              vocab=128256)
GIB = planner.GIB


def test_fixed_part_counts_weights_lora_and_optimizer():
    fixed = planner.fixed_bytes(LLAMA_8B, planner.PlanSettings(lora_rank=16))
    # 6.98e9 projection weights in NF4 (~0.516 B each) and two 128256 x 4096 bf16 matrices
    assert 3.55e9 < fixed["base_weights"] < 3.65e9
    assert fixed["embeddings"] == 2 * 128256 * 4096 * 2 + 32 * 2 * 4096 * 2
    # r=16 on all projections of Llama-3.1-8B: 41.9M adapter parameters x 16 bytes
    assert fixed["lora_and_optimizer"] == 41_943_040 * 16


@pytest.mark.parametrize("budget_gib", [8, 16, 32, 80])
def test_answer_is_the_longest_multiple_of_64_that_fits(budget_gib):
    settings = planner.PlanSettings()
    result = planner.plan(LLAMA_8B, budget_gib * GIB, settings)
    assert result.max_seq_length % 64 == 0 and result.max_seq_length > 0
    assert planner.peak_bytes(LLAMA_8B, result.max_seq_length, settings) <= budget_gib * GIB
    assert planner.peak_bytes(LLAMA_8B, result.max_seq_length + 64, settings) > budget_gib * GIB
    assert planner.max_context(LLAMA_8B, budget_gib * GIB, lora_rank=16) == result.max_seq_length


def test_settings_move_the_answer_the_right_way():
    budget = 24 * GIB
    offload = planner.max_context(LLAMA_8B, budget)
    plain_ckpt = planner.max_context(LLAMA_8B, budget, checkpointing=True)
    no_ckpt = planner.max_context(LLAMA_8B, budget, checkpointing=False)
    assert offload > plain_ckpt > no_ckpt > 0
    assert planner.max_context(LLAMA_8B, budget, lora_rank=64) < offload
    assert planner.max_context(LLAMA_8B, budget, quantization="16bit") < planner.max_context(
        LLAMA_8B, budget, quantization="int8") < offload
    assert planner.max_context(LLAMA_8B, budget, tiled_mlp=None) < offload
    assert planner.max_context(LLAMA_8B, budget, batch_size=4) == pytest.approx(offload / 4, abs=64)
    assert planner.max_context(LLAMA_8B, 4 * GIB) == 0  # the 4-bit model alone does not fit


def test_tiling_threshold_is_respected():
    # Just above what fits untiled: tiling turns on and per-token cost drops.
    settings = planner.PlanSettings(tiled_mlp=TiledMLPConfig(min_tokens=8192))
    small = planner.plan(LLAMA_8B, 8 * GIB, settings)
    large = planner.plan(LLAMA_8B, 32 * GIB, settings)
    assert small.mlp_tiles == 1 and small.max_seq_length < 8192
    assert large.mlp_tiles == 4 and large.per_token_bytes < small.per_token_bytes


def test_host_ram_can_be_the_limit():
    result = planner.plan(LLAMA_8B, 80 * GIB, host_bytes=16 * GIB)
    assert result.limited_by == "host"
    assert result.max_seq_length == (16 * GIB // (32 * 4096 * 2)) // 64 * 64
    assert planner.plan(LLAMA_8B, 80 * GIB, host_bytes=16 * GIB, checkpointing=True).limited_by == "gpu"


def test_from_transformers_config():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    assert planner.ModelShape.from_config(config) == LLAMA_8B


def test_mixture_of_experts_counts_all_experts_and_routes_top_k():
    from desktune.bench.shapes import build_config

    shape = planner.ModelShape.from_config(build_config("gpt-oss-20b"))
    assert (shape.experts, shape.experts_per_token, shape.intermediate) == (32, 4, 2880)
    assert "gate_proj" not in shape.projection_shapes()
    fixed = planner.fixed_bytes(shape, planner.PlanSettings())
    # ~19.9e9 expert parameters + ~0.4e9 attention in NF4: about 10.5 GB
    assert 9.5e9 < fixed["base_weights"] < 11.5e9
    dense = planner.ModelShape(**{**shape.__dict__, "experts": 0, "experts_per_token": 0})
    moe_cost, tiles = planner.per_token_bytes(shape, planner.PlanSettings(), 50_000)
    dense_cost, _ = planner.per_token_bytes(dense, planner.PlanSettings(), 1)
    assert tiles == 1 and moe_cost["layer"] > dense_cost["layer"]  # 4 experts' intermediates per token
    assert planner.max_context(build_config("gpt-oss-20b"), 32 * GIB) > 0


def test_plan_cli(capsys):
    from desktune.cli.main import main

    assert main(["plan", "llama-3.1-8b", "--budget-gib", "16", "--budget-gib", "32", "--host-ram-gib", "256",
                 "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["budget_bytes"] for p in plans] == [16 * GIB, 32 * GIB]
    assert plans[1]["max_seq_length"] > plans[0]["max_seq_length"] > 0
    assert plans[1]["max_seq_length"] == planner.max_context(LLAMA_8B, 32 * GIB)
    assert main(["plan", "llama-3.1-8b", "--budget-gib", "32", "--host-ram-gib", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["limited_by"] == "host"
    assert main(["plan", "llama-3.1-8b", "--budget-gib", "16", "--checkpointing", "true", "--rank", "32"]) == 0
    out = capsys.readouterr().out
    assert "max_seq_length" in out and "r=32" in out


def test_plan_cli_needs_a_budget_without_gpu(monkeypatch):
    import torch

    from desktune.cli.main import main
    from desktune.errors import DesktuneError, ModelPathError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DesktuneError, match="--budget-gib"):
        main(["plan", "llama-3.1-8b"])
    with pytest.raises(ModelPathError):
        main(["plan", "/nonexistent/model", "--budget-gib", "8"])
