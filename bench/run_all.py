"""Runs every op benchmark, prints the tables and the targets of the foundation issue, records to bench/results/.

    python bench/run_all.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import bench_hadamard, bench_quant  # noqa: E402
from bench.common import metadata, print_table, record  # noqa: E402


def _find(rows, **want):
    for r in rows:
        if all((r.params.get(k) if k in ("n", "bits", "axis") else getattr(r, k)) == v for k, v in want.items()):
            return r
    return None


def targets(rows, device: torch.device) -> list[str]:
    """The issue's speed targets: measured value, threshold, met or not (or not measured on this device)."""
    out = []
    if device.type == "cuda":
        r = _find(rows, op="hadamard", impl="lrkern[triton]", dtype="float16", n=128)
        out.append(_line("GPU hadamard n=128 64M fp16, % of memcpy", r and r.pct_memcpy, 0.80, pct=True))
        for axis in (-1, -2):
            r = _find(rows, op="quant_pack", impl="lrkern[triton]", dtype="float16", bits=2, axis=axis)
            out.append(_line(f"GPU quant_pack 2-bit axis={axis} 64M fp16, % of memcpy", r and r.pct_memcpy, 0.70,
                             pct=True))
    else:
        for dtype in ("float32", "float16"):
            r = _find(rows, op="hadamard", impl="lrkern[cpp]", dtype=dtype, n=128)
            out.append(_line(f"CPU C++ hadamard n=128 4M {dtype}, speed-up vs reference", r and r.vs_reference, 1.0))
            for axis in (-1, -2):
                r = _find(rows, op="quant_pack", impl="lrkern[cpp]", dtype=dtype, bits=2, axis=axis)
                out.append(_line(f"CPU C++ quant_pack 2-bit axis={axis} 4M {dtype}, speed-up vs reference",
                                 r and r.vs_reference, 1.0))
    return out


def _line(name: str, value, threshold: float, pct: bool = False) -> str:
    if value is None:
        return f"{name}: not measured"
    fmt = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}x")
    verdict = "met" if value >= threshold else "NOT met"
    return f"{name}: {fmt(value)} (target >= {fmt(threshold)}) {verdict}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (the demo)")
    ap.add_argument("--no-record", action="store_true", help="print only; write nothing to bench/results/")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    meta = metadata(device)
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    rows = []
    for name, module in (("hadamard", bench_hadamard), ("quant_pack / dequant", bench_quant)):
        part = module.run(device, args.quick, meta)
        print_table(part, name)
        rows += part
    print("\ntargets")
    for line in targets(rows, device):
        print(f"  {line}")
    if not args.no_record:
        print(f"\nrecorded {len(rows)} rows to {record(rows, device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
