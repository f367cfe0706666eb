#!/usr/bin/env python
"""Micro-benchmark of desktune's Triton kernels on one CUDA GPU.

Each op, forward + backward at Llama-3.1-8B sizes (bf16), three ways: desktune's public op
(Triton on CUDA), its PyTorch reference, and torch.compile of that reference. Median time
of triton.testing.do_bench and the peak memory one call adds over its inputs; one table.

    python scripts/gpu/bench_kernels.py [--tokens 8192] [--only rmsnorm,ce] [--no-compile]

The in-place kernels (SwiGLU's backward, RoPE) get non-leaf inputs as a model gives them,
made by `leaf * 1` inside the timed call for every variant; the row "input copy only"
times that copy (with its backward) so it can be subtracted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from desktune.kernels.clamped_swiglu import clamped_swiglu, clamped_swiglu_reference  # noqa: E402
from desktune.kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference  # noqa: E402
from desktune.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_nf4  # noqa: E402
from desktune.kernels.qlora import qlora_linear, qlora_linear_reference  # noqa: E402
from desktune.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from desktune.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from desktune.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference  # noqa: E402

DT = torch.bfloat16
DEVICE = "cuda"  # --device cpu runs every case once, untimed, to check the script itself


def measure(fn, grads):
    """(median ms, peak MiB added by one call)."""
    from triton.testing import do_bench

    if DEVICE != "cuda":
        fn()
        return float("nan"), 0.0
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median")
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in grads:
        t.grad = None
    return ms, peak


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DT).requires_grad_()


def case_rmsnorm(a, offset):
    x, w = _leaf(a.tokens, a.hidden), _leaf(a.hidden, scale=0.1)
    dy = torch.randn_like(x)

    def make(op):
        return lambda: op(x, w, 1e-5, offset).backward(dy)

    return {"desktune": make(rmsnorm), "reference": make(rmsnorm_reference),
            "compiled": make(torch.compile(rmsnorm_reference))}, [x, w]


def case_glu(a, kind):
    g0, u0 = _leaf(a.tokens, a.intermediate, scale=2.0), _leaf(a.tokens, a.intermediate)
    dy = torch.randn_like(g0)
    ours = swiglu if kind == "silu" else (lambda g, u: geglu(g, u, "tanh"))
    ref = swiglu_reference if kind == "silu" else (lambda g, u: geglu_reference(g, u, "tanh"))

    def make(op):
        return lambda: op(g0 * 1, u0 * 1).backward(dy)

    return {"desktune": make(ours), "reference": make(ref), "compiled": make(torch.compile(ref)),
            "input copy only": make(lambda g, u: g + u)}, [g0, u0]


def case_clamped_swiglu(a):
    # gpt-oss-20b experts: tokens x top-4 rows, intermediate 2880 interleaved (gate, up)
    gu0 = _leaf(a.tokens * 4, 2 * 2880, scale=4.0)
    dy = torch.randn(a.tokens * 4, 2880, device=DEVICE, dtype=DT)

    def make(op):
        return lambda: op(gu0 * 1, 1.702, 7.0).backward(dy)

    return {"desktune": make(clamped_swiglu), "reference": make(clamped_swiglu_reference),
            "compiled": make(torch.compile(clamped_swiglu_reference)),
            "input copy only": make(lambda t, *_: t[..., ::2] * 1)}, [gu0]


def case_rope(a):
    batch, seq = max(1, a.tokens // 2048), min(a.tokens, 2048)
    q0, k0 = _leaf(batch, seq, a.heads, 128), _leaf(batch, seq, a.kv_heads, 128)
    pos = torch.arange(seq, device=DEVICE).repeat(batch, 1)
    inv = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, device=DEVICE).float() / 128)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    dq, dk = torch.randn(batch, a.heads, seq, 128, device=DEVICE, dtype=DT), torch.randn(
        batch, a.kv_heads, seq, 128, device=DEVICE, dtype=DT)

    def make(op):
        def run():
            q, k = op((q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2), cos, sin)
            torch.autograd.backward((q, k), (dq, dk))
        return run

    return {"desktune": make(apply_rope), "reference": make(apply_rope_reference),
            "compiled": make(torch.compile(apply_rope_reference)),
            "input copy only": make(lambda q, k, cos, sin: (q, k))}, [q0, k0]


def case_ce(a):
    h = _leaf(a.tokens, a.hidden)
    w = (torch.randn(a.vocab, a.hidden, device=DEVICE) * 0.02).to(DT)
    y = torch.randint(0, a.vocab, (a.tokens,), device=DEVICE)
    y[::7] = -100

    def make(op, **kw):
        return lambda: op(h, w, y, **kw).backward()

    return {"desktune": make(fused_linear_cross_entropy),
            "desktune-torch-chunks": make(fused_linear_cross_entropy, use_kernel=False),
            "reference": make(fused_linear_cross_entropy_reference),
            "compiled": make(torch.compile(fused_linear_cross_entropy_reference))}, [h]


def case_dequant(a):
    packed, state = quantize_nf4(torch.randn(a.intermediate, a.hidden, device=DEVICE).to(DT) * 0.02)
    compiled = torch.compile(dequantize_4bit_reference)
    variants = {"desktune": lambda: dequantize_4bit(packed, state),
                "reference": lambda: dequantize_4bit_reference(packed, state),
                "compiled": lambda: compiled(packed, state)}
    try:
        import bitsandbytes.functional as bnbf

        bpacked, bstate = bnbf.quantize_4bit(torch.randn(a.intermediate, a.hidden, device=DEVICE).to(DT))
        variants["bitsandbytes"] = lambda: bnbf.dequantize_4bit(bpacked, bstate)
    except Exception:  # not installed on the GPU machine unless carried as a wheel
        pass
    return variants, []


def case_qlora(a):
    packed, state = quantize_nf4(torch.randn(a.hidden, a.hidden, device=DEVICE).to(DT) * 0.02)
    dense = dequantize_4bit_reference(packed, state)
    x = _leaf(a.tokens, a.hidden)
    la = (torch.randn(16, a.hidden, device=DEVICE) * 0.01).requires_grad_()
    lb = (torch.randn(a.hidden, 16, device=DEVICE) * 0.01).requires_grad_()
    dy = torch.randn(a.tokens, a.hidden, device=DEVICE, dtype=DT)

    def dense16(x, *_):
        return x @ dense.t() + 2.0 * ((x @ la.to(DT).t()) @ lb.to(DT).t())

    def make(op):
        return lambda: op(x, packed, state, la, lb, 2.0).backward(dy)

    return {"desktune-dequant": make(lambda *p: qlora_linear(*p, matmul="dequant")),
            "desktune-fused": make(lambda *p: qlora_linear(*p, matmul="fused")),
            "reference": make(qlora_linear_reference),
            "compiled": make(torch.compile(qlora_linear_reference)),
            "bf16-dense-lora": make(dense16)}, [x, la, lb]


CASES = {
    "rmsnorm": ("RMSNorm [T, H]", lambda a: case_rmsnorm(a, 0.0)),
    "rmsnorm-gemma": ("RMSNorm (1+w) [T, H]", lambda a: case_rmsnorm(a, 1.0)),
    "swiglu": ("SwiGLU [T, I]", lambda a: case_glu(a, "silu")),
    "geglu": ("GeGLU tanh [T, I]", lambda a: case_glu(a, "gelu_tanh")),
    "clamped-swiglu": ("gpt-oss SwiGLU [4T, 2x2880]", case_clamped_swiglu),
    "rope": ("RoPE q,k [B, H, L, 128]", case_rope),
    "ce": ("linear+CE [T, H] x [V, H]", case_ce),
    "dequant": ("NF4 dequant [I, H] (fwd only)", case_dequant),
    "qlora": ("QLoRA linear [T, H] x [H, H] r16", case_qlora),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--device", default="cuda", help="cpu: run each case once untimed (checks the script)")
    a = p.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (untimed check)"
    print(f"# {gpu} | torch {torch.__version__} | triton {triton.__version__} | "
          f"T={a.tokens} H={a.hidden} I={a.intermediate} V={a.vocab} bf16, fwd+bwd unless noted")
    print(f"{'op':34} {'variant':22} {'median ms':>10} {'x ref':>7} {'peak MiB':>9}")
    names = [n for n in a.only.split(",") if n] or list(CASES)
    for name in names:
        title, build = CASES[name]
        variants, grads = build(a)
        if a.no_compile:
            variants.pop("compiled", None)
        results = {}
        for variant, fn in variants.items():
            try:
                results[variant] = measure(fn, grads)
            except Exception as exc:  # one failing variant (e.g. OOM of a reference) must not hide the rest
                print(f"{title:34} {variant:22} failed: {type(exc).__name__}: {str(exc)[:80]}")
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        ref_ms = results.get("reference", (float("nan"), 0))[0]
        for variant, (ms, peak) in results.items():
            print(f"{title:34} {variant:22} {ms:10.3f} {ref_ms / ms:6.2f}x {peak:9.0f}")
        del variants, grads
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
