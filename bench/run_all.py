"""Runs the op benchmarks, prints their tables and the speed targets, and records the rows to bench/results/.

    python bench/run_all.py [--device cpu|cuda|auto] [--quick] [--no-record]
                            [--only hadamard|quant|lance|decode|asm_quant|asm_gemm]

Exit status 1 when an lrkern kernel (or the reference) failed or disagreed with the reference, or a decode baseline
disagreed with it; missed speed targets are reported, not failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import bench_asm, bench_asm_quant, bench_decode, bench_hadamard, bench_lance_ops, bench_quant
from bench.common import (
    CPU_CACHE_MODES,
    bench_backends,
    cache_note,
    env_flag_warnings,
    metadata,
    print_table,
    record,
    set_cpu_cache,
)

# decode and asm_gemm keep their own rows, table, targets and results file (OWN_RESULTS; decode_attention.jsonl and
# asm.json): their rows are (model, B, T, provider) and (device, provider, M, N, K) measurements with ratios against
# a baseline, not the op rows of common.Row.
BENCHES = {"hadamard": ("hadamard", bench_hadamard), "quant": ("quant_pack / dequant", bench_quant),
           "lance": ("lance_project / mode_gram_accumulate / LANCE layer steps", bench_lance_ops),
           "decode": ("decode attention", bench_decode),
           "asm_quant": ("asm_project / asm_fake_quant (alphabet-set projection)", bench_asm_quant),
           "asm_gemm": ("asm_gemm / asm_gemm_emulate vs a plain GEMM", bench_asm)}
OWN_RESULTS = (bench_decode, bench_asm)


@dataclass
class Target:
    """A speed target of the project: ``metric`` of the first row ``match`` accepts, against ``threshold``."""
    name: str
    device: str  # "cuda" or "cpu": where it can be measured
    match: Callable
    metric: str  # "pct_memcpy" (fraction of memcpy bandwidth) or "vs_reference" (speed-up over the reference)
    threshold: float
    strict: bool = False  # value > threshold (faster than) rather than >=

    def evaluate(self, rows, device: torch.device, backends_note: dict[str, str]) -> str:
        if device.type != self.device:
            return f"{self.name}: not measured on this device ({device.type})"
        row = next((r for r in rows if self.match(r)), None)
        value = getattr(row, self.metric) if row is not None else None
        if value is None:
            backend = "triton" if self.device == "cuda" else "cpp"
            why = backends_note.get(backend)
            reason = f"{backend} backend unavailable: {why}" if why else "no such row in this run"
            return f"{self.name}: not measured ({reason})"
        if self.metric == "pct_memcpy":
            shown, limit = f"{100 * value:.1f}% of memcpy", f">= {100 * self.threshold:.0f}%"
        else:
            shown, limit = f"{value:.2f}x the reference", f"> {self.threshold:.2f}x" if self.strict else \
                f">= {self.threshold:.2f}x"
        ok = value > self.threshold if self.strict else value >= self.threshold
        return f"{self.name}: {shown} (target {limit}) {'met' if ok else 'NOT MET'} [{row.ms:.3f} ms]"


def _row(op: str, impl: str, dtype: str, ndim: int | None = None, **params):
    def match(r) -> bool:
        return (r.op == op and r.impl == impl and r.dtype == dtype
                and (ndim is None or r.shape.count("x") + 1 == ndim)
                and all(r.params.get(k) == v for k, v in params.items()))
    return match


TARGETS = [
    Target("GPU hadamard n=128 64M fp16, triton", "cuda", _row("hadamard", "lrkern[triton]", "float16", n=128),
           "pct_memcpy", 0.80),
    Target("GPU quant_pack 2-bit [T,128] axis=-1 64M fp16, triton", "cuda",
           _row("quant_pack", "lrkern[triton]", "float16", 2, bits=2, axis=-1), "pct_memcpy", 0.70),
    Target("GPU quant_pack 2-bit [B,T,1024] axis=-1 64M fp16, triton", "cuda",
           _row("quant_pack", "lrkern[triton]", "float16", 3, bits=2, axis=-1), "pct_memcpy", 0.70),
    Target("GPU quant_pack 2-bit [H,T,128] axis=-2 64M fp16, triton", "cuda",
           _row("quant_pack", "lrkern[triton]", "float16", bits=2, axis=-2), "pct_memcpy", 0.70),
]
for _dt, _short in (("float32", "fp32"), ("float16", "fp16")):
    TARGETS += [
        Target(f"CPU hadamard n=128 4M {_short}, cpp vs reference", "cpu",
               _row("hadamard", "lrkern[cpp]", _dt, n=128), "vs_reference", 1.0, strict=True),
        Target(f"CPU quant_pack 2-bit [T,128] axis=-1 4M {_short}, cpp vs reference", "cpu",
               _row("quant_pack", "lrkern[cpp]", _dt, 2, bits=2, axis=-1), "vs_reference", 1.0, strict=True),
        Target(f"CPU quant_pack 2-bit [H,T,128] axis=-2 4M {_short}, cpp vs reference", "cpu",
               _row("quant_pack", "lrkern[cpp]", _dt, bits=2, axis=-2), "vs_reference", 1.0, strict=True),
    ]


def targets(rows, device: torch.device, backends_note: dict[str, str]) -> list[str]:
    return [t.evaluate(rows, device, backends_note) for t in TARGETS] + bench_lance_ops.targets(rows, device,
                                                                                                  backends_note)


def main(argv=None, only=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and bit widths (a fast look)")
    ap.add_argument("--no-record", action="store_true", help="print only; append nothing to bench/results/")
    ap.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only this benchmark (repeatable)")
    ap.add_argument("--cpu-cache", choices=CPU_CACHE_MODES, default="cold",
                    help="CPU only: evict the last-level cache before each timed call (cold, the default, like "
                         "do_bench on the GPU) or leave the operands cached (warm)")
    args = ap.parse_args(argv)
    set_cpu_cache(args.cpu_cache)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    selected = args.only or list(only or BENCHES)

    meta = metadata(device)
    backends, skipped = bench_backends(device)
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"{meta['date']}\ncache: {cache_note(device)}")
    print(f"backends timed: {', '.join(backends)}"
          + "".join(f"\n  not timed: {b}: {why}" for b, why in skipped.items()))
    for note in env_flag_warnings():
        print(f"note: {note}")

    rows, errors, own = [], [], {}
    start = time.perf_counter()
    for key in selected:
        title, module = BENCHES[key]
        print(f"\n-- {title}", flush=True)
        t0 = time.perf_counter()
        part, errs = module.run(device, args.quick, meta)
        heading = f"{title} ({time.perf_counter() - t0:.0f} s)"
        if module in OWN_RESULTS:
            own[module] = part
            print(f"\n== {heading}\n{module.table(part)}", flush=True)
        else:
            print_table(part, heading)
            rows += part
        errors += errs

    print("\n== targets")
    lines = targets(rows, device, skipped)
    for module in OWN_RESULTS:
        title = next(t for t, m in BENCHES.values() if m is module)
        lines += module.targets(own[module]) if module in own else [f"{title}: not measured (not selected by --only)"]
    for line in lines:
        print(f"  {line}")
    if errors:
        print(f"\n== {len(errors)} error(s)")
        for e in errors:
            print(f"  {e}")
    n_own = {m: _own_rows(m, part) for m, part in own.items()}
    if args.no_record:
        print(f"\nnot recorded (--no-record); {len(rows) + sum(n_own.values())} rows in "
              f"{time.perf_counter() - start:.0f} s")
        return 1 if errors else 0
    if rows:
        _recorded(len(rows), record(rows, device))
    for module, part in own.items():
        if n_own[module]:
            path = bench_decode.record(part) if module is bench_decode else module.record(part, device)
            _recorded(n_own[module], path)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 1 if errors else 0


def _own_rows(module, part) -> int:
    return len(part.rows) if module is bench_decode else len(part)


def _recorded(n: int, path: Path) -> None:
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    print(f"\nrecorded {n} rows to {shown}")


if __name__ == "__main__":
    sys.exit(main())
