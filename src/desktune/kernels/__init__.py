"""Kernels: tensors in, tensors out; nothing here imports transformers.

Each op lives in its own file with its PyTorch reference (`<op>_reference`). The
public `<op>()` runs the Triton kernel where it can (CUDA tensors, triton present)
and the reference elsewhere, so models patched on the CPU compute the same math.
Import the op from its module, e.g. `from desktune.kernels.rmsnorm import rmsnorm`.

  rmsnorm.py        rmsnorm(x, weight, eps, offset)           Llama and Gemma (1 + w) forms
  rope.py           apply_rope(q, k, cos, sin)                in place, partial rotary
  swiglu.py         swiglu(gate, up), geglu(gate, up, approximate)   in-place backward
  clamped_swiglu.py clamped_swiglu(gate_up, alpha, limit)     gpt-oss experts, in-place backward
  cross_entropy.py  fused_linear_cross_entropy(hidden, weight, labels, ...)   chunked
  nf4.py            dequantize_4bit(packed, quant_state), quantize_nf4(weight)
  nf4_matmul.py     nf4_matmul(a, packed, quant_state)        dequantise-into-GEMM
  qlora.py          qlora_linear(x, packed, quant_state, lora_A, lora_B, scaling, bias)
  qlora_mlp.py      qlora_mlp(x, gate, up, down, activation)  three 4-bit LoRA projections

The autograd Functions (RMSNormFunction, RoPEFunction, GLUFunction, ...) run the Triton
code on any device: CPU tensors go through Triton's interpreter (see _triton.py), which
is how the CPU tests exercise the kernels; tests/kernels/test_kernel_compile.py compiles
each kernel for sm_90 and sm_120 with triton's bundled ptxas, no GPU needed.
"""
