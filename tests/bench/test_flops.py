"""FLOP count per token of a QLoRA step, checked against a hand computation for the Llama-3.1-8B shape."""

from __future__ import annotations

import pytest

from desktune.bench.flops import mean_context, step_flops_per_token
from desktune.bench.shapes import ALL_PROJECTIONS, build_config


def test_llama_8b_step_flops_match_hand_count():
    config = build_config("llama-3.1-8b")
    got = step_flops_per_token(config, seq_len=2048, lora_rank=16, target_modules=ALL_PROJECTIONS)
    # One decoder layer: q 4096x4096, k and v 4096x1024 (8 kv heads x 128), o 4096x4096, gate/up/down 4096x14336.
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
    assert layer == 218_103_808
    n_layers = 32 * layer  # 6,979,321,856 frozen weights per token in the decoder
    n_head = 4096 * 128256  # 525,336,576
    # Causal attention at 2048: a token sees (2048 + 1) / 2 = 1024.5 positions on average;
    # QK^T and AV are 2 * 1024.5 * 4096 FLOPs each per layer.
    attention = 32 * 4 * 1024.5 * 4096
    # LoRA r=16: 2 * 16 * (fan_in + fan_out) per projection; fan sums 8192, 5120, 5120, 8192, 18432 x 3.
    lora = 32 * 2 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)
    expected = 6 * n_layers + 4 * n_head + 4 * attention + 4 * lora
    assert got.layer_weights == n_layers and got.head_weights == n_head and got.lora_forward == lora
    assert got.total == pytest.approx(expected, rel=1e-12)
    assert got.total == pytest.approx(46.46e9, rel=1e-3)  # "about 47 GFLOP per token" (issue 3)
    # The H200's ~790 TFLOP/s bf16 makes the ceiling ~17k tokens/s, the issue's figure.
    assert 790e12 / got.total == pytest.approx(17_000, rel=0.01)


def test_checkpointing_adds_one_forward_of_the_layers():
    config = build_config("llama-3.1-8b")
    with_ckpt = step_flops_per_token(config, 2048, 16, ALL_PROJECTIONS, checkpointing=True)
    without = step_flops_per_token(config, 2048, 16, ALL_PROJECTIONS, checkpointing=False)
    assert with_ckpt.total - without.total == pytest.approx(
        2 * with_ckpt.layer_weights + with_ckpt.attention_forward + with_ckpt.lora_forward
    )


def test_mean_context_with_and_without_sliding_window():
    assert mean_context(4) == 2.5  # positions see 1, 2, 3, 4
    assert mean_context(4, window=2) == 1.75  # 1, 2, 2, 2
    assert mean_context(4, window=8) == 2.5


def test_sliding_layers_and_experts_are_counted():
    config = build_config("gpt-oss-20b")
    short = step_flops_per_token(config, 128, 16, ("q_proj",))
    long = step_flops_per_token(config, 4096, 16, ("q_proj",))
    heads_dims = 64 * 64
    # 12 sliding layers stop growing past the 128 window; 12 full ones keep growing.
    expected_growth = 12 * 4 * (mean_context(4096) - mean_context(128)) * heads_dims
    expected_growth += 12 * 4 * (mean_context(4096, 128) - mean_context(128, 128)) * heads_dims
    assert long.attention_forward - short.attention_forward == pytest.approx(expected_growth)
    # 4 of 32 experts per token, plus the router.
    attn = 2880 * 4096 + 2 * 2880 * 512 + 4096 * 2880
    assert short.layer_weights == 24 * (attn + 4 * 3 * 2880 * 2880 + 2880 * 32)
