"""`desktune bench` end to end on the CPU with the tiny shape: each contender a real step in its own process."""

from __future__ import annotations

import csv
import json

import pytest

from desktune.cli.main import main


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--contenders",
            "desktune,transformers,liger,unsloth", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
            "--warmup", "1", "--cache-dir", str(root / "cache"), "--out", str(out), "--context", "--budgets", "8",
            "--ranks", "16"]
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue(), out, root


def test_contenders_ran_in_their_own_processes_on_the_same_model(bench_run):
    code, text, out, root = bench_run
    assert code == 0, text
    report = json.loads((out / "bench.json").read_text())
    rows = {r["contender"]: r for r in report["throughput"]}
    assert rows["desktune"]["status"] == "ok" and rows["transformers"]["status"] == "ok"
    for name in ("desktune", "transformers"):
        r = rows[name]
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["median_step_s"])
        assert len(r["step_s"]) == 3 and r["median_step_s"] == pytest.approx(sorted(r["step_s"][1:])[0] / 2
                                                                             + sorted(r["step_s"][1:])[1] / 2)
        assert (root / "cache" / "tiny-seed3407" / "config.json").is_file()
    # Same folder, same batch: the step-0 losses agree (a check that both built the same model) ...
    assert rows["desktune"]["loss0"] == pytest.approx(rows["transformers"]["loss0"], abs=1e-4)
    assert report["loss_check"]["mismatch"] == []
    # ... and the model learns: three steps on fresh batches do not all give the same loss.
    assert len(set(rows["desktune"]["losses"])) == 3
    ratio = report["ratios"]["tokens_per_s"]["desktune"]["transformers"]
    assert ratio == pytest.approx(rows["desktune"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"])
    # Worker logs are kept, one per process (on the CPU the calibration and the build run in-process).
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["01-throughput-desktune.log", "02-throughput-transformers.log"]


def test_missing_contenders_and_cpu_context_cells_are_listed_as_skipped(bench_run):
    code, text, out, _ = bench_run
    report = json.loads((out / "bench.json").read_text())
    rows = {r["contender"]: r for r in report["throughput"]}
    for name in ("liger", "unsloth"):
        if rows[name]["status"] == "skipped":
            assert rows[name]["reason"].startswith(("not installed", "needs a CUDA GPU"))
    cells = report["context"]["cells"]
    assert len(cells) == 4 and all(c["status"] == "skipped" and "CUDA" in c["reason"] or
                                   c["reason"].startswith("not installed") for c in cells)
    assert "desktune, r=16, 8 GiB: skipped: needs a CUDA GPU" in text


def test_table_and_csv(bench_run):
    _, text, out, _ = bench_run
    report = json.loads((out / "bench.json").read_text())
    tps = {r["contender"]: r["tokens_per_s"] for r in report["throughput"] if r["status"] == "ok"}
    assert "device: CPU" in text and "tokens/s ratio (row / column)" in text
    line = next(l for l in text.splitlines() if l.startswith("transformers+peft+bnb "))
    assert f"{tps['transformers']:,.0f}" in line
    rows = list(csv.DictReader((out / "throughput.csv").open()))
    assert [r["contender"] for r in rows] == ["desktune", "transformers", "liger", "unsloth"]
    assert float(rows[0]["tokens_per_s"]) == pytest.approx(tps["desktune"])
    meta = report["meta"]
    assert meta["versions"]["torch"] and meta["versions"]["transformers"] and meta["versions"]["peft"]
    assert meta["flops_per_token"]["total"] > 0 and meta["ceiling_tokens_per_s"] > 0


def test_unknown_contender_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown contender 'vllm'"):
        main(["bench", "--model", "tiny", "--contenders", "desktune,vllm", "--out", str(tmp_path)])
    assert not (tmp_path / "logs").exists()
