"""4-bit dequantisation kernel (interpreted on CPU) against bitsandbytes, bit for bit."""

from __future__ import annotations

import pytest
import torch

from desktune.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_nf4


@pytest.fixture(scope="module")
def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_4bit_is_bitsandbytes_bit_for_bit(bnb_functional, dtype, nested, quant_type):
    torch.manual_seed(0)
    # 37 x 130 = 4810 values: 75 full blocks of 64 and a partial one.
    weight = (torch.randn(37, 130) * torch.linspace(0.01, 3, 130)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    want = bnb_functional.dequantize_4bit(packed, state)
    got = dequantize_4bit(packed, state)
    assert got.shape == (37, 130) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(dequantize_4bit_reference(packed, state), want)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_whole_block_weights_take_the_block_kernel_bit_for_bit(bnb_functional, dtype, nested, monkeypatch):
    # 300 x 192 = 900 whole blocks of 64 (every Llama projection is whole blocks): the kernel
    # that loads one scale per block; 15 programs of 64 blocks, the last one partial.
    import desktune.kernels.nf4 as nf4

    torch.manual_seed(2)
    weight = (torch.randn(300, 192) * torch.linspace(0.01, 3, 192)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    monkeypatch.setattr(nf4, "_dequant_4bit_kernel", None)  # the per-byte kernel must not be used
    got = nf4.dequantize_4bit(packed, state)
    assert got.shape == (300, 192)
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, state))


def test_dequantize_4bit_nested_spans_several_second_level_blocks(bnb_functional):
    # 300 x 130 values -> 610 absmax codes -> 3 second-level blocks of 256.
    torch.manual_seed(1)
    weight = torch.randn(300, 130).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert state.state2.absmax.numel() == 3
    got = dequantize_4bit(packed, state)
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, state))
    # and it is close to what was quantised (NF4 keeps ~10 % relative error per value)
    assert (got.float() - weight.float()).abs().mean() < 0.1


def test_dequantize_4bit_into_given_buffer_and_shape_errors(bnb_functional):
    weight = torch.randn(8, 64)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    out = torch.empty(8, 64)
    assert dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, bnb_functional.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="needs"):
        dequantize_4bit(packed[:10], state)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_4bit_gpu_llama_mlp_weight(nested):
    torch.manual_seed(0)
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_nf4(weight, compress_statistics=nested)  # no bitsandbytes needed
    want = dequantize_4bit_reference(packed, state)
    got = dequantize_4bit(packed, state)
    if nested:  # the GPU may fuse the second level's multiply-add into one FMA: one bf16 ulp
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("nested", [True, False])
def test_quantize_nf4_is_read_the_same_by_bitsandbytes_and_our_kernel(bnb_functional, nested):
    torch.manual_seed(2)
    weight = (torch.randn(300, 130) * 0.05).to(torch.bfloat16)
    packed, state = quantize_nf4(weight, compress_statistics=nested)
    ref_packed, ref_state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    if not nested:  # same first level as bitsandbytes, byte for byte
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    # bitsandbytes' own dequantiser reads our state (its second level included)
    state2 = state.state2
    bnb_state = bnb_functional.QuantState(
        absmax=state.absmax, shape=torch.Size(state.shape), dtype=state.dtype, blocksize=state.blocksize,
        code=state.code, quant_type="nf4", offset=state.offset,
        state2=None if state2 is None else bnb_functional.QuantState(
            absmax=state2.absmax, code=state2.code, blocksize=state2.blocksize, dtype=torch.float32),
    )
    want = bnb_functional.dequantize_4bit(packed, bnb_state)
    assert torch.equal(dequantize_4bit(packed, state), want)
    assert torch.equal(dequantize_4bit_reference(packed, state), want)
    assert (want.float() - weight.float()).abs().mean() < 0.006  # NF4 error at scale 0.05
