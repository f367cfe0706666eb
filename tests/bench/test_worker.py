"""The worker's context mode (run here in-process on the CPU, with no budget), OOM detection, and how the
runner reads a worker that died or was killed mid-probe."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from desktune.bench import search, worker
from desktune.bench.runner import WorkerRun, probes_of


class Sink:
    def __init__(self):
        self.records = []

    def write(self, **record):
        self.records.append(record)


def test_context_worker_trains_each_probe_and_goes_on_after_success(tiny_model_dir):
    settings = search.SearchSettings(budget_bytes=1 << 30, start=64, max_length=128, multiple=16)
    job = {"model_dir": tiny_model_dir("llama"), "rank": 8, "lora_alpha": 8, "dtype": "float32", "device": "cpu",
           "seed": 0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "budget_gib": None, "search": asdict(settings), "probes": [], "deadline": None}
    sink = Sink()
    worker.run_context(job, "transformers", sink)
    events = [(r["event"], r.get("length"), r.get("outcome")) for r in sink.records]
    # One process: loaded for the calibration pair, both lengths train, and 128 is the cap: done.
    assert events == [("load", None, None), ("try", 64, None), ("probe", 64, "ok"), ("try", 128, None),
                      ("probe", 128, "ok")]
    assert sink.records[0]["max_seq_length"] == 128
    state = search.SearchState(settings, [search.Probe.from_dict(r) for r in sink.records if r["event"] == "probe"])
    assert state.converged and state.lo == 128


def test_context_worker_reports_a_load_failure_as_the_probe_outcome(tmp_path):
    settings = search.SearchSettings(budget_bytes=1 << 30, start=64)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights, no tokenizer
    job = {"model_dir": str(tmp_path), "rank": 8, "dtype": "float32", "device": "cpu", "seed": 0,
           "target_modules": ["q_proj"], "budget_gib": None, "search": asdict(settings), "probes": []}
    sink = Sink()
    worker.run_context(job, "transformers", sink)
    assert len(sink.records) == 1
    record = sink.records[0]
    assert record["event"] == "probe" and record["length"] == 64 and record["outcome"] == search.ERROR
    assert record["message"].startswith("loading failed: ")


@pytest.mark.parametrize(
    "exc,expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (ValueError("shapes do not match"), False),
    ],
)
def test_is_oom(exc, expected):
    assert worker.is_oom(exc) is expected


def test_is_oom_follows_the_cause_chain():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("the step failed") from inner
    except RuntimeError as outer:
        assert worker.is_oom(outer)


@pytest.mark.parametrize("timed_out,outcome", [(True, search.TIMEOUT), (False, search.ERROR)])
def test_a_probe_without_a_result_counts_as_timeout_or_crash(timed_out, outcome):
    records = [{"event": "load", "seconds": 3.0}, {"event": "try", "length": 1024},
               {"event": "probe", "length": 1024, "outcome": "ok", "peak_bytes": 10, "seconds": 1.0, "message": ""},
               {"event": "try", "length": 2048}]
    probes = probes_of(WorkerRun(records, -9, timed_out, Path("w.log"), 5.0))
    assert [(p.length, p.outcome) for p in probes] == [(1024, search.OK), (2048, outcome)]
    assert "w.log" in probes[1].message


def test_worker_imports_nothing_that_unsloth_must_precede():
    """Unsloth patches transformers / peft / trl only if it is imported first: the worker module must not."""
    import subprocess
    import sys

    code = ("import sys, desktune.bench.worker, desktune.bench.contenders, desktune.bench.search; "
            "print(sorted(m for m in ('transformers', 'peft', 'trl', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_set_max_seq_length_reaches_every_module_that_keeps_one():
    from torch import nn

    from desktune.bench.contenders import set_max_seq_length

    # Unsloth's layout: the length kept on the wrapper and on inner modules, where it truncates inputs.
    inner = nn.Linear(2, 2)
    inner.max_seq_length = 1024
    outer = nn.Sequential(inner, nn.ReLU())
    outer.max_seq_length = 1024
    set_max_seq_length(outer, 4096)
    assert outer.max_seq_length == 4096 and inner.max_seq_length == 4096
    assert not hasattr(outer[1], "max_seq_length")
