"""quant_pack and dequant: lrkern backends vs the reference and vs a memcpy of the same bytes (input + output)."""
from __future__ import annotations

import torch

import lrkern
from bench.common import Case, lrkern_backends, memcpy_fn

GROUP = 128


def shapes(device: torch.device, quick: bool):
    """(label, x shape, axis): per-token values [T, 128] and [B, T, 1024]; per-channel keys [H, T, 128]."""
    total = 64 * 2**20 if device.type == "cuda" else 4 * 2**20
    yield "per-token", (total // 128, 128), -1
    if not quick:
        yield "per-token", (4, total // 4096, 1024), -1
    yield "per-channel", (total // (1024 * 128), 1024, 128), -2


def run(device: torch.device, quick: bool, meta: dict, log=print) -> list:
    rows = []
    dtypes = [torch.float16] if device.type == "cuda" else [torch.float32, torch.float16]
    bits_list = [2] if quick else [2, 4, 8]
    for label, shape, axis in shapes(device, quick):
        for dtype in dtypes:
            x = torch.randn(shape, device=device).to(dtype)
            for bits in bits_list:
                codes, scale, zero = lrkern.reference.quant_pack(x, bits, GROUP, axis)
                out_bytes = codes.numel() + 2 * scale.numel() * scale.element_size()
                in_bytes = x.numel() * x.element_size()
                params = {"bits": bits, "group": GROUP, "axis": axis}
                q = Case("quant", "quant_pack", shape, dtype, params, in_bytes + out_bytes, device)
                d = Case("quant", "dequant", shape, dtype, params, in_bytes + out_bytes, device)
                for backend in lrkern_backends(device) + ["reference"]:
                    name = "reference" if backend == "reference" else f"lrkern[{backend}]"
                    with lrkern.use_backend(backend):
                        q.measure(name, lambda: lrkern.quant_pack(x, bits, GROUP, axis))
                        d.measure(name, lambda: lrkern.dequant(codes, scale, zero, bits, GROUP, axis))
                for case in (q, d):
                    case.measure("memcpy", memcpy_fn(case.bytes, device))
                    rows += case.finish(meta)
    return rows
