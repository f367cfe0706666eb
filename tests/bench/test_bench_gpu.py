"""GPU checks of the bench (the H200 machine): the memory budget really limits a process, and the whole bench
(throughput + context search) runs on a tiny model with every installed contender."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from desktune.cli.main import main

pytestmark = pytest.mark.gpu

BUDGET_PROBE = textwrap.dedent(
    """
    import json, torch
    from desktune.bench.worker import Memory
    GIB = 1 << 30
    memory = Memory("cuda", 2.0)
    free, _ = torch.cuda.mem_get_info()
    small = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    try:
        torch.empty(int(1.5 * GIB), dtype=torch.uint8, device="cuda")
        over = False
    except torch.OutOfMemoryError:
        over = True
    allocated, reserved = memory.peaks()
    print(json.dumps({"free": free, "over_budget_refused": over, "peak_allocated": allocated}))
    """
)


def test_budget_shows_as_free_memory_and_caps_the_allocator():
    # A subprocess: the ballast and the memory fraction must not stay in this test process.
    out = subprocess.run([sys.executable, "-c", BUDGET_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    assert 1.9 * gib <= result["free"] <= 2.0 * gib  # what Unsloth sizes itself from
    assert result["over_budget_refused"]  # 1 GiB + 1.5 GiB > 2 GiB
    assert result["peak_allocated"] == gib  # the ballast is not counted


def test_tiny_bench_with_context_search_on_the_gpu(tmp_path, capsys):
    main(["bench", "--model", "tiny", "--contenders", "desktune,transformers,liger,unsloth", "--steps", "3",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--context",
                 "--budgets", "2", "--ranks", "8", "--max-length", "8192", "--cell-time", "240",
                 "--context-contenders", "desktune,transformers"])
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["contender"]: r for r in report["throughput"]}
    assert rows["desktune"]["status"] == "ok" and rows["transformers"]["status"] == "ok", text
    assert report["loss_check"]["mismatch"] == [], text
    assert rows["desktune"]["peak_allocated_bytes"] > 0 and report["meta"]["gpu_name"]
    assert report["meta"]["matmul_flops"] > 100e12  # a bf16 tensor-core rate, not a CPU one
    for cell in report["context"]["cells"]:
        # The tiny model trains 8192 tokens in 2 GiB easily: the search must reach its cap with no failure.
        assert cell["status"] == "ok" and cell["longest_ok"] == 8192 and cell["converged"], text
    for name in ("liger", "unsloth"):  # reported either way, with the reason when not run
        assert rows[name]["status"] == "ok" or rows[name].get("reason"), text
