"""Triton plumbing shared by the kernel files: optional import and per-launch device choice.

A kernel is declared with `@kernel` instead of `@triton.jit`. Launching `k[grid](...)`
compiles it with Triton when the first tensor argument lives on CUDA and runs it in
Triton's interpreter when it lives on the CPU. The choice is made per launch, so no
environment variable (TRITON_INTERPRET) has to be set process-wide and tests can run the
real kernel code on CPU tensors next to code that uses compiled kernels.

In the interpreter a kernel sees `tl` through a stand-in module whose `@triton.jit` library
functions (tl.sum, tl.max, tl.sigmoid, ...) are interpreted too: triton only does that itself
when TRITON_INTERPRET=1 was set before it was imported. Kernels must not call `@triton.jit`
helpers of ours (write the math inline) nor tl library functions that call other library
functions by bare name (tl.softmax).
"""

from __future__ import annotations

import types

import torch

try:  # CUDA builds of torch ship triton; CPU test machines install it from the test extra.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    # Kernel signatures annotate `tl.constexpr` at definition time; give them a stand-in.
    tl = types.SimpleNamespace(constexpr=object)

HAS_TRITON = triton is not None


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the public op should launch its Triton kernel: triton present, CUDA tensors."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def owned_by_caller(t: torch.Tensor) -> bool:
    """A leaf or a view of one: the caller's tensor, which in-place kernels must not overwrite."""
    return t.is_leaf or (t._base is not None and t._base.is_leaf)


class _InterpretedLanguage(types.ModuleType):
    """`triton.language` for an interpreted kernel: jit'd library functions run interpreted."""

    def __init__(self):
        super().__init__("triton.language")
        self._interpreted = {}

    def __getattr__(self, name):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        value = getattr(tl, name)
        if not isinstance(value, JITFunction):
            return value
        if name not in self._interpreted:
            self._interpreted[name] = InterpretedFunction(value.fn)
        return self._interpreted[name]


def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    # Same code, own globals: `tl` is the stand-in; triton's interpreter finds the real
    # language modules among the globals and patches (then restores) them for the launch.
    scope = dict(fn.__globals__)
    scope.update(tl=_InterpretedLanguage(), _triton_language=tl, _triton_language_core=tl.core)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__annotations__ = dict(fn.__annotations__)
    return InterpretedFunction(clone)


class Kernel:
    """A Triton kernel that compiles for CUDA tensors and interprets for CPU tensors."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None

    def _for(self, args) -> object:
        if not HAS_TRITON:
            raise RuntimeError(
                f"{self.__name__} needs triton, which is not installed; install it "
                "(pip install 'desktune[kernels]') or call the op's *_reference function"
            )
        on_cuda = next((a.is_cuda for a in args if isinstance(a, torch.Tensor)), False)
        if on_cuda:
            if self._compiled is None:
                self._compiled = triton.jit(self.fn)
            return self._compiled
        if self._interpreted is None:
            self._interpreted = _interpreted(self.fn)
        return self._interpreted

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if 0 in grid:  # empty input (e.g. no tokens): nothing to compute, and Triton rejects it
                return None
            return self._for(args)[grid](*args, **kwargs)

        return launch


def kernel(fn) -> Kernel:
    """Decorator for our Triton kernels (see module docstring)."""
    return Kernel(fn)
