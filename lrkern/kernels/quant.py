"""Triton asymmetric min-max group quantization with uint8 code packing, and its inverse.

The arithmetic mirrors ``lrkern/reference/quant.py`` step by step so the codes are bit-identical to the other
backends: fp32 min/max, ``scale = dtype(div_rn(mx - mn, qmax))`` (IEEE division; ``/`` is approximate on GPU),
``zero = dtype(mn)``, ``code = clamp(rint(div_rn(x - z, s)), 0, qmax)`` with the stored s and z, code 0 where s == 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32

from lrkern._alloc import empty
from lrkern.layout import codes_per_byte, packed_shapes, unpacked_shape

# fp32 elements one program keeps in registers (32 per thread at 8 warps); a longer group is processed in chunks of
# this size, reading x twice (min/max, then codes). Read at call time, so tests can shrink it to force the chunked path.
# TODO(gpu): autotune MAX_TILE, num_warps and the per-channel column block on H100; these are first guesses.
MAX_TILE = 8192
# Fewest programs the per-channel launch aims for (about two per H100 SM) before narrowing its column block.
_MIN_PROGRAMS = 264


@triton.jit
def _quantize(v, s, z, QMAX: tl.constexpr):
    """clamp(rint((v - z) / s), 0, QMAX) in fp32, or 0 where s == 0."""
    pos = s > 0
    y = tl.math.div_rn(v - z, tl.where(pos, s, 1.0))
    # Clamping first is equivalent (rint is monotone and the bounds are integers) and keeps y < 2^23, where adding
    # and subtracting 2^23 is an exact round-half-to-even on every backend, the interpreter included.
    y = tl.minimum(tl.maximum(y, 0.0), QMAX * 1.0)
    y = (y + 8388608.0) - 8388608.0
    return tl.where(pos, y, 0.0)


@triton.jit
def _masked_minmax(v, mask, AXIS: tl.constexpr):
    """(min, max) of v along AXIS over the lanes where mask holds."""
    return tl.min(tl.where(mask, v, float("inf")), axis=AXIS), tl.max(tl.where(mask, v, float("-inf")), axis=AXIS)


@triton.jit
def _pack(q, ROWS: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, W] integral fp32 codes -> [ROWS, W * BITS / 8] int32 bytes, first element in the lowest bits."""
    PER: tl.constexpr = 8 // BITS
    qi = tl.reshape(q.to(tl.int32), (ROWS, W // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(qi << shifts[None, None, :], axis=2)


@triton.jit
def _unpack(b, ROWS: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, NB] bytes -> [ROWS, NB * 8 / BITS] fp32 codes."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    shifts = tl.arange(0, PER) * BITS
    q = (b.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & QMAX
    return tl.reshape(q, (ROWS, NB * PER)).to(tl.float32)


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # x: [G, GS], one group per row
    codes_ptr,  # codes: [G, GS * BITS / 8] uint8
    scale_ptr,  # scale, zero: [G]
    zero_ptr,
    G,
    GS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """Per-row group quantization: scale = (max - min) / qmax, zero = min, codes packed along the row."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    j = tl.arange(0, CHUNK)
    k = tl.arange(0, CHUNK // PER)
    if NUM_CHUNKS == 1:
        mask = gmask[:, None] & (j < GS)[None, :]
        v = to_f32(tl.load(x_ptr + g[:, None] * GS + j[None, :], mask=mask, other=0.0))
        mn, mx = _masked_minmax(v, mask, 1)
    else:
        mn = tl.full((BLOCK_G,), float("inf"), tl.float32)
        mx = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        for ci in range(NUM_CHUNKS):
            jj = ci * CHUNK + j
            mask = gmask[:, None] & (jj < GS)[None, :]
            v = to_f32(tl.load(x_ptr + g[:, None] * GS + jj[None, :], mask=mask, other=0.0))
            cmn, cmx = _masked_minmax(v, mask, 1)
            mn, mx = tl.minimum(mn, cmn), tl.maximum(mx, cmx)
    # Rows past G have mn = +inf, mx = -inf; they are masked out of every store.
    scale = cast_rne(tl.math.div_rn(mx - mn, tl.full((BLOCK_G,), QMAX, tl.float32)), scale_ptr.dtype.element_ty)
    zero = cast_rne(mn, zero_ptr.dtype.element_ty)
    tl.store(scale_ptr + g, scale, mask=gmask)
    tl.store(zero_ptr + g, zero, mask=gmask)
    s = to_f32(scale)[:, None]
    z = to_f32(zero)[:, None]
    if NUM_CHUNKS == 1:
        packed = _pack(_quantize(v, s, z, QMAX), BLOCK_G, CHUNK, BITS)
        bmask = gmask[:, None] & (k < GS // PER)[None, :]
        tl.store(codes_ptr + g[:, None] * (GS // PER) + k[None, :], packed.to(tl.uint8), mask=bmask)
    else:
        for ci in range(NUM_CHUNKS):
            jj = ci * CHUNK + j
            mask = gmask[:, None] & (jj < GS)[None, :]
            v = to_f32(tl.load(x_ptr + g[:, None] * GS + jj[None, :], mask=mask, other=0.0))
            packed = _pack(_quantize(v, s, z, QMAX), BLOCK_G, CHUNK, BITS)
            kk = ci * (CHUNK // PER) + k
            bmask = gmask[:, None] & (kk < GS // PER)[None, :]
            tl.store(codes_ptr + g[:, None] * (GS // PER) + kk[None, :], packed.to(tl.uint8), mask=bmask)


@triton.jit
def _quant_cols_kernel(
    x_ptr,  # x: [O, T, N]; groups are GS consecutive rows of one column
    codes_ptr,  # codes: [O, T, N * BITS / 8] uint8
    scale_ptr,  # scale, zero: [O, T / GS, N]
    zero_ptr,
    T,
    N,
    GS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """Per-column group quantization over GS rows: program (group, column block) reduces down its rows."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    grp = tl.program_id(0).to(tl.int64)  # = o * (T / GS) + row group
    tg = T // GS
    row0 = (grp // tg) * T + (grp % tg) * GS  # first row of the group in the flattened [O * T, N] view
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < N
    i = tl.arange(0, CHUNK)
    kb = tl.program_id(1) * (BLOCK_N // PER) + tl.arange(0, BLOCK_N // PER)
    kmask = kb < N // PER
    if NUM_CHUNKS == 1:
        mask = (i < GS)[:, None] & cmask[None, :]
        v = to_f32(tl.load(x_ptr + (row0 + i)[:, None] * N + c[None, :], mask=mask, other=0.0))
        mn, mx = _masked_minmax(v, mask, 0)
    else:
        mn = tl.full((BLOCK_N,), float("inf"), tl.float32)
        mx = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        for ci in range(NUM_CHUNKS):
            ii = ci * CHUNK + i
            mask = (ii < GS)[:, None] & cmask[None, :]
            v = to_f32(tl.load(x_ptr + (row0 + ii)[:, None] * N + c[None, :], mask=mask, other=0.0))
            cmn, cmx = _masked_minmax(v, mask, 0)
            mn, mx = tl.minimum(mn, cmn), tl.maximum(mx, cmx)
    scale = cast_rne(tl.math.div_rn(mx - mn, tl.full((BLOCK_N,), QMAX, tl.float32)), scale_ptr.dtype.element_ty)
    zero = cast_rne(mn, zero_ptr.dtype.element_ty)
    tl.store(scale_ptr + grp * N + c, scale, mask=cmask)
    tl.store(zero_ptr + grp * N + c, zero, mask=cmask)
    s = to_f32(scale)[None, :]
    z = to_f32(zero)[None, :]
    if NUM_CHUNKS == 1:
        packed = _pack(_quantize(v, s, z, QMAX), CHUNK, BLOCK_N, BITS)
        bmask = (i < GS)[:, None] & kmask[None, :]
        tl.store(codes_ptr + (row0 + i)[:, None] * (N // PER) + kb[None, :], packed.to(tl.uint8), mask=bmask)
    else:
        for ci in range(NUM_CHUNKS):
            ii = ci * CHUNK + i
            mask = (ii < GS)[:, None] & cmask[None, :]
            v = to_f32(tl.load(x_ptr + (row0 + ii)[:, None] * N + c[None, :], mask=mask, other=0.0))
            packed = _pack(_quantize(v, s, z, QMAX), CHUNK, BLOCK_N, BITS)
            bmask = (ii < GS)[:, None] & kmask[None, :]
            tl.store(codes_ptr + (row0 + ii)[:, None] * (N // PER) + kb[None, :], packed.to(tl.uint8), mask=bmask)


@triton.jit
def _dequant_kernel(
    codes_ptr,  # codes: [R, N * BITS / 8] uint8 (all leading dims flattened into R)
    scale_ptr,  # scale, zero: [G, N / GS] (axis -1) or [O, T / GS, N] (axis -2)
    zero_ptr,
    out_ptr,  # out: [R, N]
    R,
    N,
    T,
    GS: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """out = code * scale + zero in fp32, rounded once to out's dtype."""
    PER: tl.constexpr = 8 // BITS
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    nb = N // PER
    bmask = (r < R)[:, None] & (kb < nb)[None, :]
    b = tl.load(codes_ptr + r[:, None] * nb + kb[None, :], mask=bmask, other=0)
    q = _unpack(b, BLOCK_R, BLOCK_B, BITS)
    c = tl.program_id(1) * (BLOCK_B * PER) + tl.arange(0, BLOCK_B * PER)
    mask = (r < R)[:, None] & (c < N)[None, :]
    if PER_TOKEN:
        sidx = r[:, None] * (N // GS) + (c // GS)[None, :]
    else:
        sidx = ((r // T) * (T // GS) + (r % T) // GS)[:, None] * N + c[None, :]
    s = to_f32(tl.load(scale_ptr + sidx, mask=mask, other=0.0))
    z = to_f32(tl.load(zero_ptr + sidx, mask=mask, other=0.0))
    tl.store(out_ptr + r[:, None] * N + c[None, :], cast_rne(q * s + z, out_ptr.dtype.element_ty), mask=mask)


def _num_warps(tile: int) -> int:
    return max(1, min(8, tile // 1024))


def quant_pack(x: torch.Tensor, bits: int, group_size: int, axis: int, max_tile: int | None = None):
    """Launcher for ``lrkern::quant_pack``: x contiguous, validated; axis -1 or -2. Returns (codes, scale, zero).

    ``max_tile`` (a power of two, default ``MAX_TILE``) bounds the elements one program loads at once; groups that do
    not fit are processed in chunks.
    """
    max_tile = MAX_TILE if max_tile is None else max_tile
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    codes = empty(codes_shape, torch.uint8, x.device)
    scale = empty(scale_shape, x.dtype, x.device)
    zero = empty(scale_shape, x.dtype, x.device)
    gs_p2 = triton.next_power_of_2(group_size)
    if axis == -1:
        groups = x.numel() // group_size
        chunk = min(gs_p2, max_tile)
        num_chunks = triton.cdiv(group_size, chunk)
        # Several short groups per program (one per tile row), capped by the group count so tiny inputs do not
        # compute padding rows.
        block_g = min(max_tile // chunk, triton.next_power_of_2(groups)) if num_chunks == 1 else 1
        grid = (triton.cdiv(groups, block_g),)
        _quant_rows_kernel[grid](x, codes, scale, zero, groups, GS=group_size, BITS=bits, BLOCK_G=block_g,
                                 CHUNK=chunk, NUM_CHUNKS=num_chunks, num_warps=_num_warps(block_g * chunk))
    else:
        t, n = x.shape[-2], x.shape[-1]
        groups = x.numel() // (group_size * n)
        # 128 columns read 256-512 contiguous bytes per row. Narrower blocks, down to 32 columns (64 bytes per row:
        # still whole 32-byte sectors), let a longer token group fit one tile, so x is read once, and give more
        # programs when there are few groups.
        per = codes_per_byte(bits)
        block_n = max(per, min(triton.next_power_of_2(n), 128, max_tile))
        while block_n > 32 and (gs_p2 * block_n > max_tile or groups * triton.cdiv(n, block_n) < _MIN_PROGRAMS):
            block_n //= 2
        chunk = max(1, min(gs_p2, max_tile // block_n))
        num_chunks = triton.cdiv(group_size, chunk)
        grid = (groups, triton.cdiv(n, block_n))
        _quant_cols_kernel[grid](x, codes, scale, zero, t, n, GS=group_size, BITS=bits, BLOCK_N=block_n, CHUNK=chunk,
                                 NUM_CHUNKS=num_chunks, num_warps=_num_warps(chunk * block_n))
    return codes, scale, zero


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, axis: int):
    """Launcher for ``lrkern::dequant``: tensors contiguous and validated; axis -1 or -2."""
    shape = unpacked_shape(codes.shape, bits)
    out = empty(shape, scale.dtype, codes.device)
    n = shape[-1]
    t = shape[-2] if axis == -2 else 1
    rows = out.numel() // n
    per = codes_per_byte(bits)
    # Up to 1024 codes of a row per program, and as many rows as fill a MAX_TILE tile.
    block_b = min(triton.next_power_of_2(n // per), 1024 // per)
    block_r = max(1, min(MAX_TILE // (block_b * per), triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n // per, block_b))
    # No FMA contraction: the reference rounds code * scale before adding zero, and the output must match it.
    _dequant_kernel[grid](codes, scale, zero, out, rows, n, t, GS=group_size, PER_TOKEN=axis == -1, BITS=bits,
                          BLOCK_R=block_r, BLOCK_B=block_b, num_warps=_num_warps(block_r * block_b * per),
                          enable_fp_fusion=False)
    return out
