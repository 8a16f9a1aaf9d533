"""ASM GEMMs: the bit-exact shift-add emulation (``lrkern::asm_gemm_emulate``) and the exact fast path
(``lrkern::asm_gemm``) against a plain fp32 torch GEMM of the same shape (``x.float() @ w.float().T`` from the same
integer tensors, conversions included, as a float layer would run it).

Providers: ``emulated``, ``fast`` (both through the registered ops, validation included, on the backend lrkern picks:
C++ on CPU, Triton on CUDA) and ``plain_gemm``; on CUDA also ``plain_gemm_fp16`` (``x.half() @ w.half().T``, the
spec's fp16 reference GEMM). Each time is the median of repeated calls (``bench.common.bench_ms``). Shapes: conv-like
M=256, K=576, N=64 and M=1024, K=1152, N=128, and a Linear-like M=128, K=1024, N=1024; configurations W4A4 and
W8A8 under the alphabet {1,3,5,7}. Rows print as ``device, provider, M, N, K, ms`` (+ configuration, ratios) and are
written to ``bench/results/asm.json`` under the key "speed" (other keys in that file are kept).

    python bench/bench_asm.py [--device cpu|cuda|auto] [--threads N] [--quick] [--no-record]
    python bench/run_all.py --only asm_gemm       (the same, inside the suite: targets and errors with the others)

The emulation is a test oracle (compute bound by design), so it gets fewer repetitions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern  # noqa: F401  (registers the ops)
from bench.common import RESULTS, bench_ms, cache_note, metadata, write_md_section
from lrkern.asm.alphabet import ALPHABETS, representable_magnitudes
from lrkern.ops._dispatch import select_backend

OUT = RESULTS / "asm.json"
MD = RESULTS / "asm.md"
MD_BEGIN, MD_END = "<!-- bench_asm:begin -->", "<!-- bench_asm:end -->"
SHAPES = [(256, 576, 64), (1024, 1152, 128), (128, 1024, 1024)]  # (M, K, N)
CONFIGS = [("1357", 4, 4), ("1357", 8, 8)]  # (alphabet, w_bits, a_bits)


def _operands(alphabet: str, w_bits: int, a_bits: int, m: int, k: int, n: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    r = representable_magnitudes(alphabet, w_bits)
    w = r[torch.randint(0, len(r), (n, k), generator=g)] * (torch.randint(0, 2, (n, k), generator=g) * 2 - 1)
    x = torch.randint(0, 2**a_bits, (m, k), generator=g, dtype=torch.int64)
    return x.to(torch.uint8).to(device), w.to(torch.int16).to(device)


FAST_TARGET = 1.3  # issue 7: the fast path within 1.3x of the plain GEMM of the same shape


def run(device: torch.device, quick: bool, meta: dict | None = None, log=print) -> tuple[list[dict], list[str]]:
    """Times every provider on every shape and configuration; returns (rows, errors). An emulation that differs from
    the fast path is an error (its shape is then not timed)."""
    rows, errors = [], []
    meta = meta or metadata(device)
    backend = select_backend(device)
    for alphabet, w_bits, a_bits in CONFIGS:
        alpha = list(ALPHABETS[alphabet])
        for m, k, n in SHAPES[:1] if quick else SHAPES:
            x, w = _operands(alphabet, w_bits, a_bits, m, k, n, device)
            emu = torch.ops.lrkern.asm_gemm_emulate(x, w, alpha, w_bits, a_bits)
            fast = torch.ops.lrkern.asm_gemm(x, w, w_bits, a_bits)
            exact = torch.equal(emu, fast)
            if not exact:
                errors.append(f"asm_gemm_emulate != asm_gemm at M={m} K={k} N={n} W{w_bits}A{a_bits} "
                              f"{{{','.join(map(str, alpha))}}} ({backend})")
                continue
            providers = {
                "emulated": (lambda: torch.ops.lrkern.asm_gemm_emulate(x, w, alpha, w_bits, a_bits), 3, 0.5),
                "fast": (lambda: torch.ops.lrkern.asm_gemm(x, w, w_bits, a_bits), 10, 0.3),
                "plain_gemm": (lambda: x.float() @ w.float().T, 10, 0.3),
            }
            if device.type == "cuda":
                providers["plain_gemm_fp16"] = (lambda: x.half() @ w.half().T, 10, 0.3)
            times = {}
            for name, (fn, reps, min_s) in providers.items():
                med, p20, p80, nrep = bench_ms(fn, device, min_time_s=min_s, min_reps=reps)
                times[name] = med
                rows.append({"device": meta["device"], "provider": name, "M": m, "N": n, "K": k, "ms": med,
                             "ms_p20": p20, "ms_p80": p80, "reps": nrep, "alphabet": alpha, "w_bits": w_bits,
                             "a_bits": a_bits, "backend": backend if name in ("emulated", "fast") else "torch",
                             "bit_exact": exact if name in ("emulated", "fast") else None})
            for row in rows[-len(providers):]:
                row["vs_plain_gemm"] = row["ms"] / times["plain_gemm"]
                row["vs_fast"] = row["ms"] / times["fast"]
            for row in rows[-len(providers):]:
                log(f"{row['device']}, {row['provider']}, {m}, {n}, {k}, {row['ms']:.4f}    "
                      f"[W{w_bits}A{a_bits} {{{','.join(map(str, alpha))}}}, {row['backend']}; "
                      f"x plain {row['vs_plain_gemm']:.3f}, x fast {row['vs_fast']:.2f}]", flush=True)
    return rows, errors


def table(rows: list[dict]) -> str:
    """One line per (configuration, shape): the times of every provider and the two ratios."""
    out, seen = [], []
    for r in rows:
        key = (r["w_bits"], r["a_bits"], tuple(r["alphabet"]), r["M"], r["N"], r["K"])
        if key not in seen:
            seen.append(key)
    for w_bits, a_bits, alpha, m, n, k in seen:
        group = {r["provider"]: r for r in rows if (r["w_bits"], r["a_bits"], tuple(r["alphabet"]), r["M"], r["N"],
                                                    r["K"]) == (w_bits, a_bits, alpha, m, n, k)}
        times = ", ".join(f"{p} {r['ms']:.3f} ms" for p, r in group.items())
        fast = group.get("fast")
        emu = group.get("emulated")
        ratios = ""
        if fast is not None:
            ratios = f"; fast / plain {fast['vs_plain_gemm']:.2f}"
        if emu is not None:
            ratios += f", emulated / fast {emu['vs_fast']:.1f}"
        out.append(f"  W{w_bits}A{a_bits} {{{','.join(map(str, alpha))}}} M={m} N={n} K={k}: {times}{ratios}")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """The issue's speed target on the device of the rows: the worst fast / plain_gemm ratio."""
    fast = [r for r in rows if r["provider"] == "fast"]
    if not fast:
        return [f"asm_gemm fast path <= {FAST_TARGET}x plain GEMM: not measured (no rows)"]
    worst = max(fast, key=lambda r: r["vs_plain_gemm"])
    ok = worst["vs_plain_gemm"] <= FAST_TARGET
    return [f"{worst['device']} asm_gemm fast path <= {FAST_TARGET}x plain fp32 GEMM: worst "
            f"{worst['vs_plain_gemm']:.2f}x at W{worst['w_bits']}A{worst['a_bits']} M={worst['M']} N={worst['N']} "
            f"K={worst['K']} ({len(fast)} shapes) {'met' if ok else 'NOT MET'}"]


