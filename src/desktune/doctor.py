"""GPU pre-flight: can this machine run desktune's kernels, and if not, what to do about it.

`gather()` probes the real machine (driver, CUDA, compute capability, and whether torch,
Triton, xformers and bitsandbytes actually run a kernel on the GPU); `diagnose()` turns those
facts into findings with actionable messages. The two are split so the decisions can be tested
with fake facts on a machine without a GPU. `desktune doctor` (cli/doctor.py) prints the report.
"""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# CUDA 12.8 (torch 2.10's wheels, and the first CUDA with Blackwell / sm_120) needs this driver.
MIN_DRIVER_MAJOR = 570
MIN_CUDA_FOR_DRIVER = (12, 8)

NO_KERNEL_IMAGE = "no kernel image is available for execution on the device"
_DRIVER_TOO_OLD = (
    "driver version is insufficient",
    "nvidia driver on your system is too old",
    "cuda_error_insufficient_driver",
    "ptx was compiled with an unsupported toolchain",
)


@dataclass
class GPU:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gib: float | None = None


@dataclass
class Probe:
    """One library's check: installed version and whether its kernel ran on the GPU."""

    name: str
    version: str | None  # None: not installed
    ran: bool | None = None  # None: not tried (not installed, or no GPU)
    error: str | None = None
    optional: bool = False


@dataclass
class Facts:
    python: str
    torch_version: str | None
    torch_cuda: str | None  # CUDA version torch was built with; None for a CPU build
    torch_archs: list[str] = field(default_factory=list)
    cuda_available: bool = False
    cuda_error: str | None = None  # why CUDA did not initialise, when it did not
    driver_version: str | None = None  # e.g. "570.124.04"
    gpus: list[GPU] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)


@dataclass
class Finding:
    level: str  # "ok", "warn" or "error"
    message: str


# ------------------------------------------------------------------------------- decisions


def parse_version(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:3])


