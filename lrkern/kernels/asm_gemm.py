"""Triton ASM GEMMs (spec asm.md 3.1, 3.4, section 4 items 3-4; references in ``lrkern/reference/asm_gemm.py``).

``asm_gemm`` (the fast path): int8 x int8 -> int32 ``tl.dot`` over [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles.
- Activations: a_bits = 4 (0..15) go in as int8 directly; a_bits = 8 (0..255) as x' = x - 128 (int8), and the
  epilogue adds 128 * sum_k w[n, k] (summed in the same K loop), since x . w = x' . w + 128 sum_k w.
- Weights: w_bits = 4 (|w| <= 15) go in directly; w_bits = 8 are split into quartet planes w = 16 * w_hi + w_lo
  (w_hi = sign * (|w| >> 4), w_lo = sign * (|w| & 15), each in [-15, 15]): two int8 dots into two int32
  accumulators, combined as 16 * hi + lo, as the hardware adds its two quartet products.
All int32 values stay exact under the op's bound K * r_max * (2^a - 1) < 2^30. Padded K columns load w = 0, so the
-128 that a padded x' holds contributes nothing.

``asm_gemm_emulate`` (CUDA cores, compute bound): per [BLOCK_M, BLOCK_N] output tile and BLOCK_K slice, the bank
x * a for every a in the alphabet is built by shift-add in registers ([BLOCK_M, BLOCK_K] per entry, shared by the
tile's BLOCK_N outputs); each weight of the [BLOCK_N, BLOCK_K] tile is decoded once per quartet into (odd part a,
shift s) (shared by the tile's BLOCK_M rows); then per quartet a where-chain over the alphabet (the mux), a shift by
s + 4i and an add, the sign, and an int32 sum over the slice. The alphabet is a compile-time bit mask (bit a set for
each a in the set): the mux has |A| - 1 selects, and bank entries outside the set feed nothing (dead code the compiler
drops).

Under ``TRITON_INTERPRET=1`` (CPU) both kernels run, the int8 ``tl.dot`` included (checked bit-exact against the
int64 reference by tests/test_asm_gemm.py); tiles there are chosen for the interpreter's per-op cost (few, large).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lrkern._alloc import empty

# Fast path tiles on a GPU. int8 dots need BLOCK_K >= 32 (mma k = 32). Only compiled for sm_90 (Triton 3.9, no GPU
# here): 128 x 128 x 32 with 8 warps and 3 stages uses 220 (W4) / 255 (W8, two accumulators) registers and no spill;
# BLOCK_K = 64 spills 56-528 bytes, and 4 warps spill at 64 x 64 x 64 already.
# TODO(gpu): autotune BLOCK_M/BLOCK_N/BLOCK_K, num_warps and num_stages on H100; these are first guesses.
FAST_BLOCK_M = 128
FAST_BLOCK_N = 128
FAST_BLOCK_K = 32
FAST_NUM_WARPS = 8
FAST_NUM_STAGES = 3
# Emulation tiles on a GPU: the [BLOCK_M, BLOCK_N, BLOCK_K] product tile lives in registers. sm_90 compile: 96-255
# registers (alphabet {1}, Q = 1 up to the odd set, Q = 2), no spill.
EMU_BLOCK_M = 32
EMU_BLOCK_N = 32
EMU_BLOCK_K = 8
EMU_NUM_WARPS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _asm_fast_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, W8: tl.constexpr,
                     A8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        x = x.to(tl.int32)
        if A8:
            x = x - 128  # x' = x - 128 in [-128, 127]
        x8 = x.to(tl.int8)
        # w^T tile [BLOCK_K, BLOCK_N] (w is [N, K] row-major); padding loads 0.
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        w = w.to(tl.int32)
        if A8:
            wsum += tl.sum(w, axis=0)
        if W8:
            mag = tl.abs(w)
            neg = w < 0
            hi = mag >> 4
            lo = mag & 15
            hi = tl.where(neg, -hi, hi).to(tl.int8)
            lo = tl.where(neg, -lo, lo).to(tl.int8)
            acc_hi = tl.dot(x8, hi, acc_hi, out_dtype=tl.int32)
            acc_lo = tl.dot(x8, lo, acc_lo, out_dtype=tl.int32)
        else:
            acc_lo = tl.dot(x8, w.to(tl.int8), acc_lo, out_dtype=tl.int32)
    acc = acc_lo
    if W8:
        acc = acc + 16 * acc_hi
    if A8:
        acc = acc + 128 * wsum[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _mux(a, bank, sel, A: tl.constexpr, ALPHA: tl.constexpr):
    """sel where the quartet's odd part is not A; the bank entry x * A where it is (only if A is in the alphabet)."""
    if (ALPHA >> A) & 1:
        sel = tl.where((a == A)[None, :, :], bank[:, None, :], sel)
    return sel


