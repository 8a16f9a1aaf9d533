"""Hadamard benchmark: every lrkern backend that can run here (the Triton interpreter never) against the reference
backend, an explicit-matrix matmul ``x @ H_n`` in x's dtype, a memcpy of the same bytes (``out.copy_(x)`` into a
preallocated tensor: read x + write out) and, on CUDA when it is installed, ``fast_hadamard_transform``.

    python bench/bench_hadamard.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern
from bench.common import FHT, MATMUL, MEMCPY, REFERENCE, Case, bench_backends, max_rel_err

BENCH = "hadamard"
MATMUL_MAX_N = 1024  # the explicit matrix is n x n: beyond this the "baseline" is a strawman and a memory hog
# CPU fp16/bf16 matmul is not BLAS-backed in PyTorch (x86 without AVX512-FP16/AMX): ~0.4 s a call at n=128 over 4M
# elements, ~10 s at n=1024, which would take a third of the CPU suite's budget for one uninformative number.
CPU_HALF_MATMUL_MAX_N = 128


def cases(device: torch.device, quick: bool):
    """(n, dtype, total elements); x is [total // n, n]."""
    if device.type == "cuda":
        total = 64 * 2**20
        if quick:
            yield 128, torch.float16, total
            return
        yield from ((n, torch.float16, total) for n in (64, 128, 256, 1024, 8192, 32768))
        yield from ((128, dt, total) for dt in (torch.float32, torch.bfloat16))
        return
    total = 4 * 2**20
    if quick:
        yield from ((128, dt, total) for dt in (torch.float32, torch.float16))
        return
    yield from ((n, dt, total) for n in (64, 128, 1024) for dt in (torch.float32, torch.float16))
    yield 32768, torch.float32, total


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def _fht():
    try:
        from fast_hadamard_transform import hadamard_transform
    except Exception:  # noqa: BLE001 -- ImportError, or an extension built against another torch
        return None
    return hadamard_transform


def run(device: torch.device, quick: bool, meta: dict, log=print) -> tuple[list, list[str]]:
    """Returns (rows, errors)."""
    rows, errors = [], []
    backends, _ = bench_backends(device)
    hadamard_transform = _fht() if device.type == "cuda" else None
    if device.type == "cuda" and hadamard_transform is None:
        log("skipped: fast-hadamard-transform not installed")
    for n, dtype, total in cases(device, quick):
        case = _case(device, backends, hadamard_transform, n, dtype, total, log)
        rows += case.finish(meta)
        errors += case.errors
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, errors


def _case(device, backends, hadamard_transform, n: int, dtype: torch.dtype, total: int, log) -> Case:
    x = torch.randn(total // n, n, device=device).to(dtype)
    case = Case(BENCH, "hadamard", x.shape, dtype, {"n": n}, 2 * x.numel() * x.element_size(), device, log)
    with lrkern.use_backend(REFERENCE):
        ref = lrkern.hadamard(x)
    tol = _tolerance(dtype)

    def check(out):
        err = max_rel_err(out, ref)
        return None if err <= tol else f"max rel err {err:.2e} > {tol:.0e}"

    for backend in backends:
        def call(backend=backend):
            with lrkern.use_backend(backend):
                return lrkern.hadamard(x)

        case.measure(REFERENCE if backend == REFERENCE else f"lrkern[{backend}]", call, backend=backend,
                     check=None if backend == REFERENCE else check)
    if n > MATMUL_MAX_N:
        case.skip(MATMUL, f"only up to n={MATMUL_MAX_N}")
    elif device.type == "cpu" and dtype != torch.float32 and n > CPU_HALF_MATMUL_MAX_N:
        case.skip(MATMUL, f"CPU {case.dtype} matmul is not BLAS-backed (seconds per call); measured up to "
                          f"n={CPU_HALF_MATMUL_MAX_N}")
    else:
        h = lrkern.reference.hadamard_matrix(n, dtype, device)
        case.measure(MATMUL, lambda: x @ h, check=check)
    if hadamard_transform is not None:
        case.measure(FHT, lambda: hadamard_transform(x, scale=n**-0.5), check=check)
    out = torch.empty_like(x)
    case.measure(MEMCPY, lambda: out.copy_(x))
    return case


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(sys.argv[1:], only=(BENCH,)))
