"""Output allocation for every backend.

Outputs are allocated with ``torch.empty``. With ``LRKERN_POISON_EMPTY=1`` (set by the test suite) they are filled
with NaN (floats) or 0xA5 (integers) first, so a kernel that leaves part of its output unwritten fails the tests
instead of passing on whatever the allocator happened to return.
"""
from __future__ import annotations

import os

import torch

_POISON_INT = 0xA5


def poisoning() -> bool:
    return os.environ.get("LRKERN_POISON_EMPTY", "0") == "1"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else _POISON_INT)
    return out