@triton.jit
def _asm_emulate_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, ALPHA: tl.constexpr,
                        Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        x = x.to(tl.int32)  # [BLOCK_M, BLOCK_K]
        # The pre-computer bank, by shift-add (spec 3.1); 3x and 5x also feed 11x and 13x.
        x3 = (x << 1) + x
        x5 = (x << 2) + x
        x7 = (x << 3) - x
        x9 = (x << 3) + x
        x11 = (x << 3) + x3
        x13 = (x << 3) + x5
        x15 = (x << 4) - x
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        w = w.to(tl.int32)  # [BLOCK_N, BLOCK_K]
        mag = tl.abs(w)
        prod = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.int32)
        for i in tl.static_range(Q):
            q = (mag >> (4 * i)) & 15  # quartet i, decoded once per weight: q = a << s
            s = tl.where((q & 1) != 0, 0, tl.where((q & 2) != 0, 1, tl.where((q & 4) != 0, 2, 3)))
            a = q >> s
            sel = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.int32) + x[:, None, :]  # a == 1
            sel = _mux(a, x3, sel, 3, ALPHA)
            sel = _mux(a, x5, sel, 5, ALPHA)
            sel = _mux(a, x7, sel, 7, ALPHA)
            sel = _mux(a, x9, sel, 9, ALPHA)
            sel = _mux(a, x11, sel, 11, ALPHA)
            sel = _mux(a, x13, sel, 13, ALPHA)
            sel = _mux(a, x15, sel, 15, ALPHA)
            term = sel << (s + 4 * i)[None, :, :]  # shift by s + 4i
            prod += tl.where((q != 0)[None, :, :], term, 0)  # add (a zero quartet adds nothing)
        prod = tl.where((w < 0)[None, :, :], -prod, prod)  # the sign
        acc += tl.sum(prod, axis=2)  # int32 accumulate
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _tile(extent: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(extent, 1))))


def asm_gemm(x: torch.Tensor, w: torch.Tensor, w_bits: int, a_bits: int) -> torch.Tensor:
    """Fast path: x [M, K] (uint8/int16/int32, contiguous), w [N, K] int16 -> int32 [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    out = empty((m, n), torch.int32, x.device)
    if _interpreting():  # few, large tiles: the interpreter's cost is per op, not per element
        bm, bn, bk, extra = _tile(m, 64), _tile(n, 64), _tile(k, 256, 32), {}
    else:
        bm, bn, bk = _tile(m, FAST_BLOCK_M), _tile(n, FAST_BLOCK_N), FAST_BLOCK_K
        extra = {"num_warps": FAST_NUM_WARPS, "num_stages": FAST_NUM_STAGES}
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _asm_fast_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), W8=w_bits == 8,
                           A8=a_bits == 8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return out


def alphabet_mask(alphabet) -> int:
    """Compile-time bit mask of an alphabet set: bit a set for each a in it."""
    mask = 0
    for a in alphabet:
        mask |= 1 << int(a)
    return mask


def asm_gemm_emulate(x: torch.Tensor, w: torch.Tensor, alphabet: list[int], w_bits: int,
                     a_bits: int) -> torch.Tensor:
    """Shift-add datapath: x [M, K] (uint8/int16/int32, contiguous), w [N, K] int16 -> int32 [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    out = empty((m, n), torch.int32, x.device)
    if _interpreting():
        bm, bn, bk, extra = _tile(m, 16, 1), _tile(n, 16, 1), _tile(k, 64, 1), {}
    else:
        bm, bn, bk = _tile(m, EMU_BLOCK_M), _tile(n, EMU_BLOCK_N), EMU_BLOCK_K
        extra = {"num_warps": EMU_NUM_WARPS}
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _asm_emulate_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                              ALPHA=alphabet_mask(alphabet), Q=w_bits // 4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              **extra)
    return out
