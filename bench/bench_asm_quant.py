"""asm_project / asm_fake_quant (forward and backward) benchmark: every lrkern backend that can run here (the Triton
interpreter never) against the reference backend and a memcpy of the same bytes (spec asm.md 4 item 1: elementwise
and memory bound, target about memcpy speed).

Bytes counted: project reads w and writes int16 w_int; fake_quant reads w and writes w_hat; the backward reads grad and
w and writes grad_w (the [C] scales and partial sums are negligible). Layouts, alphabets {1,3} and the full odd set at
w_bits 4 and {1,3,5,7} at w_bits 8:
  linear   w [O, K],              axis=0  (P == 1: one contiguous run per channel)
  conv     w [O, C, 3, 3],        axis=0
  lastdim  w [K, O],              axis=-1 (inner == 1: channels along the fast dimension)

    python bench/bench_asm_quant.py [--device cpu|cuda|auto] [--quick]      (prints the rows, records nothing)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern
from lrkern.asm.alphabet import r_max
from bench.common import MEMCPY, REFERENCE, Case, bench_backends, memcpy_fn

BENCH = "asm_quant"
OPS = torch.ops.lrkern


def layouts(device: torch.device, quick: bool):
    """(layout name, w shape, axis): ~4M weights on CPU (1M with quick), 64M on CUDA."""
    total = 64 * 2**20 if device.type == "cuda" else (2**20 if quick else 4 * 2**20)
    yield "linear", (total // 1024, 1024), 0
    if not quick:
        yield "conv", (total // (128 * 9), 128, 3, 3), 0
    yield "lastdim", (total // 256, 256), -1


def configs(quick: bool):
    """(alphabet, w_bits)."""
    return [([1, 3], 4), ([1, 3, 5, 7], 8)] if quick else [([1, 3], 4), (list(range(1, 16, 2)), 4),
                                                            ([1, 3, 5, 7], 8)]


def dtypes(device: torch.device, quick: bool):
    if device.type == "cuda":
        return [torch.float16, torch.float32]
    return [torch.float32] if quick else [torch.float32, torch.bfloat16]


def _same(got, want) -> str | None:
    return None if torch.equal(got, want) else "differs from the reference"


def _bwd_check(got, want) -> str | None:
    if not torch.equal(got[0], want[0]):
        return "grad_w differs"
    if not torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-6 * want[1].abs().max().item()):
        return "grad_scale differs"
    return None


def run(device: torch.device, quick: bool, meta: dict, log=print) -> tuple[list, list[str]]:
    """Returns (rows, errors)."""
    rows, errors = [], []
    backends, _ = bench_backends(device)
    for layout, shape, axis in layouts(device, quick):
        for dtype in dtypes(device, quick):
            w = (torch.randn(shape, device=device) * 0.05).to(dtype)
            c = shape[axis]
            dims = [d for d in range(len(shape)) if d != axis % len(shape)]
            for alphabet, w_bits in configs(quick):
                scale = (w.float().abs().amax(dim=dims) / r_max(alphabet, w_bits)).clamp_min(1e-8).contiguous()
                assert scale.numel() == c
                for case in _cases(device, backends, w, scale, axis, alphabet, w_bits, layout, log):
                    rows += case.finish(meta)
                    errors += case.errors
            del w
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, errors


def _cases(device, backends, w, scale, axis, alphabet, w_bits, layout, log):
    n, esz = w.numel(), w.element_size()
    params = {"alphabet": "".join(map(str, alphabet)) if len(alphabet) < 8 else "odd", "w_bits": w_bits,
              "axis": axis, "layout": layout}
    g = torch.randn_like(w)
    with lrkern.use_backend(REFERENCE):
        ref_int = OPS.asm_project(w, scale, axis, alphabet, w_bits)
        ref_hat = OPS.asm_fake_quant(w, scale, axis, alphabet, w_bits)
        ref_bwd = OPS.asm_fake_quant_backward(g, w, scale, axis, alphabet, w_bits)
    p = Case(BENCH, "asm_project", w.shape, w.dtype, params, n * (esz + 2), device, log)
    f = Case(BENCH, "asm_fake_quant", w.shape, w.dtype, params, n * 2 * esz, device, log)
    b = Case(BENCH, "asm_fake_quant_backward", w.shape, w.dtype, params, n * 3 * esz, device, log)
    for backend in backends:
        name = REFERENCE if backend == REFERENCE else f"lrkern[{backend}]"
        is_ref = backend == REFERENCE

        def proj(backend=backend):
            with lrkern.use_backend(backend):
                return OPS.asm_project(w, scale, axis, alphabet, w_bits)

        def fq(backend=backend):
            with lrkern.use_backend(backend):
                return OPS.asm_fake_quant(w, scale, axis, alphabet, w_bits)

        def bwd(backend=backend):
            with lrkern.use_backend(backend):
                return OPS.asm_fake_quant_backward(g, w, scale, axis, alphabet, w_bits)

        p.measure(name, proj, backend=backend, check=None if is_ref else lambda o: _same(o, ref_int))
        f.measure(name, fq, backend=backend, check=None if is_ref else lambda o: _same(o, ref_hat))
        b.measure(name, bwd, backend=backend, check=None if is_ref else lambda o: _bwd_check(o, ref_bwd))
    for case in (p, f, b):
        case.measure(MEMCPY, memcpy_fn(case.bytes, device))
    return p, f, b


def main(argv=None) -> int:
    import argparse

    from bench.common import metadata, print_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    rows, errors = run(device, args.quick, metadata(device))
    print_table(rows, "asm_project / asm_fake_quant")
    for e in errors:
        print("error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