def markdown(speed: dict) -> str:
    """The "speed" entries (per device type) as the speed section of bench/results/asm.md."""
    out = [MD_BEGIN, "## GEMM speed (`bench/bench_asm.py`)", "",
           "Median time of one call: `emulated` = `asm_gemm_emulate` (the shift-add datapath, a bit-exact oracle), "
           "`fast` = `asm_gemm` (the exact integer path), `plain_gemm` = `x.float() @ w.float().T` from the same "
           "integers (conversions included). Target: fast <= 1.3x plain_gemm.", ""]
    for dev, entry in sorted(speed.items()):
        meta = entry.get("meta", {})
        out += [f"### {meta.get('device', dev)} (torch {meta.get('torch', '?')}, commit {meta.get('commit', '?')}, "
                f"{meta.get('date', '')})", "",
                "| config | M | N | K | emulated ms | fast ms | plain_gemm ms | fast / plain | emulated / fast |",
                "|---|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in entry.get("rows", []):
            key = (r["w_bits"], r["a_bits"], tuple(r["alphabet"]), r["M"], r["N"], r["K"])
            groups.setdefault(key, {})[r["provider"]] = r
        for (w_bits, a_bits, alpha, m, n, k), g in groups.items():
            ms = {p: (f"{g[p]['ms']:.3f}" if p in g else "") for p in ("emulated", "fast", "plain_gemm")}
            fp = f"{g['fast']['vs_plain_gemm']:.2f}" if "fast" in g else ""
            ef = f"{g['emulated']['vs_fast']:.1f}" if "emulated" in g else ""
            out.append(f"| W{w_bits}A{a_bits} {{{','.join(map(str, alpha))}}} | {m} | {n} | {k} | {ms['emulated']} | "
                       f"{ms['fast']} | {ms['plain_gemm']} | {fp} | {ef} |")
        out.append("")
    out.append(MD_END)
    return "\n".join(out)


def record(rows: list[dict], device: torch.device) -> Path:
    """Merge into bench/results/asm.json: only the "speed" key (per device type) is replaced; other keys stay. The
    speed section of bench/results/asm.md is re-rendered."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    speed = data.get("speed") if isinstance(data.get("speed"), dict) else {}
    speed[device.type] = {"meta": {**metadata(device), "cache": cache_note(device)}, "rows": rows}
    data["speed"] = speed
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    write_md_section(MD, MD_BEGIN, MD_END, markdown(speed), "# ASM results")
    return OUT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads on CPU (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("device, provider, M, N, K, ms")
    rows, errors = run(device, args.quick)
    for line in targets(rows) + errors:
        print(line)
    if not args.no_record and rows:
        print(f"recorded -> {record(rows, device)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
