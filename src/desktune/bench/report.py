"""The bench report: ratios and checks computed from the raw results, one printed table, JSON + CSV (+ PNG)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

GIB = 1 << 30
LOSS_TOLERANCE = 1e-2  # step-0 losses further apart than this: the contenders did not build the same model


def add_summary(report: dict) -> dict:
    """Add fraction of ceiling, step-0 loss deltas, the loss check and ratio matrices (in place; returned)."""
    rows = [r for r in report.get("throughput") or [] if r.get("status") == "ok"]
    ceiling = report["meta"].get("ceiling_tokens_per_s")
    for r in rows:
        r["fraction_of_ceiling"] = r["tokens_per_s"] / ceiling if ceiling else None
    if rows:
        ref = rows[0]
        for r in rows:
            r["loss0_delta"] = abs(r["loss0"] - ref["loss0"])
        bad = [r["contender"] for r in rows if r["loss0_delta"] > LOSS_TOLERANCE]
        report["loss_check"] = {"reference": ref["contender"], "tolerance": LOSS_TOLERANCE,
                                "max_abs_delta": max(r["loss0_delta"] for r in rows), "mismatch": bad}
    report["ratios"] = {
        "tokens_per_s": _ratios(rows, "tokens_per_s"),
        "peak_memory": _ratios([r for r in rows if r.get("peak_allocated_bytes")], "peak_allocated_bytes"),
    }
    return report


def _ratios(rows: list[dict], key: str) -> dict:
    return {a["contender"]: {b["contender"]: a[key] / b[key] for b in rows} for a in rows}


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


def cell_text(cell: dict) -> str:
    """A context cell as text: '33,280' (converged), '33,280..33,792', '>= 90,112', '< 64', or 'skipped'."""
    if cell.get("status") == "skipped":
        return "skipped"
    lo, hi = cell.get("longest_ok"), cell.get("shortest_failed")
    if lo is None:
        return f"< {hi:,}" if hi else "failed"
    if hi is None:
        return f">= {lo:,}"
    if cell.get("converged"):
        return f"{lo:,}"
    return f"{lo:,}..{hi:,}"


def format_text(report: dict) -> str:
    meta = report["meta"]
    s = meta["settings"]
    lines = [
        f"desktune bench  {meta['date']}",
        f"model: {meta['shape']} (random weights{'; ' + meta['shape_note'] if meta.get('shape_note') else ''}), "
        f"QLoRA NF4 double-quant, r={s['rank']}, batch {s['batch_size']} x {s['seq_len']}, {s['dtype']}, "
        f"AdamW on LoRA, median of {s['steps']} steps after {s['warmup']} warm-up",
    ]
    flops = meta["flops_per_token"]["total"]
    if meta.get("gpu_name"):
        lines.append(f"GPU: {meta['gpu_name']} ({_gib(meta['gpu_total_bytes'])} GiB), CUDA {meta.get('torch_cuda')}")
    else:
        lines.append("device: CPU (no CUDA GPU: numbers say nothing about GPU speed)")
    rate = meta["matmul_flops"]
    rate_text = f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    lines.append(
        f"ceiling: {rate_text} {meta['matmul_dtype']} matmul (measured) / {flops / 1e9:.3g} GFLOP per token "
        f"= {meta['ceiling_tokens_per_s']:,.0f} tokens/s"
    )
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v))
    rows = report.get("throughput") or []
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        lines.append("")
        body = []
        for r in ok:
            frac = r.get("fraction_of_ceiling")
            body.append([r["label"], f"{r['tokens_per_s']:,.0f}", f"{r['median_step_s']:.3f}",
                         _gib(r.get("peak_allocated_bytes")), f"{r['loss0']:.5f}",
                         f"{r.get('loss0_delta', 0):.1e}", "-" if frac is None else f"{100 * frac:.1f}%"])
        lines += _table(["contender", "tokens/s", "step s", "peak GiB", "step-0 loss", "|d loss|", "of ceiling"],
                        body)
        for key, title in (("tokens_per_s", "tokens/s"), ("peak_memory", "peak memory")):
            matrix = report["ratios"][key]
            if len(matrix) > 1:
                names = list(matrix)
                labels = {r["contender"]: r["label"] for r in ok}
                lines += ["", f"{title} ratio (row / column)"]
                lines += _table([""] + [labels[n] for n in names],
                                [[labels[a]] + [f"{matrix[a][b]:.2f}x" for b in names] for a in names])
        check = report.get("loss_check")
        if check:
            verdict = ("MISMATCH: " + ", ".join(check["mismatch"]) + " built a different model") if check["mismatch"] \
                else "same model"
            lines.append(f"\nstep-0 loss check against {check['reference']}: max |delta| "
                         f"{check['max_abs_delta']:.1e} (tolerance {check['tolerance']:g}): {verdict}")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['status']}: {r['label']}: {r.get('reason')}" + (f" (log {r['log']})" if r.get("log") else ""))
    ctx = report.get("context")
    if ctx:
        lines += ["", _context_title(ctx)]
        cells = ctx["cells"]
        names = list(dict.fromkeys(c["contender"] for c in cells))
        labels = {c["contender"]: c["label"] for c in cells}
        for rank in dict.fromkeys(c["rank"] for c in cells):
            body = []
            for budget in dict.fromkeys(c["budget_gib"] for c in cells):
                row = [f"{budget:g} GiB"]
                for n in names:
                    cell = next(c for c in cells if c["rank"] == rank and c["budget_gib"] == budget and c["contender"] == n)
                    text = cell_text(cell)
                    if cell.get("planner_estimate"):
                        error = cell.get("planner_error")
                        text += f" (planner {cell['planner_estimate']:,}" + (f", {100 * error:+.0f}%)" if error is not None
                                                                             else ")")
                    row.append(text)
                body.append(row)
            lines += ["", f"r={rank}"] + _table(["budget"] + [labels[n] for n in names], body)
            lines += _context_ratios([c for c in cells if c["rank"] == rank], names, labels)
        notes = [c for c in cells if c.get("status") == "skipped" or c.get("stopped") or c.get("failure")]
        for c in notes:
            why = c.get("reason") or c.get("stopped")
            if c.get("failure"):
                why += f": {c['failure']}"
            lines.append(f"  {c['label']}, r={c['rank']}, {c['budget_gib']:g} GiB: {c['status']}: {why}")
        if ctx.get("planner"):
            lines.append(f"  planner: {ctx['planner']}")
    return "\n".join(lines)


def _context_ratios(cells: list[dict], names: list[str], labels: dict) -> list[str]:
    """The first contender's longest context over each other's, per budget (only where both measured one)."""
    lines = []
    first = names[0]
    for other in names[1:]:
        parts = []
        for budget in dict.fromkeys(c["budget_gib"] for c in cells):
            a, b = (next((c.get("longest_ok") for c in cells if c["contender"] == n and c["budget_gib"] == budget), None)
                    for n in (first, other))
            if a and b:
                parts.append(f"{budget:g} GiB {a / b:.2f}x")
        if parts:
            lines.append(f"  {labels[first]} / {labels[other]}: " + ", ".join(parts))
    return lines


def _context_title(ctx: dict) -> str:
    s = ctx["settings"]
    return (f"longest context that trains one full step (tokens), batch 1, QLoRA on all projections, budget set with "
            f"torch.cuda.set_per_process_memory_fraction, searched to {100 * s['tolerance']:g}% "
            f"('a..b': stopped between; '>=': no failure seen)")


THROUGHPUT_COLUMNS = ("contender", "label", "status", "tokens_per_s", "median_step_s", "peak_allocated_bytes",
                      "peak_reserved_bytes", "loss0", "loss0_delta", "fraction_of_ceiling", "reason")
CONTEXT_COLUMNS = ("contender", "label", "rank", "budget_gib", "status", "longest_ok", "shortest_failed", "converged",
                   "probes", "stopped", "failure", "reason", "planner_estimate", "planner_error", "seconds")


def _write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})


def write(report: dict, out_dir: str | Path, plot: bool = False) -> list[Path]:
    """bench.json, throughput.csv and (with a context run) context.csv and context.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "throughput.csv"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    _write_csv(paths[1], THROUGHPUT_COLUMNS, report.get("throughput") or [])
    if report.get("context"):
        paths.append(out / "context.csv")
        _write_csv(paths[-1], CONTEXT_COLUMNS, report["context"]["cells"])
        if plot:
            paths.append(plot_context(report, out / "context.png"))
    return paths


def plot_context(report: dict, path: Path) -> Path:
    """Context against VRAM budget, one line per contender and rank; hollow markers are lower bounds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cells = report["context"]["cells"]
    for key in dict.fromkeys((c["contender"], c["rank"]) for c in cells):
        mine = sorted((c for c in cells if (c["contender"], c["rank"]) == key and c.get("longest_ok")),
                      key=lambda c: c["budget_gib"])
        if not mine:
            continue
        label = f"{mine[0]['label']} r={key[1]}"
        xs, ys = [c["budget_gib"] for c in mine], [c["longest_ok"] for c in mine]
        (line,) = ax.plot(xs, ys, "-", label=label)
        for c in mine:
            exact = c.get("converged") and c.get("shortest_failed")
            ax.plot(c["budget_gib"], c["longest_ok"], "o", color=line.get_color(),
                    markerfacecolor=line.get_color() if exact else "none")
    meta = report["meta"]
    ax.set_xlabel("memory budget (GiB)")
    ax.set_ylabel("longest context that trains (tokens)")
    ax.set_title(f"{meta['shape']}, QLoRA, batch 1 on {meta.get('gpu_name') or 'CPU'}")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.savefig(path)
    return path
