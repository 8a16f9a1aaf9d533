"""Triton fast Walsh-Hadamard transform (orthonormal, Sylvester order) along the last dim."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne

from lrkern._alloc import empty

# Largest transform one program holds in registers. Longer ones use two passes (see ``hadamard``).
MAX_FUSED_N = 8192
# Elements per program: enough bytes in flight per SM to saturate HBM without spilling registers.
# TODO(gpu): autotune BLOCK_P / num_warps per n on H100; these are first guesses, not measured.
_TILE = 8192


@triton.jit
def _fwht_kernel(
    x_ptr,  # x: [R, L, S] contiguous, transformed along L; P = R * S independent vectors
    y_ptr,  # y: like x
    P,
    S,
    scale,
    L: tl.constexpr,
    LOG_L: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """y[r, :, c] = scale * H_L @ x[r, :, c], with H_L = S^log2(L) where S(v) = [v0+v1, v2+v3, .., v0-v1, v2-v3, ..]."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    i = tl.arange(0, L)
    # S == 1 (a contiguous row per vector) is specialised by Triton, so the division below costs nothing there.
    r = p // S
    c = p - r * S
    offs = (r * L * S + c)[:, None] + (i * S)[None, :]
    mask = (p < P)[:, None]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Constant-geometry (Pease) form: every stage is the same reshape, so one unrolled body serves all log2(L) stages
    # and no stage needs a data-dependent stride.
    for _ in tl.static_range(LOG_L):
        a, b = tl.split(tl.reshape(v, (BLOCK_P, L // 2, 2)))
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_P, L))
    tl.store(y_ptr + offs, cast_rne(v * scale, y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, y: torch.Tensor, vectors: int, length: int, stride: int, scale: float) -> None:
    block_p = max(1, _TILE // length)
    num_warps = 4 if length * block_p <= 2048 else 8
    grid = (triton.cdiv(vectors, block_p),)
    _fwht_kernel[grid](x, y, vectors, stride, scale, L=length, LOG_L=int(math.log2(length)), BLOCK_P=block_p,
                       num_warps=num_warps)


def hadamard(x: torch.Tensor, max_fused_n: int = MAX_FUSED_N) -> torch.Tensor:
    """y = x @ H_n along the last dim (orthonormal, fp32 math), x contiguous [..., n], n a power of two.

    n <= max_fused_n: one pass, each program transforms whole rows in registers. Larger n: H_n = (H_a kron I_b)
    (I_a kron H_b) with b = max_fused_n, so pass 1 transforms contiguous length-b chunks into an fp32 scratch buffer
    and pass 2 transforms the length-a columns of stride b, scales and writes x's dtype.
    """
    n = x.shape[-1]
    rows = x.numel() // n
    y = empty(x.shape, x.dtype, x.device)
    if n <= max_fused_n:
        _launch(x, y, rows, n, 1, 1.0 / math.sqrt(n))
        return y
    b = max_fused_n
    a = n // b
    if a > max_fused_n:
        raise ValueError(f"n={n} needs more than two passes at max_fused_n={max_fused_n}")
    scratch = empty(x.shape, torch.float32, x.device)
    _launch(x, scratch, rows * a, b, 1, 1.0)
    _launch(scratch, y, rows * b, a, b, 1.0 / math.sqrt(n))
    return y
