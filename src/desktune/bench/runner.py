"""Drive `desktune bench`: build the model once, then each contender in its own process.

The parent never touches CUDA itself (a context here would take memory from the
workers); the GPU is read and its matmul rate measured by a worker too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from desktune.bench import contenders as contenders_mod
from desktune.bench import search, shapes
from desktune.bench.flops import step_flops_per_token
from desktune.log import logger

GIB = 1 << 30
VERSIONED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "desktune", "liger_kernel",
             "unsloth", "unsloth_zoo")


@dataclass(frozen=True)
class BenchSettings:
    shape: str = "llama-3.1-8b"
    contenders: tuple[str, ...] = ("desktune", "transformers", "liger", "unsloth")
    batch_size: int = 4
    seq_len: int = 2048
    rank: int = 16
    lora_alpha: int | None = None  # None: equal to the rank
    steps: int = 5
    warmup: int = 2
    dtype: str = "bfloat16"
    seed: int = 3407
    cache_dir: str = "~/.cache/desktune/bench"
    out_dir: str = "bench-results"
    device: str = "auto"
    throughput: bool = True
    throughput_budget_gib: float | None = None
    worker_timeout_s: float = 1800
    time_limit_s: float | None = None
    command: str = ""


@dataclass(frozen=True)
class ContextSettings:
    budgets_gib: tuple[float, ...] = (8, 12, 16, 24, 32, 48, 80)
    ranks: tuple[int, ...] = (32, 16)
    tolerance: float = 0.01
    multiple: int = 64
    start: int = 1024
    max_length: int = 1 << 20
    max_probes: int = 14
    cell_time_s: float = 900
    plot: bool = False
    contenders: tuple[str, ...] | None = None  # None: the throughput run's contenders


@dataclass
class WorkerRun:
    records: list[dict]
    returncode: int | None
    timed_out: bool
    log: Path
    seconds: float

    def first(self, event: str) -> dict | None:
        return next((r for r in self.records if r.get("event") == event), None)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Runner:
    settings: BenchSettings
    out_dir: Path = field(init=False)
    deadline: float | None = field(init=False)
    _count: int = 0

    def __post_init__(self):
        self.out_dir = Path(self.settings.out_dir).expanduser()
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "jobs").mkdir(parents=True, exist_ok=True)
        limit = self.settings.time_limit_s
        self.deadline = time.time() + limit if limit else None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def worker(self, tag: str, job: dict, contender: str | None = None, timeout: float | None = None) -> WorkerRun:
        """Run one worker process; its output goes to logs/<n>-<tag>.log."""
        self._count += 1
        name = f"{self._count:02d}-{tag}"
        job_path, result_path = self.out_dir / "jobs" / f"{name}.json", self.out_dir / "jobs" / f"{name}.jsonl"
        log_path = self.out_dir / "logs" / f"{name}.log"
        job_path.write_text(json.dumps(job, indent=1))
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "desktune.bench.worker", "--job", str(job_path), "--result", str(result_path)]
        if contender:
            cmd += ["--contender", contender]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        src = str(Path(__file__).resolve().parents[2])  # so the worker imports this same desktune
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        limits = [t for t in (timeout, self.settings.worker_timeout_s, self.remaining()) if t is not None]
        limit = max(1.0, min(limits)) if limits else None
        start = time.time()
        timed_out = False
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its compile workers
                proc.wait()
        records = []
        if result_path.exists():
            records = [json.loads(line) for line in result_path.read_text().splitlines() if line.strip()]
        return WorkerRun(records, proc.returncode, timed_out, log_path, time.time() - start)

    # -- setup --
    def in_process(self, job: dict) -> WorkerRun | None:
        """On the CPU there is no CUDA context to keep out of this process: save a process start."""
        if self.device != "cpu":
            return None
        from desktune.bench import worker

        sink = _Collect()
        {"calibrate": worker.run_calibrate, "build": worker.run_build}[job["mode"]](job, sink)
        return WorkerRun(sink.records, 0, False, Path(os.devnull), 0.0)

    def calibrate(self) -> dict:
        job = {"mode": "calibrate", "device": self.device}
        run = self.in_process(job) or self.worker("calibrate", job, timeout=300)
        record = run.first("calibrate")
        if record is None:
            raise RuntimeError(f"reading the GPU failed; log {run.log}:\n{run.log_tail()}")
        return record

    @property
    def device(self) -> str:
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def model_dir(self) -> Path:
        s = self.settings
        folder = shapes.model_folder(s.cache_dir, s.shape, s.seed)
        if shapes.is_complete(folder):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        logger.info("writing the random-weight %s model to %s (once)", s.shape, folder)
        job = {"mode": "build", "shape": s.shape, "model_dir": str(folder), "seed": s.seed, "device": self.device}
        run = self.in_process(job) or self.worker("build", job)
        if run.first("build") is None:
            raise RuntimeError(f"building the {s.shape} model failed; log {run.log}:\n{run.log_tail()}")
        return folder

    def base_job(self, model_dir: Path, rank: int) -> dict:
        s = self.settings
        return {
            "model_dir": str(model_dir),
            "rank": rank,
            "lora_alpha": s.lora_alpha or rank,
            "target_modules": list(shapes.get_shape(s.shape).target_modules),
            "dtype": s.dtype,
            "device": self.device,
            "seed": s.seed,
        }

    # -- throughput --
    def throughput(self, model_dir: Path) -> list[dict]:
        s = self.settings
        rows = []
        for name in s.contenders:
            label = contenders_mod.get_contender(name).label
            reason = contenders_mod.unavailable_reason(name, self.device == "cuda")
            if reason is None and self.remaining() is not None and self.remaining() <= 0:
                reason = "time limit reached"
            if reason:
                rows.append({"contender": name, "label": label, "status": "skipped", "reason": reason})
                continue
            logger.info("throughput: %s", label)
            job = dict(self.base_job(model_dir, s.rank), mode="throughput", batch_size=s.batch_size,
                       seq_len=s.seq_len, steps=s.steps, warmup=s.warmup, budget_gib=s.throughput_budget_gib)
            run = self.worker(f"throughput-{name}", job, contender=name)
            record = run.first("throughput")
            if record is not None:
                rows.append(dict(record, label=label, status="ok", log=str(run.log)))
                continue
            skipped = run.first("skipped")
            if skipped:
                rows.append({"contender": name, "label": label, "status": "skipped", "reason": skipped["reason"]})
                continue
            error = run.first("error")
            why = "timed out" if run.timed_out else (error or {}).get("message") or f"exit code {run.returncode}"
            rows.append({"contender": name, "label": label, "status": "failed", "reason": why, "log": str(run.log)})
            logger.warning("%s failed: %s (log %s)\n%s", label, why, run.log, run.log_tail())
        return rows

    # -- context --
    def context(self, model_dir: Path, ctx: ContextSettings, gpu_total: int | None) -> list[dict]:
        cells = []
        for rank in ctx.ranks:
            for budget in ctx.budgets_gib:
                for name in ctx.contenders or self.settings.contenders:
                    cells.append(self.context_cell(model_dir, ctx, rank, budget, name, gpu_total))
        return cells

    def context_cell(self, model_dir, ctx: ContextSettings, rank: int, budget: float, name: str, gpu_total):
        cell = {"contender": name, "label": contenders_mod.get_contender(name).label, "rank": rank,
                "budget_gib": budget}
        reason = contenders_mod.unavailable_reason(name, self.device == "cuda")
        if reason is None and self.device != "cuda":
            reason = "needs a CUDA GPU (the budget is a CUDA allocator limit)"
        if reason is None and gpu_total is not None and budget * GIB > gpu_total:
            reason = f"budget is more than this GPU's {gpu_total / GIB:.0f} GiB"
        if reason is None and self.remaining() is not None and self.remaining() < 30:
            reason = "time limit reached"
        if reason:
            return dict(cell, status="skipped", reason=reason)
        logger.info("context: %s, r=%d, %g GiB", cell["label"], rank, budget)
        settings = search.SearchSettings(budget_bytes=int(budget * GIB), start=ctx.start, max_length=ctx.max_length,
                                         tolerance=ctx.tolerance, multiple=ctx.multiple, max_probes=ctx.max_probes)
        cell_deadline = time.time() + ctx.cell_time_s
        if self.deadline is not None:
            cell_deadline = min(cell_deadline, self.deadline)
        skipped: list[str] = []
        tag = f"context-{name}-r{rank}-{budget:g}g"

        def run_process(state: search.SearchState) -> list[search.Probe]:
            job = dict(self.base_job(model_dir, rank), mode="context", budget_gib=budget, deadline=cell_deadline,
                       search=asdict(settings), probes=[asdict(p) for p in state.probes])
            run = self.worker(tag, job, contender=name, timeout=max(1.0, cell_deadline - time.time()))
            if run.first("skipped"):
                skipped.append(run.first("skipped")["reason"])
                return []
            probes = probes_of(run)
            if not probes:
                error = (run.first("error") or {}).get("message")
                why = "time limit reached while loading" if run.timed_out else error or f"exit code {run.returncode}"
                state.stopped = f"the worker ran no probe: {why} (log {run.log})"
            return probes

        start = time.time()
        state = search.run_search(settings, run_process, deadline=cell_deadline)
        if skipped:
            return dict(cell, status="skipped", reason=skipped[0])
        result = state.result()
        cell.update(result, status="ok" if result["longest_ok"] or result["converged"] else "failed",
                    seconds=time.time() - start)
        return cell


class _Collect:
    def __init__(self):
        self.records: list[dict] = []

    def write(self, **record) -> None:
        self.records.append(record)


def probes_of(run: WorkerRun) -> list[search.Probe]:
    """The probes a context worker finished, plus the one it was inside when it died or was killed."""
    done = [search.Probe.from_dict(r) for r in run.records if r.get("event") == "probe"]
    finished = {p.length for p in done}
    for r in run.records:
        if r.get("event") == "try" and r["length"] not in finished:
            outcome = search.TIMEOUT if run.timed_out else search.ERROR
            why = "killed at the time limit" if run.timed_out else f"the process died (exit code {run.returncode})"
            done.append(search.Probe(r["length"], outcome, message=f"{why}; see {run.log}"))
    return done


def versions() -> dict[str, str | None]:
    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = None
    if found.get("desktune") is None:
        from desktune import __version__

        found["desktune"] = __version__
    return found


def run(settings: BenchSettings, ctx: ContextSettings | None = None) -> dict:
    """Everything `desktune bench` does; returns the report (also written as JSON/CSV by report.write)."""
    runner = Runner(settings)
    shape = shapes.get_shape(settings.shape)
    config = shapes.build_config(settings.shape)
    calibration = runner.calibrate()
    flops = step_flops_per_token(config, settings.seq_len, settings.rank, shape.target_modules)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": settings.command,
        "shape": settings.shape,
        "shape_note": shape.note,
        "settings": asdict(settings),
        "device": calibration["device"],
        "gpu_name": calibration.get("gpu_name"),
        "gpu_total_bytes": calibration.get("total_bytes"),
        "torch_cuda": calibration.get("torch_cuda"),
        "matmul_flops": calibration["matmul_flops"],
        "matmul_dtype": calibration["matmul_dtype"],
        "flops_per_token": flops.as_dict(),
        "ceiling_tokens_per_s": calibration["matmul_flops"] / flops.total,
        "versions": versions(),
    }
    model_dir = runner.model_dir()
    meta["model_dir"] = str(model_dir)
    report = {"meta": meta, "throughput": [], "context": None}
    if settings.throughput:
        report["throughput"] = runner.throughput(model_dir)
    if ctx is not None:
        cells = runner.context(model_dir, ctx, calibration.get("total_bytes"))
        report["context"] = {"settings": asdict(ctx), "cells": cells}
        _add_planner(report, config, ctx)
    return report


def _add_planner(report: dict, config, ctx: ContextSettings) -> None:
    """The memory planner's prediction beside each desktune cell, when this build has a planner."""
    import importlib.util

    if importlib.util.find_spec("desktune.memory.planner") is None:
        report["context"]["planner"] = "desktune.memory.planner is not in this build"
        return
    from desktune.memory import planner

    estimate = getattr(planner, "max_context", None)
    if estimate is None:
        report["context"]["planner"] = "desktune.memory.planner has no max_context(config, budget_bytes, lora_rank)"
        return
    report["context"]["planner"] = "desktune.memory.planner.max_context"
    for cell in report["context"]["cells"]:
        if cell["contender"] == "desktune" and cell.get("status") == "ok":
            cell["planner_estimate"] = int(estimate(config, int(cell["budget_gib"] * GIB), lora_rank=cell["rank"]))
            if cell.get("longest_ok"):
                cell["planner_error"] = cell["planner_estimate"] / cell["longest_ok"] - 1
