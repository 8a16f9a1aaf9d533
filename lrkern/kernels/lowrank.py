"""Triton low-rank projections: the two-sided (HOSVD core) projection and mode-n Gram accumulation.

``two_sided_project``: ``out[s] = a^T @ x[s] @ b`` for x [S, M1, M2], a [M1, R1], b [M2, R2], fp32 accumulation.
``mode_gram_accumulate``: ``out += alpha * X_(d) @ X_(d)^T``, X_(d) the mode-d unfolding [n, prod(other dims)].

Precision: fp32 x is multiplied with IEEE fp32 dots (no tf32). fp16/bf16 x feeds the tensor cores directly, with b
rounded (nearest even) to x's dtype first; products of two fp16/bf16 values are exact in fp32 and the sums run in
fp32, so the only rounding beyond fp32 accumulation is that of b. Triton's interpreter computes bf16 dots on the raw
bits, so under ``TRITON_INTERPRET=1`` bf16 operands are widened exactly to fp32 and multiplied with an IEEE dot: the
same products, summed in a different order.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32

from lrkern._alloc import empty

# Largest rank either side of ``two_sided_project`` supports; the registered op falls back to torch above it.
MAX_RANK = 256
# Fewest programs a launch aims for (about two per H100 SM) before it splits the reduction further.
_MIN_PROGRAMS = 264
# two_sided_project tiles: BLOCK_M1 rows x BLOCK_M2 columns of x per step, and at most MAX_BLOCK_R ranks per side
# per program (larger ranks are split over programs, so the [BLOCK_R1, BLOCK_R2] partial stays in registers).
# Read at call time, so tests can shrink them to reach the split paths at small shapes.
# Warps and stages were checked only by compiling for sm_90 with Triton 3.9 (no GPU here): at 4 warps the 64-rank
# blocks spill hundreds of bytes to the stack; 8 warps and 2 stages compile without spills (128-255 registers).
# TODO(gpu): autotune BLOCK_M1/BLOCK_M2/MAX_BLOCK_R, num_warps and num_stages per dtype and rank on H100; these are
# first guesses, not measurements.
BLOCK_M1 = 64
BLOCK_M2 = 64
MAX_BLOCK_R = 64
PROJECT_NUM_WARPS = 8
PROJECT_NUM_STAGES = 2
# mode_gram_accumulate tiles: BLOCK_N x BLOCK_N output tiles, BLOCK_T contraction steps, and each split-K program
# takes at least MIN_T_TILES steps so its 2 * BLOCK_N^2 atomic adds stay a small share of its loads.
# Compiled for sm_90 (Triton 3.9): 64 x 64 output tiles with BLOCK_T = 32, 8 warps and 2 stages use ~128 registers
# and at most 8 bytes of stack; BLOCK_T = 64 needs ~200 registers, and 4 warps spill hundreds of bytes.
# TODO(gpu): autotune GRAM_BLOCK_N/GRAM_BLOCK_T/MIN_T_TILES, num_warps and num_stages on H100; first guesses.
GRAM_BLOCK_N = 64
GRAM_BLOCK_T = 32
# fp32 (IEEE dots) at BLOCK_T = 32 and 2 stages spills 8 bytes on sm_90 (scripts/sm90_check.py); 16 does not.
GRAM_BLOCK_T_FP32 = 16
MIN_T_TILES = 2
GRAM_NUM_WARPS = 8
GRAM_NUM_STAGES = 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _mode(dtype: torch.dtype) -> tuple[bool, bool]:
    """(LOW, EMULATE): LOW when x is fp16/bf16 (tensor-core dot), EMULATE when that dot must be widened to fp32."""
    low = dtype != torch.float32
    return low, low and dtype == torch.bfloat16 and _interpreting()


def _tile(extent: int, cap: int) -> int:
    # tl.dot needs every dimension >= 16; a tile never exceeds the next power of two of the extent.
    return max(16, min(cap, triton.next_power_of_2(extent)))


@triton.jit
def _dot_acc(p, q, acc, LOW: tl.constexpr, EMULATE: tl.constexpr):
    """acc + p @ q with fp32 accumulation: IEEE fp32 unless LOW (fp16/bf16 operands on tensor cores); EMULATE widens
    bf16 operands exactly to fp32 first (the interpreter cannot multiply bf16; the products are the same)."""
    if EMULATE:
        return tl.dot(to_f32(p), to_f32(q), acc, input_precision="ieee")
    elif LOW:
        return tl.dot(p, q, acc, out_dtype=tl.float32)
    else:
        return tl.dot(p, q, acc, input_precision="ieee")


@triton.jit
def _two_sided_project_kernel(
    x_ptr,  # x: [S, M1, M2] with strides (sxs, sx1, sx2); fp32, fp16 or bf16
    a_ptr,  # a: [M1, R1] fp32 contiguous
    b_ptr,  # b: [M2, R2] fp32 contiguous
    ws_ptr,  # ws: [S, SPLIT, R1, R2] fp32; program (s, sp, rb) writes block rb of a^T x[s] b over its rows of x
    M1,
    M2,
    R1,
    R2,
    sxs,
    sx1,
    sx2,
    SPLIT,  # programs per matrix along M1
    TILES_PER_SPLIT,  # BLOCK_M1 row tiles each of them owns
    NB2,  # rank blocks along R2
    NRB,  # rank blocks in all: NB1 * NB2
    BLOCK_M1: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_R1: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    LOW: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """ws[s, sp] = sum over the rows m of split sp of a[m]^T (x[s, m] @ b), one [BLOCK_R1, BLOCK_R2] block."""
    # 1-D grid, rank block fastest: programs that read the same rows of x run side by side and share them in L2.
    pid = tl.program_id(0)
    rb = pid % NRB
    sp = (pid // NRB) % SPLIT
    s = (pid // (NRB * SPLIT)).to(tl.int64)
    r1 = (rb // NB2) * BLOCK_R1 + tl.arange(0, BLOCK_R1)
    r2 = (rb % NB2) * BLOCK_R2 + tl.arange(0, BLOCK_R2)
    r1_mask = r1 < R1
    r2_mask = r2 < R2
    x_base = x_ptr + s * sxs
    tile0 = sp * TILES_PER_SPLIT
    n_tiles = tl.minimum(TILES_PER_SPLIT, tl.cdiv(M1, BLOCK_M1) - tile0)
    part = tl.zeros((BLOCK_R1, BLOCK_R2), tl.float32)
    for it in range(n_tiles):
        m1 = ((tile0 + it) * BLOCK_M1 + tl.arange(0, BLOCK_M1)).to(tl.int64)
        m1_mask = m1 < M1
        acc = tl.zeros((BLOCK_M1, BLOCK_R2), tl.float32)
        for k in range(0, M2, BLOCK_M2):
            m2 = (k + tl.arange(0, BLOCK_M2)).to(tl.int64)
            m2_mask = m2 < M2
            xt = tl.load(x_base + m1[:, None] * sx1 + m2[None, :] * sx2, mask=m1_mask[:, None] & m2_mask[None, :],
                         other=0.0)
            bt = tl.load(b_ptr + m2[:, None] * R2 + r2[None, :], mask=m2_mask[:, None] & r2_mask[None, :], other=0.0)
            if LOW:
                # Rounded to x's dtype so the tensor cores take both operands; this rounding is the op's only error
                # beyond fp32 accumulation (see the module docstring).
                bt = cast_rne(bt, x_ptr.dtype.element_ty)
            acc = _dot_acc(xt, bt, acc, LOW, EMULATE)
        # a^T read as a [BLOCK_R1, BLOCK_M1] tile straight from a's row-major layout, no transpose in registers.
        at = tl.load(a_ptr + m1[None, :] * R1 + r1[:, None], mask=r1_mask[:, None] & m1_mask[None, :], other=0.0)
        part = tl.dot(at, acc, part, input_precision="ieee")
    ws_offs = ((s * SPLIT + sp) * R1 + r1[:, None]) * R2 + r2[None, :]
    tl.store(ws_ptr + ws_offs, part, mask=r1_mask[:, None] & r2_mask[None, :])


def two_sided_project(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launcher for the two-sided projection ``out[s] = a^T @ x[s] @ b`` (fp32 accumulation).

    x: [S, M1, M2], any strides, fp32/fp16/bf16; a: [M1, R1] and b: [M2, R2], fp32 contiguous, R1, R2 <= MAX_RANK.
    Returns out: [S, R1, R2] fp32 contiguous. For fp16/bf16 x, b is rounded to x's dtype inside the kernel.
    Raises ValueError when R1 or R2 exceeds MAX_RANK (the registered op then falls back to torch).

    Example: ``two_sided_project(torch.randn(2, 64, 196, device="cuda"), u1[:, :4], u2[:, :12])`` -> [2, 4, 12].
    """
    s, m1, m2 = x.shape
    r1, r2 = a.shape[1], b.shape[1]
    for name, side, r in (("a", "R1", r1), ("b", "R2", r2)):
        if r > MAX_RANK:
            raise ValueError(f"{name} has {side} = {r} columns; the Triton two_sided_project supports at most "
                             f"{MAX_RANK}")
    if s == 0 or m1 == 0 or m2 == 0 or r1 == 0 or r2 == 0:
        return torch.zeros((s, r1, r2), dtype=torch.float32, device=x.device)
    block_m1, block_m2 = _tile(m1, BLOCK_M1), _tile(m2, BLOCK_M2)
    block_r1, block_r2 = _tile(r1, MAX_BLOCK_R), _tile(r2, MAX_BLOCK_R)
    nb1, nb2 = triton.cdiv(r1, block_r1), triton.cdiv(r2, block_r2)
    tiles = triton.cdiv(m1, block_m1)
    # Split M1 only as far as needed to fill the GPU: each split costs a [R1, R2] partial in the workspace.
    split = min(tiles, max(1, triton.cdiv(_MIN_PROGRAMS, s * nb1 * nb2)))
    tiles_per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, tiles_per_split)  # no program without rows
    ws = empty((s, split, r1, r2), torch.float32, x.device)
    low, emulate = _mode(x.dtype)
    grid = (s * split * nb1 * nb2,)
    _two_sided_project_kernel[grid](x, a, b, ws, m1, m2, r1, r2, *x.stride(), split, tiles_per_split, nb2, nb1 * nb2,
                                    BLOCK_M1=block_m1, BLOCK_M2=block_m2, BLOCK_R1=block_r1, BLOCK_R2=block_r2,
                                    LOW=low, EMULATE=emulate, num_warps=PROJECT_NUM_WARPS,
                                    num_stages=PROJECT_NUM_STAGES)
    # Partials summed by torch in a fixed order: deterministic, unlike atomics.
    return ws[:, 0] if split == 1 else ws.sum(dim=1)


