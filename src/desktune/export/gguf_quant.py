"""Quantization methods for GGUF export.

f32 / f16 / bf16 / q8_0 are written directly in Python (gguf.quants). Everything else
(k-quants such as q4_k_m) goes through llama.cpp's own quantizer, which picks a type per
tensor: the `llama-quantize` binary when it is on PATH (the image builds one), else
llama-cpp-python's `llama_model_quantize`, run in a child process so a crash in native
code cannot take the caller's Python (or notebook kernel) down with it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from desktune.errors import GGUFExportError

ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}

# Methods gguf.quants writes: name -> (GGMLQuantizationType name, LlamaFileType name).
PYTHON_METHODS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
# Methods llama.cpp's quantizer writes: name -> LlamaFileType name (llama-quantize takes the
# same name without "MOSTLY_").
LLAMA_CPP_METHODS = {
    "q2_k": "MOSTLY_Q2_K",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
}


@dataclass(frozen=True)
class QuantMethod:
    name: str  # normalised, e.g. "q4_k_m"
    python: bool  # True: written by gguf.quants; False: needs llama.cpp's quantizer

    @property
    def file_tag(self) -> str:
        return self.name.upper()


def parse_method(method: str) -> QuantMethod:
    name = ALIASES.get(method.lower(), method.lower())
    if name in PYTHON_METHODS:
        return QuantMethod(name, python=True)
    if name in LLAMA_CPP_METHODS:
        return QuantMethod(name, python=False)
    known = sorted(PYTHON_METHODS) + sorted(LLAMA_CPP_METHODS) + sorted(ALIASES)
    raise GGUFExportError(f"unknown quantization_method {method!r}; choose one of: {', '.join(known)}.")


def tensor_type(method: QuantMethod, shape: tuple[int, ...], gguf_name: str = ""):
    """The GGML type a tensor gets: 1-D tensors (norms, rope factors), biases and MoE routers
    stay f32 as llama.cpp's converter keeps them; q8_0 needs rows that are a multiple of its
    32-wide block, else f16."""
    import gguf

    keep_f32 = gguf_name.endswith((".bias", "_norm.weight")) or ".ffn_gate_inp." in gguf_name
    if len(shape) < 2 or keep_f32 or method.name == "f32":
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[PYTHON_METHODS[method.name][0]]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block != 0:
        return gguf.GGMLQuantizationType.F16
    return qtype


def file_type(method: QuantMethod) -> int:
    import gguf

    return int(gguf.LlamaFileType[PYTHON_METHODS[method.name][1]])


def find_quantizer() -> str | None:
    """'binary:<path>' or 'llama_cpp', whichever llama.cpp quantizer this machine has."""
    binary = shutil.which("llama-quantize")
    if binary:
        return f"binary:{binary}"
    if importlib.util.find_spec("llama_cpp") is not None:
        return "llama_cpp"
    return None


_CHILD = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if rc != 0 else 0)
"""


def require_quantizer(method: QuantMethod) -> str:
    """The llama.cpp quantizer to use for `method`, or a GGUFExportError that says how to get one."""
    quantizer = find_quantizer()
    if quantizer is None:
        raise GGUFExportError(
            f"quantization_method={method.name!r} needs llama.cpp's quantizer: put a `llama-quantize` binary on "
            "PATH (build llama.cpp: cmake -B build && cmake --build build --target llama-quantize) or "
            "`pip install llama-cpp-python`; or export with f16, bf16 or q8_0, which need neither."
        )
    return quantizer


def quantize_with_llama_cpp(src: Path, dst: Path, method: QuantMethod, threads: int = 0) -> None:
    """Quantize a 16-bit GGUF file into dst with llama.cpp; raises GGUFExportError on failure."""
    import gguf

    quantizer = require_quantizer(method)
    ftype = LLAMA_CPP_METHODS[method.name]
    if quantizer.startswith("binary:"):
        cmd = [quantizer.split(":", 1)[1], str(src), str(dst), ftype.removeprefix("MOSTLY_")]
        if threads:
            cmd.append(str(threads))
    else:
        cmd = [sys.executable, "-c", _CHILD, str(src), str(dst), str(int(gguf.LlamaFileType[ftype])), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise GGUFExportError(
            f"llama.cpp's quantizer ({quantizer}) failed with exit code {proc.returncode} while writing "
            f"{method.name} to {dst}:\n{tail}"
        )
