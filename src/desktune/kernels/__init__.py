"""Kernels: tensors in, tensors out; nothing here imports transformers.

Each op lives in its own file with its PyTorch reference (`<op>_reference`). The
public `<op>()` runs the Triton kernel where it can (CUDA tensors, triton present)
and the reference elsewhere, so models patched on the CPU compute the same math.
Import the op from its module, e.g. `from desktune.kernels.rmsnorm import rmsnorm`.
"""
