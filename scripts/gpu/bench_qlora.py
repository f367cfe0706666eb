#!/usr/bin/env python
"""Which 4-bit base matmul to use per projection: dequantise + cuBLAS, or fused dequant-GEMM.

For each Llama-3.1-8B projection shape (q, k, v, o, gate, up, down) and 8192 tokens, bf16,
LoRA r=16, it times forward + backward (grads for x, A, B) of desktune's qlora_linear with
matmul="dequant" and matmul="fused", the same LoRA layer on a bf16 weight (the 16-bit step
the issue compares against), and the standalone dequantisation; medians of
triton.testing.do_bench. The last column says which mode to keep for that shape. A last
table times the whole MLP: qlora_mlp (one Function) against three qlora_linear calls around
swiglu, and against the bf16 MLP, with the peak memory each adds.

    python scripts/gpu/bench_qlora.py [--tokens 8192] [--rank 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from desktune.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_nf4  # noqa: E402
from desktune.kernels.qlora import qlora_linear  # noqa: E402
from desktune.kernels.qlora_mlp import qlora_mlp  # noqa: E402
from desktune.kernels.swiglu import swiglu  # noqa: E402

# (name, out_features, in_features) of Llama-3.1-8B's projections
SHAPES = [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
          ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)]


def median_ms(fn, grads, device):
    if device != "cuda":
        fn()  # --device cpu: check the script only
        return float("nan")
    from triton.testing import do_bench

    fn()
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale-shapes", type=int, default=1, help="divide every shape by this (for --device cpu)")
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_qlora: needs a CUDA GPU", file=sys.stderr)
        return 2
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (untimed check)"
    print(f"# {name} | torch {torch.__version__} | tokens {a.tokens} | r {a.rank} | {dt} | fwd+bwd ms (median)")
    print(f"{'proj':10} {'out x in':>12} {'bf16 LoRA':>10} {'dequant':>9} {'fused':>9} {'dq only':>8} "
          f"{'GB/s':>6} {'best/bf16':>9}  keep")
    for proj, out_f, in_f in SHAPES:
        out_f, in_f = out_f // a.scale_shapes, in_f // a.scale_shapes
        torch.manual_seed(0)
        packed, state = quantize_nf4((torch.randn(out_f, in_f, device=dev) * 0.02).to(dt))
        dense = dequantize_4bit_reference(packed, state)
        x = torch.randn(a.tokens, in_f, device=dev, dtype=dt, requires_grad=True)
        la = (torch.randn(a.rank, in_f, device=dev) * 0.01).requires_grad_()
        lb = (torch.randn(out_f, a.rank, device=dev) * 0.01).requires_grad_()
        dy = torch.randn(a.tokens, out_f, device=dev, dtype=dt)
        grads = [x, la, lb]

        def lora16():
            y = x @ dense.t() + 2.0 * ((x @ la.to(dt).t()) @ lb.to(dt).t())
            y.backward(dy)

        def mode(m):
            return lambda: qlora_linear(x, packed, state, la, lb, 2.0, matmul=m).backward(dy)

        t16 = median_ms(lora16, grads, dev)
        t_dq = median_ms(mode("dequant"), grads, dev)
        t_fused = median_ms(mode("fused"), grads, dev)
        t_only = median_ms(lambda: dequantize_4bit(packed, state), [], dev)
        # bytes moved by one dequantisation: packed + absmax codes in, bf16 out
        gbs = (packed.numel() + state.absmax.numel() + out_f * in_f * 2) / (t_only * 1e-3) / 1e9
        best = min(t_dq, t_fused)
        keep = "fused" if t_fused < t_dq else "dequant"
        print(f"{proj:10} {f'{out_f}x{in_f}':>12} {t16:10.3f} {t_dq:9.3f} {t_fused:9.3f} {t_only:8.3f} "
              f"{gbs:6.0f} {best / t16:9.2f}  {keep}")
        del packed, state, dense, x, la, lb, dy
    mlp_table(a, dev, dt)
    return 0


def peak_mib(fn, device):
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def mlp_table(a, dev, dt):
    hidden, inter = 4096 // a.scale_shapes, 14336 // a.scale_shapes
    torch.manual_seed(0)
    projections, dense = [], []
    for out_f, in_f in ((inter, hidden), (inter, hidden), (hidden, inter)):
        packed, state = quantize_nf4((torch.randn(out_f, in_f, device=dev) * 0.02).to(dt))
        la = (torch.randn(a.rank, in_f, device=dev) * 0.01).requires_grad_()
        lb = (torch.randn(out_f, a.rank, device=dev) * 0.01).requires_grad_()
        projections.append((packed, state, la, lb, 2.0))
        dense.append(dequantize_4bit_reference(packed, state))
    x = torch.randn(a.tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(a.tokens, hidden, device=dev, dtype=dt)
    grads = [x] + [t for p in projections for t in p[2:4]]

    def lora16(z, i):
        la, lb = projections[i][2], projections[i][3]
        return z @ dense[i].t() + 2.0 * ((z @ la.to(dt).t()) @ lb.to(dt).t())

    variants = {
        "bf16 LoRA MLP": lambda: lora16(swiglu(lora16(x, 0), lora16(x, 1)), 2).backward(dy),
        "3 x qlora_linear": lambda: qlora_linear(
            swiglu(qlora_linear(x, *projections[0], matmul="dequant"), qlora_linear(x, *projections[1], matmul="dequant")),
            *projections[2], matmul="dequant").backward(dy),
        "qlora_mlp dequant": lambda: qlora_mlp(x, *projections, matmul="dequant").backward(dy),
        "qlora_mlp fused": lambda: qlora_mlp(x, *projections, matmul="fused").backward(dy),
    }
    print(f"\n# Llama-3.1-8B MLP ({hidden} -> {inter} -> {hidden}), {a.tokens} tokens, fwd+bwd")
    print(f"{'variant':20} {'median ms':>10} {'peak MiB':>9}")
    for name, fn in variants.items():
        ms = median_ms(fn, grads, dev)
        print(f"{name:20} {ms:10.3f} {peak_mib(fn, dev):9.0f}")
        for t in grads:
            t.grad = None


if __name__ == "__main__":
    sys.exit(main())