@triton.jit
def _mode_gram_kernel(
    x_ptr,  # x: [P, N, Q] with strides (sxp, sxn, sxq); fp32, fp16 or bf16; contraction index t = p * Q + q
    out_ptr,  # out: [N, N] fp32 contiguous, accumulated into
    N,
    Q,
    T,  # P * Q
    sxp,
    sxn,
    sxq,
    alpha,
    NUM_PAIRS,  # lower-triangle tile pairs (ti, tj), tj <= ti
    TILES_PER_SPLIT,  # BLOCK_T steps of t per split-K program
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    LOW: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """out[I, J] += alpha * sum over t in this split of x[:, I, :] x[:, J, :] (and the mirror into out[J, I])."""
    # Pair fastest: programs that read the same range of t run side by side and share it in L2.
    pid = tl.program_id(0)
    pair = pid % NUM_PAIRS
    sk = pid // NUM_PAIRS
    # pair = ti * (ti + 1) / 2 + tj: invert the triangular number with an fp32 sqrt (checked exact for every pair
    # below 2^23, i.e. n up to ~260K rows at BLOCK_N = 64); the two corrections absorb an off-by-one beyond that.
    ti = ((tl.sqrt((8 * pair + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pair, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > pair, ti - 1, ti)
    tj = pair - ti * (ti + 1) // 2
    i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i < N
    j_mask = j < N
    i_offs = i.to(tl.int64) * sxn
    j_offs = j.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    t0 = sk.to(tl.int64) * TILES_PER_SPLIT * BLOCK_T
    for it in range(TILES_PER_SPLIT):
        t = t0 + it * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        # One division per column of t, shared by the 2 * BLOCK_N rows loaded with it.
        t_offs = (t // Q) * sxp + (t % Q) * sxq
        xi = tl.load(x_ptr + i_offs[:, None] + t_offs[None, :], mask=i_mask[:, None] & t_mask[None, :], other=0.0)
        xj = tl.load(x_ptr + t_offs[:, None] + j_offs[None, :], mask=t_mask[:, None] & j_mask[None, :], other=0.0)
        acc = _dot_acc(xi, xj, acc, LOW, EMULATE)
    acc = acc * alpha
    mask = i_mask[:, None] & j_mask[None, :]
    # Relaxed atomics: out already holds the running sum and split-K programs only add to it; no ordering needed.
    tl.atomic_add(out_ptr + i[:, None] * N + j[None, :], acc, mask=mask, sem="relaxed")
    if ti != tj:
        tl.atomic_add(out_ptr + j[None, :] * N + i[:, None], acc, mask=mask, sem="relaxed")


def mode_gram_accumulate(x: torch.Tensor, out: torch.Tensor, dim: int, alpha: float) -> None:
    """Launcher for ``out += alpha * X_(dim) @ X_(dim)^T`` in place (fp32 accumulation).

    x: any shape and strides, fp32/fp16/bf16; X_(dim) is its mode-``dim`` unfolding [n, numel / n], n = x.shape[dim].
    out: [n, n] fp32 contiguous, holding the running sum. Only the lower-triangle tiles are computed; each is added
    to out and mirrored, so a symmetric out stays symmetric up to the rounding of the split-K atomic sums (whose
    order on a GPU is not fixed).

    Example: ``cov = torch.zeros(64, 64, device="cuda"); mode_gram_accumulate(acts, cov, 1, 1 / acts.shape[0])``.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    p = math.prod(x.shape[:dim])
    q = math.prod(x.shape[dim + 1:])
    if n == 0 or p * q == 0:
        return
    try:
        # Strided [P, n, Q] view: the kernel walks the unfolding through strides, so no permute copy is made.
        v = x.view(p, n, q)
    except RuntimeError:
        # The dims before (or after) `dim` cannot be merged into one stride (e.g. a permuted 4-D view). One
        # contiguous copy is cheaper than carrying every stride of an arbitrary-rank tensor into the kernel.
        v = x.contiguous().view(p, n, q)
    t = p * q
    low, emulate = _mode(x.dtype)
    block_n, block_t = _tile(n, GRAM_BLOCK_N), _tile(t, GRAM_BLOCK_T if low else GRAM_BLOCK_T_FP32)
    nt = triton.cdiv(n, block_n)
    pairs = nt * (nt + 1) // 2
    t_tiles = triton.cdiv(t, block_t)
    split = max(1, min(triton.cdiv(_MIN_PROGRAMS, pairs), t_tiles // MIN_T_TILES))
    tiles_per_split = triton.cdiv(t_tiles, split)
    split = triton.cdiv(t_tiles, tiles_per_split)  # no program without columns
    _mode_gram_kernel[(pairs * split,)](v, out, n, q, t, *v.stride(), float(alpha), pairs, tiles_per_split,
                                        BLOCK_N=block_n, BLOCK_T=block_t, LOW=low, EMULATE=emulate,
                                        num_warps=GRAM_NUM_WARPS, num_stages=GRAM_NUM_STAGES)
