"""bitsandbytes: whether it can run here, the NF4 / 8-bit configs, and dequantisation."""

from __future__ import annotations

import torch
from torch import nn

from desktune.errors import QuantizationUnavailableError


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantise on this machine, or None when it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library raising at import
        return f"bitsandbytes is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        from bitsandbytes import cextension

        if getattr(cextension, "lib", None) is None or type(cextension.lib).__name__ == "ErrorHandlerMockBNBNativeLibrary":
            return "bitsandbytes found no native CUDA library for this GPU / CUDA version"
    return None


def require_bitsandbytes(what: str) -> None:
    problem = bitsandbytes_problem()
    if problem is not None:
        raise QuantizationUnavailableError(
            f"{what} needs bitsandbytes, but {problem}. Install it with `pip install 'bitsandbytes>=0.45'` "
            f"(the desktune image has it), or load the model in 16-bit with load_in_4bit=False, load_in_8bit=False."
        )


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """NF4 with double quantisation (QLoRA's recipe), or LLM.int8; None for 16-bit."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        require_bitsandbytes("load_in_4bit=True")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    require_bitsandbytes("load_in_8bit=True")
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(module, "weight")


def dequantize_linear_weight(module: nn.Module) -> torch.Tensor:
    """The 16/32-bit weight of a bitsandbytes Linear4bit / Linear8bitLt (a new tensor)."""
    from peft.utils.integrations import dequantize_bnb_weight

    undo_cpu_inference_packing(module)
    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))


def keep_storage_layout_on_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking this model's 4-bit weights for its CPU inference kernel.

    That repacking (on the first eval forward without gradients, CPUs with AVX512-BF16)
    is lossy to undo: training after a generate() would run on slightly different weights.
    The flag is set per layer instance; on the GPU it changes nothing. Returns how many.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def undo_cpu_inference_packing(module: nn.Module) -> bool:
    """Put a bitsandbytes Linear4bit's weight back in its storage layout; returns whether it had to.

    On the CPU, bitsandbytes repacks 4-bit weights for its inference kernel on the first
    eval forward without gradients. Code that reads the packed weight itself (dequantising,
    desktune's fused QLoRA path, training again after generate) needs the storage layout
    back, which bitsandbytes' own state_dict saving restores the same way.
    """
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    return True
