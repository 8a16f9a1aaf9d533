"""Triton fast Walsh-Hadamard transform (orthonormal, Sylvester order) along the last dim."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32

from lrkern._alloc import empty

# Longest transform one program holds in registers; longer ones take two passes (see ``hadamard``).
MAX_FUSED_N = 8192
# fp32 elements per program (BLOCK_P * L): 32 per thread at 8 warps, enough bytes in flight per SM to approach HBM
# bandwidth for short rows (n = 128 fp16 is a pure streaming copy plus in-register butterflies) without spilling.
# TODO(gpu): autotune _TILE (4K..16K) and num_warps (4/8/16) per (n, dtype) on H100; these are first guesses, and
# the constant-geometry stages' layout conversions (shared memory or shuffles) are what to watch in the profile.
_TILE = 8192


@triton.jit
def _fwht_tile(v, BLOCK_P: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr):
    """H_L (unnormalised) along dim 1 of an fp32 [BLOCK_P, L] tile: H_L = P^log2(L), P(v) = [v0+v1, .., v0-v1, ..]."""
    # Constant-geometry (Pease) form: every stage is the same pairing of neighbours followed by the same perfect
    # shuffle, so one unrolled body serves all log2(L) stages and no stage needs a data-dependent stride. It consumes
    # index bits from the lowest up, the order of the reference's stride-1, 2, 4, .. butterflies, so fp32 results match.
    for _ in tl.static_range(LOG_L):
        a, b = tl.split(tl.reshape(v, (BLOCK_P, L // 2, 2)))
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_P, L))
    return v


@triton.jit
def _fwht_kernel(
    x_ptr,  # x: [R, L, S] contiguous, fp32/fp16/bf16; transformed along L
    y_ptr,  # y: [R, L, S]; may alias x (each program reads its whole tile before writing it)
    R,  # vectors when S == 1 (rows of length L), else the outer extent
    scale,  # fp32 factor applied after the butterflies
    L: tl.constexpr,
    LOG_L: tl.constexpr,
    S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """y[r, :, c] = scale * H_L @ x[r, :, c] (H_L unnormalised Sylvester Hadamard), fp32 math, stored in y's dtype."""
    i = tl.arange(0, L)
    if S == 1:
        # grid (cdiv(R, BLOCK_P),): BLOCK_P whole contiguous rows per program.
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs = p[:, None] * L + i[None, :]
        mask = (p < R)[:, None]
        v = _fwht_tile(to_f32(tl.load(x_ptr + offs, mask=mask, other=0.0)), BLOCK_P, L, LOG_L)
        tl.store(y_ptr + offs, cast_rne(v * scale, y_ptr.dtype.element_ty), mask=mask)
    else:
        # grid (R, S // BLOCK_P): one r and BLOCK_P consecutive c per program, so every access is contiguous along c
        # (coalesced) and, as BLOCK_P divides S (both powers of two), needs no mask.
        c = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs = tl.program_id(0).to(tl.int64) * (L * S) + c[:, None] + (i * S)[None, :]
        v = _fwht_tile(to_f32(tl.load(x_ptr + offs)), BLOCK_P, L, LOG_L)
        tl.store(y_ptr + offs, cast_rne(v * scale, y_ptr.dtype.element_ty))


def _launch(x: torch.Tensor, y: torch.Tensor, outer: int, length: int, stride: int, scale: float) -> None:
    """y = scale * H_length along the middle dim of x viewed as [outer, length, stride]."""
    if stride == 1:
        # Cap the tile at the row count so small inputs do not compute (and, interpreted, simulate) padding rows.
        block_p = max(1, min(_TILE // length, triton.next_power_of_2(outer)))
        grid = (triton.cdiv(outer, block_p), 1)
    else:
        block_p = max(1, min(_TILE // length, stride))
        grid = (outer, stride // block_p)
    num_warps = max(1, min(8, block_p * length // 1024))
    _fwht_kernel[grid](x, y, outer, scale, L=length, LOG_L=length.bit_length() - 1, S=stride, BLOCK_P=block_p,
                       num_warps=num_warps)


def hadamard(x: torch.Tensor, max_fused_n: int = MAX_FUSED_N) -> torch.Tensor:
    """y = x @ H_n along the last dim (orthonormal, fp32 math), x contiguous [..., n], n a power of two.

    n <= max_fused_n: one pass, each program transforms whole rows in registers. Larger n: H_n = (H_a kron I_b)
    (I_a kron H_b) with b = max_fused_n, so pass 1 transforms contiguous length-b chunks into an fp32 scratch buffer
    and pass 2 transforms the length-a columns of stride b, scales and writes x's dtype. ``max_fused_n`` (a power of
    two) is a parameter so tests can force the two-pass path at small n.
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
    # Pass 2 runs in place on the scratch when the output itself is fp32, so no extra buffer is needed there.
    scratch = y if y.dtype == torch.float32 else empty(x.shape, torch.float32, x.device)
    _launch(x, scratch, rows * a, b, 1, 1.0)
    _launch(scratch, y, rows, a, b, 1.0 / math.sqrt(n))
    return y
