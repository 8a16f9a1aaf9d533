"""Hadamard: lrkern backends vs the reference, an explicit-matrix matmul in the same dtype, a memcpy of the same
bytes and (GPU, when installed) fast-hadamard-transform."""
from __future__ import annotations

import torch

import lrkern
from bench.common import Case, lrkern_backends, memcpy_fn


def cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        total = 64 * 2**20
        yield from ((n, torch.float16, total) for n in (64, 128, 256, 1024, 8192, 32768))
        yield from ((128, dt, total) for dt in (torch.float32, torch.bfloat16))
    elif quick:
        yield from ((128, dt, 4 * 2**20) for dt in (torch.float32, torch.float16))
    else:
        total = 4 * 2**20
        yield from ((n, dt, total) for n in (64, 128, 1024) for dt in (torch.float32, torch.float16))
        yield 32768, torch.float32, total


def run(device: torch.device, quick: bool, meta: dict, log=print) -> list:
    rows = []
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        hadamard_transform = None
        if device.type == "cuda":
            log("skipped: fast-hadamard-transform not installed")
    for n, dtype, total in cases(device, quick):
        x = torch.randn(total // n, n, device=device).to(dtype)
        case = Case("hadamard", "hadamard", x.shape, dtype, {"n": n}, 2 * x.numel() * x.element_size(), device)
        for backend in lrkern_backends(device):
            with lrkern.use_backend(backend):
                case.measure(f"lrkern[{backend}]", lambda: lrkern.hadamard(x))
        with lrkern.use_backend("reference"):
            case.measure("reference", lambda: lrkern.hadamard(x))
        # CPU fp16 matmul is not BLAS-backed (10 s per call at n=1024): a baseline nobody would use past n=128.
        if n <= (128 if device.type == "cpu" and dtype == torch.float16 else 1024):
            h = lrkern.reference.hadamard_matrix(n, dtype, device)
            case.measure("explicit matmul", lambda: x @ h)
        if hadamard_transform is not None and device.type == "cuda":
            case.measure("fast-hadamard-transform", lambda: hadamard_transform(x, scale=n**-0.5))
        case.measure("memcpy", memcpy_fn(case.bytes, device))
        rows += case.finish(meta)
    return rows
