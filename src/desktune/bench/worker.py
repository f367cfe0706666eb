"""One benchmark process: `python -m desktune.bench.worker --job JOB.json --result OUT.jsonl [--contender NAME]`.

Modes (the job's "mode"): "build" writes the random-weight model folder; "calibrate"
reads the GPU and measures its bf16 matmul rate; "throughput" times training steps of
one contender; "context" runs memory-budget probes of one contender (search.py).
Results are appended to OUT.jsonl one JSON object per line and flushed at once, so a
process that dies or is killed still leaves what it measured.

The memory budget is applied before anything is loaded: a ballast tensor takes the
GPU memory above the budget, so `torch.cuda.mem_get_info()` (which Unsloth sizes its
buffers from) reports the budget as free, and `set_per_process_memory_fraction`
caps the caching allocator at ballast + budget. Reported peaks exclude the ballast.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

GIB = 1 << 30


class Results:
    def __init__(self, path: str):
        self.path = Path(path)

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def is_oom(exc: BaseException) -> bool:
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or type(exc).__name__ == "GPUOutOfMemoryError":
            return True
        if "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Memory:
    """GPU memory accounting relative to the ballast (zeros on the CPU)."""

    def __init__(self, device: str, budget_gib: float | None):
        import torch

        self.cuda = device == "cuda"
        self.ballast = None
        self.base_allocated = self.base_reserved = 0
        if not self.cuda:
            return
        torch.cuda.init()
        if budget_gib:
            budget = int(budget_gib * GIB)
            free, total = torch.cuda.mem_get_info()
            if budget > free:
                raise BudgetTooLarge(f"budget {budget_gib} GiB is more than the {free / GIB:.1f} GiB free on this GPU")
            if free - budget > 0:
                self.ballast = torch.empty(free - budget, dtype=torch.uint8, device="cuda")
            self.base_allocated = torch.cuda.memory_allocated()
            self.base_reserved = torch.cuda.memory_reserved()
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self.base_reserved + budget) / total))
        torch.cuda.reset_peak_memory_stats()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        import torch

        return (torch.cuda.max_memory_allocated() - self.base_allocated,
                torch.cuda.max_memory_reserved() - self.base_reserved)


class BudgetTooLarge(RuntimeError):
    pass


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def make_batch(vocab: int, batch: int, length: int, seed: int, device: str):
    """Random token ids from a CPU generator: the same numbers for every contender and every GPU."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return ids.to(device)


def train_step(model, optimizer, input_ids, dtype, device: str) -> float:
    """Forward, backward and optimizer step; the loss before the update."""
    import contextlib

    import torch

    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach().float().item())


def _optimizer(model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the loaded model has no trainable parameters (no LoRA adapters?)")
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


def _load(job: dict, contender_name: str, max_seq_length: int):
    import torch

    from desktune.bench.contenders import LoadSpec, get_contender

    spec = LoadSpec(
        model_dir=job["model_dir"],
        max_seq_length=max_seq_length,
        rank=job["rank"],
        lora_alpha=job.get("lora_alpha") or job["rank"],
        target_modules=tuple(job["target_modules"]),
        dtype=getattr(torch, job["dtype"]),
        device=job["device"],
        seed=job["seed"],
    )
    model = get_contender(contender_name).load(spec)
    model.train()
    return model, spec


def run_throughput(job: dict, contender: str, out: Results) -> None:
    import torch

    device, dtype = job["device"], getattr(torch, job["dtype"])
    memory = Memory(device, job.get("budget_gib"))
    start = time.perf_counter()
    model, _ = _load(job, contender, job["seq_len"])
    sync(device)
    load_s = time.perf_counter() - start
    optimizer = _optimizer(model)
    vocab = model.config.vocab_size
    times, losses = [], []
    for step in range(job["warmup"] + job["steps"]):
        batch = make_batch(vocab, job["batch_size"], job["seq_len"], job["seed"] + step, device)
        sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, optimizer, batch, dtype, device))
        sync(device)
        times.append(time.perf_counter() - t0)
    measured = times[job["warmup"]:]
    median = statistics.median(measured)
    peak_allocated, peak_reserved = memory.peaks()
    out.write(
        event="throughput",
        contender=contender,
        tokens_per_s=job["batch_size"] * job["seq_len"] / median,
        median_step_s=median,
        step_s=times,
        warmup=job["warmup"],
        losses=losses,
        loss0=losses[0],
        peak_allocated_bytes=peak_allocated,
        peak_reserved_bytes=peak_reserved,
        load_s=load_s,
    )


