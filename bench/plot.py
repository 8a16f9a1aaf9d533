"""Plots recorded benchmark runs: achieved bandwidth as % of a memcpy of the same bytes, per op, shape and backend.

    python bench/plot.py [FILE.jsonl ...] [--commit SHA]

For each results file (default: bench/results/*.jsonl) the latest recorded run (or the latest run of --commit) is
drawn to bench/results/<file>.png, one panel per op. PNGs are git-ignored. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Drawn as dashed lines on GPU plots: the project's bandwidth targets (fraction of memcpy).
GPU_TARGETS = {"hadamard": 0.80, "quant_pack": 0.70}


def load(path: Path) -> list[dict]:
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                print(f"{path}:{k}: skipped a malformed line ({exc})")
    return rows


def select_run(rows: list[dict], commit: str | None) -> list[dict]:
    """Rows of one run (a run's rows share meta.date): the latest, or the latest of ``commit``."""
    if commit:
        rows = [r for r in rows if r["meta"]["commit"].removesuffix("-dirty").startswith(commit)]
    if not rows:
        return []
    latest = max(r["meta"]["date"] for r in rows)
    return [r for r in rows if r["meta"]["date"] == latest]


def case_label(r: dict) -> str:
    params = {k: v for k, v in r["params"].items() if k not in ("n", "group", "layout")}
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{r['shape']}\n{r['dtype']}" + (f"\n{extra}" if extra else "")


def plot_run(plt, rows: list[dict], out: Path) -> None:
    rows = [r for r in rows if r.get("impl") != "memcpy" and r.get("pct_memcpy")]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    meta = rows[0]["meta"]
    gpu = meta.get("device_type") == "cuda" or out.name.startswith("gpu-")
    ncases = max(len({case_label(r) for r in rows if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 1.1 * ncases + 2), 3.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        labels = list(dict.fromkeys(case_label(r) for r in op_rows))
        impls = list(dict.fromkeys(r.get("impl") for r in op_rows))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, label in enumerate(labels):
                match = [r for r in op_rows if r.get("impl") == impl and case_label(r) == label]
                if match:
                    xs.append(i + (k - (len(impls) - 1) / 2) * width)
                    ys.append(100 * match[0]["pct_memcpy"])
            bars = ax.bar(xs, ys, width, label=impl)
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        ax.axhline(100, color="black", linewidth=0.8)
        if gpu and op in GPU_TARGETS:
            ax.axhline(100 * GPU_TARGETS[op], color="red", linestyle="--", linewidth=0.8,
                       label=f"target {100 * GPU_TARGETS[op]:.0f}%")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("% of memcpy bandwidth")
        ax.set_ylim(0, max(110.0, *(100 * r["pct_memcpy"] * 1.1 for r in op_rows)))
        ax.set_title(op, fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{meta['device']} | torch {meta.get('torch')} | triton {meta.get('triton')} | "
                 f"commit {meta['commit']} | {meta['date']} | cache {meta.get('cache', 'warm (not recorded)')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/*.jsonl)")
    ap.add_argument("--commit", help="plot the latest run recorded at this commit (prefix) instead of the latest")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    files = args.files or sorted(RESULTS.glob("*.jsonl"))
    if not files:
        print(f"no results in {RESULTS}: run `python bench/run_all.py` (or `make bench`) first", file=sys.stderr)
        return 1
    wrote = 0
    for path in files:
        rows = select_run(load(path), args.commit)
        if not any(r.get("impl") != "memcpy" and r.get("pct_memcpy") for r in rows):
            print(f"{path}: no run to plot" + (f" at commit {args.commit}" if args.commit else ""))
            continue
        out = path.with_suffix(".png")
        plot_run(plt, rows, out)
        print(f"wrote {out} ({len(rows)} rows, commit {rows[0]['meta']['commit']}, {rows[0]['meta']['date']})")
        wrote += 1
    return 0 if wrote else 1


if __name__ == "__main__":
    sys.exit(main())
