"""quant_pack / dequant benchmark: every lrkern backend that can run here (the Triton interpreter never) against the
reference backend and a memcpy of the same bytes (input + output: x, and the codes with scale and zero).

Layouts, groups of 128 at bits 2, 4 and 8:
  per-token   x [T, 128],        axis=-1 (one group per token: KV-cache values)
  per-token   x [B, T, 1024],    axis=-1 (8 groups per row)
  per-channel x [H, T, 128],     axis=-2 (groups of 128 tokens per channel: KV-cache keys)

    python bench/bench_quant.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern
from bench.common import MEMCPY, REFERENCE, Case, bench_backends, memcpy_fn

BENCH = "quant"
GROUP = 128
BATCH, HEADS = 4, 32


def layouts(device: torch.device, quick: bool):
    """(layout name, x shape, axis) over ~4M elements on CPU and 64M on CUDA."""
    total = 64 * 2**20 if device.type == "cuda" else 4 * 2**20
    yield "per-token", (total // 128, 128), -1
    if not quick:
        yield "per-token", (BATCH, total // (BATCH * 1024), 1024), -1
    yield "per-channel", (HEADS, total // (HEADS * 128), 128), -2


def dtypes(device: torch.device):
    return [torch.float16] if device.type == "cuda" else [torch.float32, torch.float16]


def _same(got, want) -> str | None:
    for name, a, b in zip(("codes", "scale", "zero"), got, want):
        if a.shape != b.shape or not torch.equal(a, b):
            return f"{name} differ"
    return None


def _close(got: torch.Tensor, want: torch.Tensor) -> str | None:
    # code * scale + zero in fp32, rounded once: every backend should agree to the last bit, allow one ulp.
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if torch.allclose(got.float(), want.float(), rtol=1e-3 if got.dtype != torch.float32 else 1e-6, atol=0):
        return None
    return f"max abs diff {(got.float() - want.float()).abs().max().item():.3e}"


def run(device: torch.device, quick: bool, meta: dict, log=print) -> tuple[list, list[str]]:
    """Returns (rows, errors)."""
    rows, errors = [], []
    backends, _ = bench_backends(device)
    for layout, shape, axis in layouts(device, quick):
        for dtype in dtypes(device):
            x = torch.randn(shape, device=device).to(dtype)
            for bits in [2] if quick else [2, 4, 8]:
                for case in _cases(device, backends, x, layout, bits, axis, log):
                    rows += case.finish(meta)
                    errors += case.errors
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, errors


def _cases(device, backends, x: torch.Tensor, layout: str, bits: int, axis: int, log) -> tuple[Case, Case]:
    """The quant_pack and the dequant case of one layout, dtype and bit width."""
    with lrkern.use_backend(REFERENCE):
        packed = lrkern.quant_pack(x, bits, GROUP, axis)
        x_hat = lrkern.dequant(*packed, bits, GROUP, axis)
    codes, scale, zero = packed
    in_bytes = x.numel() * x.element_size()
    out_bytes = codes.numel() + scale.numel() * scale.element_size() + zero.numel() * zero.element_size()
    params = {"bits": bits, "group": GROUP, "axis": axis, "layout": layout}
    q = Case(BENCH, "quant_pack", x.shape, x.dtype, params, in_bytes + out_bytes, device, log)
    d = Case(BENCH, "dequant", x.shape, x.dtype, params, in_bytes + out_bytes, device, log)
    for backend in backends:
        name = REFERENCE if backend == REFERENCE else f"lrkern[{backend}]"

        def qp(backend=backend):
            with lrkern.use_backend(backend):
                return lrkern.quant_pack(x, bits, GROUP, axis)

        def dq(backend=backend):
            with lrkern.use_backend(backend):
                return lrkern.dequant(codes, scale, zero, bits, GROUP, axis)

        is_ref = backend == REFERENCE
        q.measure(name, qp, backend=backend, check=None if is_ref else lambda o: _same(o, packed))
        d.measure(name, dq, backend=backend, check=None if is_ref else lambda o: _close(o, x_hat))
    for case in (q, d):
        case.measure(MEMCPY, memcpy_fn(case.bytes, device))
    return q, d


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(sys.argv[1:], only=(BENCH,)))