def run_context(job: dict, contender: str, out: Results) -> None:
    import torch

    from desktune.bench.contenders import set_max_seq_length
    from desktune.bench.search import OK, OOM, ERROR, Probe, SearchSettings, SearchState, probe_batch

    device, dtype = job["device"], getattr(torch, job["dtype"])
    settings = SearchSettings(**job["search"])
    state = SearchState(settings, [Probe.from_dict(p) for p in job["probes"]])
    first = state.propose()
    if first is None:
        return
    # Calibration (first process, no probe yet) covers start and 2*start: load for the longer one.
    load_length = 2 * first if not state.probes else first
    memory = Memory(device, job["budget_gib"])
    start = time.perf_counter()
    try:
        model, _ = _load(job, contender, load_length)
    except Exception as exc:  # noqa: BLE001 - reported as this probe's outcome
        out.write(event="probe", length=first, outcome=OOM if is_oom(exc) else ERROR, seconds=None,
                  peak_bytes=None, message="loading failed: " + _short(exc))
        return
    out.write(event="load", seconds=time.perf_counter() - start, max_seq_length=load_length)
    vocab = model.config.vocab_size

    def probe(length: int) -> Probe:
        out.write(event="try", length=length)
        set_max_seq_length(model, length)
        batch = make_batch(vocab, 1, length, job["seed"], device)
        optimizer = _optimizer(model)  # fresh: its state is allocated inside the step, as in a new process
        memory.reset_peak()
        t0 = time.perf_counter()
        try:
            train_step(model, optimizer, batch, dtype, device)
            sync(device)
            result = Probe(length, OK, memory.peaks()[1], time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - any failure is a measured outcome
            result = Probe(length, OOM if is_oom(exc) else ERROR, None, time.perf_counter() - t0, _short(exc))
        del optimizer, batch
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return result

    for result in probe_batch(state, probe, load_length, job.get("deadline")):
        out.write(event="probe", **result.__dict__)


def run_calibrate(job: dict, out: Results) -> None:
    import torch

    if job["device"] != "cuda":
        n, dtype, reps = 512, torch.float32, 3
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        rate = 2 * n**3 * reps / (time.perf_counter() - t0)
        out.write(event="calibrate", device="cpu", gpu_name=None, total_bytes=None, matmul_flops=rate,
                  matmul_dtype="float32", torch_cuda=None)
        return
    n, reps = 8192, 10
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (begin.elapsed_time(end) / 1000)
    props = torch.cuda.get_device_properties(0)
    out.write(event="calibrate", device="cuda", gpu_name=props.name, total_bytes=props.total_memory,
              matmul_flops=rate, matmul_dtype="bfloat16", torch_cuda=torch.version.cuda,
              capability=list(torch.cuda.get_device_capability()))


def run_build(job: dict, out: Results) -> None:
    from desktune.bench.shapes import write_model_folder

    start = time.perf_counter()
    folder = write_model_folder(job["shape"], Path(job["model_dir"]), job["seed"], job["device"])
    out.write(event="build", model_dir=str(folder), seconds=time.perf_counter() - start)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m desktune.bench.worker")
    parser.add_argument("--job", required=True, help="JSON file describing what to run")
    parser.add_argument("--result", required=True, help="JSON-lines file the results are appended to")
    parser.add_argument("--contender", help="contender name (throughput and context modes)")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    out = Results(args.result)
    try:
        if args.contender == "unsloth":
            import unsloth  # noqa: F401 - must come before transformers / peft so its patches apply
        mode = job["mode"]
        if mode == "build":
            run_build(job, out)
        elif mode == "calibrate":
            run_calibrate(job, out)
        elif mode == "throughput":
            run_throughput(job, args.contender, out)
        elif mode == "context":
            run_context(job, args.contender, out)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except BudgetTooLarge as exc:
        out.write(event="skipped", reason=str(exc))
        return 0
    except Exception as exc:  # noqa: BLE001 - the parent reads the reason from the result file
        traceback.print_exc()
        out.write(event="error", message=_short(exc), oom=is_oom(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
