#!/usr/bin/env python3
"""Build-time Triton check for the image's target GPUs, with no GPU present.

Usage: warm-triton.py "12.0"  (a TORCH_CUDA_ARCH_LIST: "8.9;9.0", "9.0+PTX", ...)

For each target, compiles a probe kernel ahead of time down to a cubin with Triton's bundled
ptxas: the build fails here, not at a user's first training step, if this Triton cannot
target that GPU. What it cannot do without a GPU is fill the cache for desktune's own kernels:
Triton's cache key holds each call's specialisation (dtypes, pointer alignment, the block sizes
picked from the device's properties), which only a real call decides. Those kernels compile on
first use into TRITON_CACHE_DIR, a named volume in compose.yaml, so once per machine.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile


def parse_arch_list(arch_list: str) -> list[int]:
    """'8.9;9.0+PTX 12.0' -> [89, 90, 120] (compute capability as major*10+minor)."""
    out = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", item)
        if m is None:
            raise ValueError(f"not a CUDA arch: {item!r} (expected e.g. 8.9, 9.0 or 12.0)")
        cc = int(m.group(1)) * 10 + int(m.group(2))
        if cc not in out:
            out.append(cc)
    return out


def main(argv: list[str]) -> int:
    arches = parse_arch_list(argv[1] if len(argv) > 1 else "12.0")
    # A throwaway cache: the probe kernel is of no use at run time.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-probe-")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(y_ptr + offs, x * tl.sigmoid(x), mask=mask)

    signature = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}
    for cc in arches:
        src = ASTSource(fn=_probe, signature=signature, constexprs={"BLOCK": 1024})
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32))
        except Exception as e:  # noqa: BLE001 - report whatever the toolchain raised
            print(f"warm-triton: Triton {triton.__version__} cannot compile for sm_{cc}: {e}", file=sys.stderr)
            return 1
        print(f"warm-triton: Triton {triton.__version__} compiles for sm_{cc} "
              f"({len(kernel.asm['cubin'])}-byte probe cubin, no GPU needed)")
    print("warm-triton: desktune's kernels are compiled on first use on the GPU (their cache key "
          "depends on the call), into TRITON_CACHE_DIR; keep that volume to compile them only once")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
