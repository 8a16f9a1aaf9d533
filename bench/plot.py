"""Plots bench/results/*.jsonl: achieved bandwidth as % of a memcpy of the same bytes, one PNG per results file.

    python bench/plot.py        # writes bench/results/<file>.png (git-ignored)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib: pip install matplotlib")
        return 1
    files = sorted(RESULTS.glob("*.jsonl"))
    if not files:
        print(f"no results in {RESULTS}; run `make bench` first")
        return 1
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        latest = max(r["meta"]["date"] for r in rows)
        rows = [r for r in rows if r["meta"]["date"] == latest and r["impl"] != "memcpy" and r["pct_memcpy"]]
        labels = sorted({(r["op"], r["shape"], r["dtype"], json.dumps(r["params"], sort_keys=True)) for r in rows})
        impls = sorted({r["impl"] for r in rows})
        fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(labels) * len(impls)), 5))
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            values = []
            for op, shape, dtype, params in labels:
                match = [r for r in rows if (r["op"], r["shape"], r["dtype"], json.dumps(r["params"], sort_keys=True))
                         == (op, shape, dtype, params) and r["impl"] == impl]
                values.append(100 * match[0]["pct_memcpy"] if match else 0.0)
            ax.bar([i + k * width for i in range(len(labels))], values, width, label=impl)
        names = [f"{op}\n{shape} {dtype}\n{','.join(f'{k}={v}' for k, v in json.loads(p).items())}"
                 for op, shape, dtype, p in labels]
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(labels))], names, fontsize=6)
        ax.set_ylabel("% of memcpy bandwidth (same bytes)")
        meta = rows[0]["meta"] if rows else None
        ax.set_title(f"{meta['device']} | commit {meta['commit']} | {latest}" if meta else path.stem)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out = path.with_suffix(".png")
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
