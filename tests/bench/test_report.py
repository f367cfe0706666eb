"""Ratios, the step-0 loss check, the printed table, and the JSON / CSV / PNG files, from a made-up report."""

from __future__ import annotations

import csv
import json

import pytest

from desktune.bench import report as report_mod

GIB = 1 << 30


def fake_report(loss_unsloth=11.7712):
    def row(name, label, tps, peak, loss):
        return {"contender": name, "label": label, "status": "ok", "tokens_per_s": tps, "median_step_s": 8192 / tps,
                "peak_allocated_bytes": peak, "peak_reserved_bytes": peak + GIB, "loss0": loss}

    return {
        "meta": {
            "date": "2026-11-29 01:00 UTC", "command": "desktune bench", "shape": "llama-3.1-8b", "shape_note": "",
            "settings": {"rank": 16, "batch_size": 4, "seq_len": 2048, "dtype": "bfloat16", "steps": 5, "warmup": 2},
            "device": "cuda", "gpu_name": "NVIDIA H200", "gpu_total_bytes": 140 * GIB, "torch_cuda": "13.0",
            "matmul_flops": 790e12, "matmul_dtype": "bfloat16", "flops_per_token": {"total": 46.46e9},
            "ceiling_tokens_per_s": 790e12 / 46.46e9, "versions": {"torch": "2.11.0", "unsloth": None},
        },
        "throughput": [
            row("desktune", "desktune", 13000.0, 6 * GIB, 11.7712),
            row("transformers", "transformers+peft+bnb", 6500.0, 21 * GIB, 11.77125),
            row("unsloth", "Unsloth", 10000.0, 8 * GIB, loss_unsloth),
            {"contender": "liger", "label": "Liger-Kernel", "status": "skipped", "reason": "not installed"},
        ],
        "context": {
            "settings": {"tolerance": 0.01},
            "cells": [
                {"contender": "desktune", "label": "desktune", "rank": 16, "budget_gib": 16, "status": "ok",
                 "longest_ok": 52000, "shortest_failed": 52480, "converged": True, "stopped": ""},
                {"contender": "unsloth", "label": "Unsloth", "rank": 16, "budget_gib": 16, "status": "ok",
                 "longest_ok": 33280, "shortest_failed": 33792, "converged": False, "stopped": "time limit reached"},
                {"contender": "desktune", "label": "desktune", "rank": 16, "budget_gib": 32, "status": "ok",
                 "longest_ok": 90112, "shortest_failed": None, "converged": False, "stopped": "probe limit (3)"},
                {"contender": "unsloth", "label": "Unsloth", "rank": 16, "budget_gib": 32, "status": "skipped",
                 "reason": "time limit reached"},
            ],
        },
    }


def test_summary_ratios_ceiling_and_loss_check():
    r = report_mod.add_summary(fake_report())
    tps, mem = r["ratios"]["tokens_per_s"], r["ratios"]["peak_memory"]
    assert tps["desktune"]["transformers"] == pytest.approx(2.0)
    assert tps["desktune"]["unsloth"] == pytest.approx(1.3)
    assert tps["unsloth"]["desktune"] == pytest.approx(1 / 1.3)
    assert mem["desktune"]["unsloth"] == pytest.approx(0.75)
    assert "liger" not in tps
    rows = {row["contender"]: row for row in r["throughput"]}
    assert rows["desktune"]["fraction_of_ceiling"] == pytest.approx(13000 / (790e12 / 46.46e9))
    assert r["loss_check"]["reference"] == "desktune" and r["loss_check"]["mismatch"] == []
    assert rows["transformers"]["loss0_delta"] == pytest.approx(5e-5, abs=1e-9)


def test_loss_mismatch_is_flagged():
    r = report_mod.add_summary(fake_report(loss_unsloth=11.80))
    assert r["loss_check"]["mismatch"] == ["unsloth"]
    assert "MISMATCH: unsloth built a different model" in report_mod.format_text(r)


def test_table_text_has_every_number_and_reason():
    text = report_mod.format_text(report_mod.add_summary(fake_report()))
    assert "NVIDIA H200" in text and "790.0 TFLOP/s" in text and "17,004 tokens/s" in text
    line = next(l for l in text.splitlines() if l.startswith("desktune ") and "bench" not in l)
    assert "13,000" in line and "6.00" in line and "76.5%" in line
    assert "2.00x" in text and "1.30x" in text  # desktune over baseline, over Unsloth
    assert "skipped: Liger-Kernel: not installed" in text
    row16 = next(l for l in text.splitlines() if l.startswith("16 GiB"))
    assert "52,000" in row16 and "33,280..33,792" in row16
    row32 = next(l for l in text.splitlines() if l.startswith("32 GiB"))
    assert ">= 90,112" in row32 and "skipped" in row32
    assert "Unsloth, r=16, 32 GiB: skipped: time limit reached" in text
    assert "desktune / Unsloth: 16 GiB 1.56x" in text  # 52,000 / 33,280


@pytest.mark.parametrize(
    "cell,text",
    [
        ({"longest_ok": 4608, "shortest_failed": 4650, "converged": True}, "4,608"),
        ({"longest_ok": None, "shortest_failed": 64, "converged": True}, "< 64"),
        ({"longest_ok": 1024, "shortest_failed": None, "converged": False}, ">= 1,024"),
        ({"status": "skipped"}, "skipped"),
    ],
)
def test_cell_text(cell, text):
    assert report_mod.cell_text(cell) == text


def test_files_json_csv_png(tmp_path):
    r = report_mod.add_summary(fake_report())
    paths = report_mod.write(r, tmp_path, plot=True)
    assert [p.name for p in paths] == ["bench.json", "throughput.csv", "context.csv", "context.png"]
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]["tokens_per_s"]["desktune"]["transformers"] == 2
    rows = list(csv.DictReader((tmp_path / "throughput.csv").open()))
    assert [row["contender"] for row in rows] == ["desktune", "transformers", "unsloth", "liger"]
    assert float(rows[0]["tokens_per_s"]) == 13000 and rows[3]["reason"] == "not installed"
    cells = list(csv.DictReader((tmp_path / "context.csv").open()))
    assert cells[1]["shortest_failed"] == "33792" and cells[3]["status"] == "skipped"
    assert (tmp_path / "context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planner_estimate_and_error_beside_desktune_cells():
    from desktune.bench.runner import GIB as RUNNER_GIB, _add_planner
    from desktune.bench.shapes import build_config
    from desktune.memory.planner import max_context

    report = fake_report()
    config = build_config("llama-3.1-8b")
    _add_planner(report, config, None)
    cells = report["context"]["cells"]
    expected = max_context(config, 16 * RUNNER_GIB, lora_rank=16)
    assert cells[0]["planner_estimate"] == expected
    assert cells[0]["planner_error"] == pytest.approx(expected / 52000 - 1)
    assert "planner_estimate" not in cells[1]  # Unsloth's cell
    text = report_mod.format_text(report_mod.add_summary(report))
    assert f"52,000 (planner {expected:,}, {100 * (expected / 52000 - 1):+.0f}%)" in text