def arch_supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a build for `archs` (torch.cuda.get_arch_list()) has code this GPU can run.

    A cubin for sm_XY runs on the same major with minor >= Y; PTX (compute_XY) is JIT-compiled
    for any GPU with capability >= XY. Arch-specific targets (sm_90a) run only on that exact GPU.
    """
    cc = capability[0] * 10 + capability[1]
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch)
        if m is None:
            continue
        kind, num, suffix = m.group(1), int(m.group(2)), m.group(3)
        major, minor = divmod(num, 10)
        if kind == "compute" and num <= cc:
            return True
        if kind == "sm" and suffix and num == cc:
            return True
        if kind == "sm" and not suffix and major == capability[0] and minor <= capability[1]:
            return True
    return False


def arch_list_for(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def explain_error(library: str, error: str, gpu: GPU | None) -> str:
    """An actionable message for a failed kernel run, recognising the common causes."""
    low = error.lower()
    if NO_KERNEL_IMAGE in low:
        if gpu is not None:
            sm = f"sm_{gpu.capability[0]}{gpu.capability[1]}"
            target = arch_list_for(gpu.capability)
            where = f"this GPU ({gpu.name}, {sm})"
        else:
            target, where = "<major.minor of your GPU>", "this GPU"
        return (
            f"{library} has no kernels compiled for {where}: 'no kernel image is available for "
            f"execution on the device'. Rebuild the image for your GPU with "
            f'`docker compose build --build-arg TORCH_CUDA_ARCH_LIST="{target}"` '
            f"(docs/workstation.md), or install a {library} build that includes {target}."
        )
    if any(s in low for s in _DRIVER_TOO_OLD):
        return (
            f"{library} failed because the NVIDIA driver is too old for CUDA "
            f"{MIN_CUDA_FOR_DRIVER[0]}.{MIN_CUDA_FOR_DRIVER[1]}: install driver "
            f">= {MIN_DRIVER_MAJOR} on the host (`nvidia-smi` shows the version) and restart. ({error.strip()})"
        )
    if "out of memory" in low:
        return f"{library} ran out of GPU memory on a tiny test: another process holds the GPU (see `nvidia-smi`)."
    return f"{library} failed on the GPU: {error.strip()}"


def diagnose(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    if facts.torch_version is None:
        return [Finding("error", "torch is not installed: `pip install torch` (the image has it).")]

    driver = parse_version(facts.driver_version)
    if driver and driver[0] < MIN_DRIVER_MAJOR:
        out.append(
            Finding(
                "error",
                f"NVIDIA driver {facts.driver_version} is too old: CUDA "
                f"{MIN_CUDA_FOR_DRIVER[0]}.{MIN_CUDA_FOR_DRIVER[1]} (torch's CUDA build here) needs "
                f"driver >= {MIN_DRIVER_MAJOR}. Update the driver on the host and restart the container.",
            )
        )
    elif driver:
        out.append(Finding("ok", f"NVIDIA driver {facts.driver_version}"))

    if not facts.cuda_available:
        if facts.cuda_error and not (driver and driver[0] < MIN_DRIVER_MAJOR):
            out.append(Finding("error", explain_error("CUDA", facts.cuda_error, None)))
        if facts.torch_cuda is None:
            out.append(
                Finding("warn", f"torch {facts.torch_version} is a CPU-only build: no GPU training. "
                        "The image's torch is a CUDA build; outside it, install torch from PyPI.")
            )
        out.append(
            Finding(
                "warn",
                "No CUDA GPU is visible: running CPU-only (fine for tests, far too slow to train). "
                "With an NVIDIA GPU: install the NVIDIA Container Toolkit on the host and start the "
                "container with the GPU (`docker compose up`, which reserves it, or `docker run --gpus all`).",
            )
        )
        return out

    cuda = parse_version(facts.torch_cuda)
    for gpu in facts.gpus:
        sm = f"sm_{gpu.capability[0]}{gpu.capability[1]}"
        if gpu.capability >= (12, 0) and cuda and cuda[:2] < MIN_CUDA_FOR_DRIVER:
            out.append(
                Finding("error", f"GPU {gpu.index} ({gpu.name}, {sm}) needs CUDA >= 12.8, but torch "
                        f"{facts.torch_version} was built with CUDA {facts.torch_cuda}: install a cu128 "
                        "(or newer) torch build, as the image does.")
            )
        elif facts.torch_archs and not arch_supported(gpu.capability, facts.torch_archs):
            out.append(
                Finding("error", f"torch {facts.torch_version} has no kernels for GPU {gpu.index} "
                        f"({gpu.name}, {sm}); it was built for {' '.join(facts.torch_archs)}. Install a "
                        f"torch build that includes {sm}.")
            )
        else:
            out.append(Finding("ok", f"GPU {gpu.index}: {gpu.name}, compute capability "
                               f"{gpu.capability[0]}.{gpu.capability[1]}"))

    first_gpu = facts.gpus[0] if facts.gpus else None
    for probe in facts.probes:
        if probe.version is None:
            level = "warn" if probe.optional else "error"
            extra = " (optional: desktune falls back to PyTorch's attention)" if probe.optional else ""
            out.append(Finding(level, f"{probe.name} is not installed{extra}."))
        elif probe.ran:
            out.append(Finding("ok", f"{probe.name} {probe.version}: kernels run on this GPU"))
        elif probe.error is not None or probe.ran is False:
            level = "warn" if probe.optional else "error"
            out.append(Finding(level, explain_error(f"{probe.name} {probe.version}", probe.error, first_gpu)))
    return out


def exit_code(facts: Facts, findings: list[Finding], require_gpu: bool) -> int:
    """0 when nothing is broken. No GPU at all is a warning, unless the caller requires one."""
    if any(f.level == "error" for f in findings):
        return 1
    if require_gpu and not facts.cuda_available:
        return 1
    return 0


def format_report(facts: Facts, findings: list[Finding]) -> str:
    lines = ["desktune doctor", f"  python        {facts.python}"]
    torch_line = facts.torch_version or "not installed"
    if facts.torch_version:
        torch_line += f" (CUDA {facts.torch_cuda})" if facts.torch_cuda else " (CPU build)"
        if facts.torch_archs:
            torch_line += f", built for {' '.join(facts.torch_archs)}"
    lines.append(f"  torch         {torch_line}")
    lines.append(f"  driver        {facts.driver_version or 'none found'}")
    for gpu in facts.gpus:
        mem = f", {gpu.memory_gib:.0f} GiB" if gpu.memory_gib else ""
        lines.append(f"  GPU {gpu.index:<9} {gpu.name}, compute capability "
                     f"{gpu.capability[0]}.{gpu.capability[1]}{mem}")
    for probe in facts.probes:
        state = "not installed" if probe.version is None else probe.version
        if probe.version is not None:
            state += {True: ", kernels run", False: ", FAILED", None: ""}[probe.ran]
        lines.append(f"  {probe.name:<13} {state}")
    tags = {"ok": "OK     ", "warn": "WARNING", "error": "ERROR  "}
    lines += [f"{tags[f.level]} {f.message}" for f in findings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- probing


def read_driver_version() -> str | None:
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc.read_text())
        if m:
            return m.group(1)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _run_probe(name: str, module: str, kernel: Callable[[], None] | None, optional: bool = False) -> Probe:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return Probe(name, None, optional=optional)
    except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
        return Probe(name, "unknown", ran=False, error=f"import failed: {e}", optional=optional)
    probe = Probe(name, getattr(mod, "__version__", "unknown"), optional=optional)
    if kernel is None:
        return probe
    try:
        kernel()
        probe.ran = True
    except Exception as e:  # noqa: BLE001
        probe.ran, probe.error = False, f"{type(e).__name__}: {e}"
    return probe


def _torch_kernel() -> None:
    import torch

    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    if float((x * 2).sum()) != 1024 * 1023:
        raise RuntimeError("torch computed a wrong sum on the GPU")


def _triton_kernel() -> None:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)

    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    double[(4,)](x, y, 1000, BLOCK=256)
    if not torch.equal(y, x * 2):
        raise RuntimeError("a Triton kernel computed a wrong result")


def _xformers_kernel() -> None:
    import torch
    import xformers.ops as xops

    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    out = xops.memory_efficient_attention(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2),
                                                           q.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def _bitsandbytes_kernel() -> None:
    import bitsandbytes.functional as F
    import torch

    w = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, quant_type="nf4")
    err = (F.dequantize_4bit(packed, state) - w).abs().mean() / w.abs().mean()
    if not err < 0.2:
        raise RuntimeError(f"NF4 round trip error {float(err):.3f} is far too large")


def gather() -> Facts:
    try:
        import torch
    except ImportError:
        return Facts(platform.python_version(), None, None)
    facts = Facts(platform.python_version(), torch.__version__, torch.version.cuda,
                  driver_version=read_driver_version())
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
            facts.cuda_available = torch.cuda.is_available()
        except Exception as e:  # noqa: BLE001 - the message is what diagnose() needs
            facts.cuda_error = str(e)
    if not facts.cuda_available:
        # Versions only: there is no GPU to run a kernel on.
        facts.probes = [_run_probe(n, n, None, optional=(n == "xformers")) for n in ("triton", "xformers", "bitsandbytes")]
        return facts
    facts.torch_archs = list(torch.cuda.get_arch_list())
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        facts.gpus.append(GPU(i, props.name, (props.major, props.minor), props.total_memory / 2**30))
    facts.probes = [
        _run_probe("torch", "torch", _torch_kernel),
        _run_probe("triton", "triton", _triton_kernel),
        _run_probe("xformers", "xformers", _xformers_kernel, optional=True),
        _run_probe("bitsandbytes", "bitsandbytes", _bitsandbytes_kernel),
    ]
    return facts
