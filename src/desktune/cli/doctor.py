"""`desktune doctor`: the GPU pre-flight (driver, CUDA, compute capability, kernels).

Exit code 0 when nothing is broken. A machine with no GPU only gets a warning (CPU-only use
stays possible, e.g. for tests) unless --require-gpu is given.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="check the GPU, driver and kernels before training",
                              description=__doc__.splitlines()[0])
    p.add_argument("--require-gpu", action="store_true", help="fail (exit 1) when no CUDA GPU is usable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from desktune import doctor

    facts = doctor.gather()
    findings = doctor.diagnose(facts)
    print(doctor.format_report(facts, findings), flush=True)
    code = doctor.exit_code(facts, findings, args.require_gpu)
    if code and args.require_gpu and not facts.cuda_available:
        print("ERROR   --require-gpu: no usable CUDA GPU (see above)", flush=True)
    return code
