"""desktune.doctor's decisions, on fake facts (no GPU here); the real probes are in the GPU test."""

from __future__ import annotations

import pytest

from desktune import doctor
from desktune.doctor import GPU, Facts, Probe, arch_supported, diagnose, exit_code

RTX5090 = GPU(0, "NVIDIA GeForce RTX 5090", (12, 0), 31.4)
ARCHS_CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def gpu_facts(**kw) -> Facts:
    base = dict(python="3.12.3", torch_version="2.10.0+cu128", torch_cuda="12.8", torch_archs=list(ARCHS_CU128),
                cuda_available=True, driver_version="575.64.03", gpus=[RTX5090],
                probes=[Probe("torch", "2.10.0+cu128", ran=True), Probe("triton", "3.6.0", ran=True),
                        Probe("xformers", "0.0.34", ran=True, optional=True),
                        Probe("bitsandbytes", "0.50.2", ran=True)])
    base.update(kw)
    return Facts(**base)


def levels(findings):
    return [f.level for f in findings]


def text(findings):
    return "\n".join(f.message for f in findings)


def test_healthy_gpu_is_all_ok():
    facts = gpu_facts()
    findings = diagnose(facts)
    assert set(levels(findings)) == {"ok"}
    assert "RTX 5090, compute capability 12.0" in text(findings)
    assert exit_code(facts, findings, require_gpu=True) == 0


@pytest.mark.parametrize(
    "capability, archs, expected",
    [
        ((12, 0), ["sm_90", "sm_120"], True),
        ((8, 9), ["sm_80", "sm_86"], True),  # same major, lower minor cubin runs
        ((8, 6), ["sm_89"], False),  # a higher minor does not
        ((12, 0), ["sm_80", "sm_90"], False),
        ((12, 0), ["sm_80", "compute_90"], True),  # PTX JIT-compiles forward
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a"], False),  # arch-specific code runs only on its own GPU
    ],
)
def test_arch_supported(capability, archs, expected):
    assert arch_supported(capability, archs) is expected


def test_cpu_only_warns_and_exits_zero_unless_gpu_required():
    facts = Facts("3.11.7", "2.13.0+cpu", None, probes=[Probe("triton", "3.6.0")])
    findings = diagnose(facts)
    assert levels(findings) == ["warn", "warn"]
    assert "CPU-only build" in findings[0].message
    assert "No CUDA GPU is visible" in findings[1].message and "--gpus all" in findings[1].message
    assert exit_code(facts, findings, require_gpu=False) == 0
    assert exit_code(facts, findings, require_gpu=True) == 1


def test_old_driver_is_an_error_naming_the_minimum():
    facts = gpu_facts(driver_version="550.120", cuda_available=False,
                      cuda_error="The NVIDIA driver on your system is too old (found version 12040).",
                      gpus=[], probes=[])
    findings = diagnose(facts)
    assert findings[0].level == "error"
    assert "550.120 is too old" in findings[0].message and ">= 570" in findings[0].message
    assert exit_code(facts, findings, require_gpu=False) == 1


def test_driver_too_old_recognised_from_the_error_alone():
    facts = gpu_facts(driver_version=None, cuda_available=False, gpus=[], probes=[],
                      cuda_error="CUDA driver version is insufficient for CUDA runtime version")
    findings = diagnose(facts)
    assert findings[0].level == "error" and "driver >= 570" in findings[0].message


def test_no_kernel_image_gets_rebuild_instructions_for_this_gpu():
    err = "CUDA error: no kernel image is available for execution on the device"
    facts = gpu_facts(probes=[Probe("torch", "2.10.0", ran=True),
                              Probe("xformers", "0.0.34", ran=False, error=err, optional=True),
                              Probe("bitsandbytes", "0.50.2", ran=False, error=err)])
    findings = diagnose(facts)
    bad = [f for f in findings if f.level != "ok"]
    assert levels(bad) == ["warn", "error"]  # xformers is optional, bitsandbytes is not
    for f in bad:
        assert "sm_120" in f.message and 'TORCH_CUDA_ARCH_LIST="12.0"' in f.message
    assert exit_code(facts, findings, require_gpu=False) == 1


def test_torch_without_this_arch_and_blackwell_on_old_cuda():
    facts = gpu_facts(torch_archs=["sm_80", "sm_90"], gpus=[GPU(0, "NVIDIA H100", (10, 0))])
    f = diagnose(facts)
    assert f[1].level == "error" and "no kernels for GPU 0" in f[1].message and "sm_100" in f[1].message
    facts = gpu_facts(torch_version="2.6.0+cu124", torch_cuda="12.4")
    f = diagnose(facts)
    assert f[1].level == "error" and "needs CUDA >= 12.8" in f[1].message


def test_missing_required_library_is_an_error_missing_xformers_a_warning():
    facts = gpu_facts(probes=[Probe("triton", None), Probe("xformers", None, optional=True)])
    bad = [f for f in diagnose(facts) if f.level != "ok"]
    assert [(f.level, f.message.split()[0]) for f in bad] == [("error", "triton"), ("warn", "xformers")]


def test_report_lists_every_library_and_the_gpu():
    facts = gpu_facts()
    report = doctor.format_report(facts, diagnose(facts))
    for word in ("torch", "triton", "xformers", "bitsandbytes", "575.64.03", "compute capability 12.0",
                 "CUDA 12.8"):
        assert word in report


def test_driver_version_read_from_proc(tmp_path, monkeypatch):
    sample = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.07  Release Build  "
              "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 13:12:07 UTC 2025\nGCC version:  gcc version 12.3.0\n")
    fake = tmp_path / "version"
    fake.write_text(sample)
    monkeypatch.setattr(doctor, "Path", lambda p: fake if p == "/proc/driver/nvidia/version" else p)
    assert doctor.read_driver_version() == "570.133.07"


@pytest.mark.gpu
def test_gather_on_a_real_gpu_runs_every_installed_kernel():
    facts = doctor.gather()
    assert facts.cuda_available and facts.gpus, "no CUDA GPU found"
    assert facts.driver_version is not None
    ran = {p.name: p.ran for p in facts.probes if p.version is not None}
    assert ran["torch"] is True and ran["triton"] is True, facts.probes
    findings = diagnose(facts)
    # The GPU machine may lack bitsandbytes / xformers: "not installed" is fine there, a failed kernel is not.
    broken = [f for f in findings if f.level == "error" and "is not installed" not in f.message]
    assert not broken, doctor.format_report(facts, findings)
