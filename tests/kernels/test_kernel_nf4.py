"""4-bit dequantisation kernel (interpreted on CPU) against bitsandbytes, bit for bit."""

from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from desktune.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_4bit_is_bitsandbytes_bit_for_bit(dtype, nested, quant_type):
    torch.manual_seed(0)
    # 37 x 130 = 4810 values: 75 full blocks of 64 and a partial one.
    weight = (torch.randn(37, 130) * torch.linspace(0.01, 3, 130)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    want = bnb_functional.dequantize_4bit(packed, state)
    got = dequantize_4bit(packed, state)
    assert got.shape == (37, 130) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(dequantize_4bit_reference(packed, state), want)


def test_dequantize_4bit_nested_spans_several_second_level_blocks():
    # 300 x 130 values -> 610 absmax codes -> 3 second-level blocks of 256.
    torch.manual_seed(1)
    weight = torch.randn(300, 130).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert state.state2.absmax.numel() == 3
    got = dequantize_4bit(packed, state)
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, state))
    # and it is close to what was quantised (NF4 keeps ~10 % relative error per value)
    assert (got.float() - weight.float()).abs().mean() < 0.1


def test_dequantize_4bit_into_given_buffer_and_shape_errors():
    weight = torch.randn(8, 64)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    out = torch.empty(8, 64)
    assert dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, bnb_functional.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="needs"):
        dequantize_4bit(packed[:10], state)


@pytest.mark.gpu
def test_dequantize_4bit_gpu_llama_mlp_weight():
    torch.manual_seed(0)
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = bnb_functional.dequantize_4bit(packed, state)
    got = dequantize_4bit(packed, state)
    # The GPU may fuse the second level's multiply-add into one FMA: allow one bf16 ulp.
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)
