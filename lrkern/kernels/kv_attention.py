"""Triton attention over a quantized KV cache (``lrkern::kv_attention``): flash-decoding on packed 2/4-bit codes.

Maths and argument shapes: ``lrkern/reference/kv_attention.py``. Two launches:

1. ``_kv_split_kernel``, grid (B * Hkv, query-row blocks, splits + 1). A program takes one KV head of one batch row,
   BLOCK_M query rows of its GQA group (the g query heads x t queries share every key, so each code byte is loaded
   once for all of them and the products run on tensor cores with the rows as the M dimension), and one contiguous
   range of quantized tokens; the last split takes the full-precision window. It keeps an online softmax (running
   max m, sum l, accumulator acc in fp32) and writes (m, l, acc) to a workspace.
2. ``_kv_combine_kernel``, grid (B * Hkv, query-row blocks): merges the splits, adds the linear correction, rotates
   the values back (one in-register Hadamard on the d-vector output) and writes out and lse.

Nothing is dequantized to memory. Scores use ``q . k_hat_j = (q * s) . code_j + q . z`` for per-channel keys (one
scale row per token group) and ``s_j (q . code_j) + z_j sum(q)`` for per-token keys; the value product uses
``sum_j p_j v_hat_j = (p * s_v) @ codes + (p . z_v)``. Codes are small integers, exact in fp16; the fp32 operand is
split into fp16 hi + lo parts (rows scaled to [-1, 1] first), so two fp16 tensor-core dots give ~22 significant bits
(a single fp16, bf16 or tf32 dot would give 8 to 11 and visibly perturb softmax at large scores). The window
(<= R tokens) is multiplied in fp32. For rotated keys (QuaRot-style) the queries are rotated in fp32 by the Hadamard
kernel before the split launch.

Block sizes and warps come from ``launch_config``; ``scripts/sm90_check.py`` compiles every kernel for sm_90 with
the ptxas that Triton ships and reports registers and spills, which is how they were chosen without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32
from lrkern.kernels.hadamard import _fwht_tile, hadamard
from lrkern.kernels.quant import _unpack

from lrkern._alloc import empty
from lrkern.reference.hadamard import rotation_block

_LOG2E = 1.4426950408889634  # host side: folded into the softmax scale
_LN2 = tl.constexpr(0.6931471805599453)  # read inside a kernel, so it must be a constexpr
# Programs the split launch aims for: two waves of an H100's 132 SMs.
# TODO(gpu): tune _TARGET_PROGRAMS, BLOCK_T and num_warps on H100 (first guesses; never measured on a GPU).
_TARGET_PROGRAMS = 264
_MAX_BLOCK_T = 64
# 8 warps: at 4 the split kernel's tiles spilled on sm_90 (scripts/sm90_check.py reports registers and spills).
_SPLIT_WARPS = 8


@triton.jit
def _split_rows(a):
    """(r, hi, lo) with a = r * (hi + lo) to ~22 bits: each row of fp32 a scaled into [-1, 1] by r = max |a_row| (so
    neither huge scores nor tiny probabilities leave fp16's normal range), then split into fp16 hi + lo."""
    r = tl.max(tl.abs(a), axis=1)
    an = a * tl.where(r > 0, 1.0 / tl.where(r > 0, r, 1.0), 0.0)[:, None]
    hi = an.to(tl.float16)
    return r, hi, (an - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot_presplit(hi, lo, r, b):
    """(r * (hi + lo)) @ b with two fp16 tensor-core dots accumulating in fp32."""
    return (tl.dot(hi, b, out_dtype=tl.float32) + tl.dot(lo, b, out_dtype=tl.float32)) * r[:, None]


@triton.jit
def _dot_split(a, b):
    """a @ b for fp32 a [M, K] and b [K, N] exact in fp16 (integer codes), to ~22 significant bits of each row of a.
    (bf16 would need no row scaling, but Triton's interpreter computes bf16 dots wrongly, and CI runs it.)"""
    r, hi, lo = _split_rows(a)
    return _dot_presplit(hi, lo, r, b)


@triton.jit
def _rotate_rows(v, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROT_B: tl.constexpr, LOG_ROT_B: tl.constexpr,
                 ROT_SCALE: tl.constexpr):
    """Each row of an fp32 [BLOCK_M, BLOCK_D] tile times I (x) H_ROT_B (orthonormal Hadamard on blocks of ROT_B
    columns); columns past d are zero and stay in their own (discarded) blocks, since ROT_B divides d."""
    NBLK: tl.constexpr = BLOCK_M * (BLOCK_D // ROT_B)
    v = _fwht_tile(tl.reshape(v, (NBLK, ROT_B)), NBLK, ROT_B, LOG_ROT_B)
    return tl.reshape(v, (BLOCK_M, BLOCK_D)) * ROT_SCALE


@triton.jit
def _online_update(m_i, l_i, acc, s):
    """One online-softmax step with scores s [M, T] (log2 domain, -inf where masked): returns (m, l, acc, p) with
    acc rescaled to the new max but not yet incremented. Every tile holds a valid token, so the new max is finite."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None], p


@triton.jit
def _kv_split_kernel(
    q_ptr,  # q: [B, Hq, t, d] (fp32 and rotated for rotated keys); the rows of KV head h are q[b, h*g:(h+1)*g]
    kc_ptr,  # k codes: [B, Hkv, Tq, NB] uint8
    ks_ptr,  # k scale/zero: per channel [B, Hkv, Tq / G, d]; per token [B, Hkv, Tq, d / CG]
    kz_ptr,
    vc_ptr,  # v codes: [B, Hkv, Tq, NB] uint8
    vs_ptr,  # v scale/zero: [B, Hkv, Tq, d / CG]
    vz_ptr,
    kw_ptr,  # k, v window: [B, Hkv, W, d]
    vw_ptr,
    nq_ptr,  # n_quant, n_win: [B] int32
    nw_ptr,
    m_ws,  # m, l: [B * Hkv, NSPLIT + 1, MROWS] fp32 (log2 domain)
    l_ws,
    acc_ws,  # acc: [B * Hkv, NSPLIT + 1, MROWS, BLOCK_D] fp32
    Hkv,
    Tq,
    W,
    MROWS,
    TILES_PER_SPLIT,
    NSPLIT,
    qk_scale,  # softmax scale * log2(e)
    d: tl.constexpr,
    BITS: tl.constexpr,
    G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Partial softmax attention (m, l, acc) of BLOCK_M query rows over one token range of one (b, KV head)."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = d // PER
    NGC: tl.constexpr = d // CG
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    b = bh // Hkv
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < MROWS
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    bcols = tl.arange(0, BLOCK_D // PER)
    bmask = bcols < NB
    cgrp = cols // CG

    q = to_f32(tl.load(q_ptr + bh * MROWS * d + rows[:, None] * d + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0))
    q = q * qk_scale

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    tt = tl.arange(0, BLOCK_T)
    if not KEY_PER_CHANNEL and NGC == 1:
        # Per-token keys leave q unscaled: split it into fp16 hi + lo once, not once per tile.
        q_r, q_hi, q_lo = _split_rows(q)
        q_sum = tl.sum(q, axis=1)
    if split < NSPLIT:
        nq = tl.load(nq_ptr + b)
        t_lo = split * TILES_PER_SPLIT * BLOCK_T
        t_hi = tl.minimum(t_lo + TILES_PER_SPLIT * BLOCK_T, nq)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            tok = t0 + tt
            valid = tok < t_hi
            tok_off = bh * Tq + tok  # [BLOCK_T] int64 token index into [B * Hkv * Tq]
            kb = tl.load(kc_ptr + tok_off[:, None] * NB + bcols[None, :], mask=valid[:, None] & bmask[None, :],
                         other=0)
            kcode = tl.trans(_unpack(kb, BLOCK_T, BLOCK_D // PER, BITS).to(tl.float16))  # [BLOCK_D, BLOCK_T]
            if KEY_PER_CHANNEL:
                # One scale/zero row per G-token group; BLOCK_T divides G, so the tile lies in one group.
                srow = (bh * (Tq // G) + t0 // G) * d
                ks = to_f32(tl.load(ks_ptr + srow + cols, mask=cmask, other=0.0))
                kz = to_f32(tl.load(kz_ptr + srow + cols, mask=cmask, other=0.0))
                s = _dot_split(q * ks[None, :], kcode) + tl.sum(q * kz[None, :], axis=1)[:, None]
            elif NGC == 1:
                ks = to_f32(tl.load(ks_ptr + tok_off, mask=valid, other=0.0))
                kz = to_f32(tl.load(kz_ptr + tok_off, mask=valid, other=0.0))
                s = _dot_presplit(q_hi, q_lo, q_r, kcode) * ks[None, :] + q_sum[:, None] * kz[None, :]
            else:
                s = tl.zeros((BLOCK_M, BLOCK_T), tl.float32)
                for k in tl.static_range(NGC):
                    qk = tl.where((cgrp == k)[None, :], q, 0.0)
                    ks = to_f32(tl.load(ks_ptr + tok_off * NGC + k, mask=valid, other=0.0))
                    kz = to_f32(tl.load(kz_ptr + tok_off * NGC + k, mask=valid, other=0.0))
                    s += _dot_split(qk, kcode) * ks[None, :] + tl.sum(qk, axis=1)[:, None] * kz[None, :]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_i, l_i, acc, p = _online_update(m_i, l_i, acc, s)
            vb = tl.load(vc_ptr + tok_off[:, None] * NB + bcols[None, :], mask=valid[:, None] & bmask[None, :],
                         other=0)
            vcode = _unpack(vb, BLOCK_T, BLOCK_D // PER, BITS).to(tl.float16)  # [BLOCK_T, BLOCK_D]
            for k in tl.static_range(NGC):
                vs = to_f32(tl.load(vs_ptr + tok_off * NGC + k, mask=valid, other=0.0))
                vz = to_f32(tl.load(vz_ptr + tok_off * NGC + k, mask=valid, other=0.0))
                part = _dot_split(p * vs[None, :], vcode) + tl.sum(p * vz[None, :], axis=1)[:, None]
                if NGC == 1:
                    acc += part
                else:
                    acc += tl.where((cgrp == k)[None, :], part, 0.0)
    else:
        nw = tl.load(nw_ptr + b)
        for t0 in range(0, nw, BLOCK_T):
            tok = t0 + tt
            valid = tok < nw
            offs = (bh * W + tok)[:, None] * d + cols[None, :]
            wmask = valid[:, None] & cmask[None, :]
            kw = to_f32(tl.load(kw_ptr + offs, mask=wmask, other=0.0))
            # The window is at most R tokens: an exact fp32 product costs nothing next to the quantized region.
            s = tl.dot(q, tl.trans(kw), input_precision="ieee")
            s = tl.where(valid[None, :], s, float("-inf"))
            m_i, l_i, acc, p = _online_update(m_i, l_i, acc, s)
            vw = to_f32(tl.load(vw_ptr + offs, mask=wmask, other=0.0))
            acc += tl.dot(p, vw, input_precision="ieee")

    nsp = NSPLIT + 1
    ws_row = (bh * nsp + split) * MROWS + rows
    tl.store(m_ws + ws_row, m_i, mask=rmask)
    tl.store(l_ws + ws_row, l_i, mask=rmask)
    tl.store(acc_ws + ws_row[:, None] * BLOCK_D + cols[None, :], acc, mask=rmask[:, None])


@triton.jit
def _kv_combine_kernel(
    m_ws,  # [B * Hkv, NSP, MROWS] fp32, log2 domain
    l_ws,
    acc_ws,  # [B * Hkv, NSP, MROWS, BLOCK_D] fp32
    phi_ptr,  # phi(q): [B, Hq, t, DF] fp32 (rows of one KV head contiguous, as for q)
    cs_ptr,  # S: [B, Hkv, DF, d] fp32
    cz_ptr,  # z: [B, Hkv, DF] fp32
    out_ptr,  # out: [B, Hq, t, d], q's dtype
    lse_ptr,  # lse: [B, Hq, t] fp32
    MROWS,
    NSP,
    d: tl.constexpr,
    DF: tl.constexpr,
    HAS_CORR: tl.constexpr,
    VALUE_ROT: tl.constexpr,
    ROT_B: tl.constexpr,
    LOG_ROT_B: tl.constexpr,
    ROT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = (A e^{m-M} + c_n e^{-M}) / (L e^{m-M} + c_d e^{-M}) with M = max(m, log c_d), rotated back;
    lse = M + log den."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < MROWS
    cols = tl.arange(0, BLOCK_D)
    # Merge the splits: two passes over the (small) partials, the max first, so empty splits (m = -inf) weigh 0.
    m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for sp in range(0, NSP):
        m_s = tl.load(m_ws + (bh * NSP + sp) * MROWS + rows, mask=rmask, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_safe = tl.where(m_max > float("-inf"), m_max, 0.0)
    L = tl.zeros((BLOCK_M,), tl.float32)
    A = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for sp in range(0, NSP):
        row = (bh * NSP + sp) * MROWS + rows
        m_s = tl.load(m_ws + row, mask=rmask, other=float("-inf"))
        w = tl.exp2(m_s - m_safe)  # 0 for an empty split
        L += w * tl.load(l_ws + row, mask=rmask, other=0.0)
        A += w[:, None] * tl.load(acc_ws + row[:, None] * BLOCK_D + cols[None, :], mask=rmask[:, None], other=0.0)
    m_nat = m_max * _LN2  # natural-log units from here on; -inf for an empty row
    if HAS_CORR:
        # c_n = phi @ S and c_d = phi . z as DF rank-1 updates: a [BLOCK_M, DF] x [DF, BLOCK_D] fp32 dot lowered to
        # FMAs keeps its operands in local memory (it spilled kilobytes on sm_90), and this runs once per program.
        c_n = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        c_d = tl.zeros((BLOCK_M,), tl.float32)
        for f in range(0, DF):
            phi_f = tl.load(phi_ptr + bh * MROWS * DF + rows * DF + f, mask=rmask, other=0.0)
            s_f = tl.load(cs_ptr + (bh * DF + f) * d + cols, mask=cols < d, other=0.0)
            c_n += phi_f[:, None] * s_f[None, :]
            c_d += phi_f * tl.load(cz_ptr + bh * DF + f)
        c_d = tl.maximum(c_d, 0.0)
        M = tl.where(c_d > 0, tl.maximum(m_nat, tl.log(tl.where(c_d > 0, c_d, 1.0))), m_nat)
    else:
        c_n = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        c_d = tl.zeros((BLOCK_M,), tl.float32)
        M = m_nat
    M_safe = tl.where(M > float("-inf"), M, 0.0)
    a = tl.where(m_nat > float("-inf"), tl.exp(m_nat - M_safe), 0.0)
    fw = tl.where(c_d > 0, tl.exp(-M_safe), 0.0)
    num = A * a[:, None] + c_n * fw[:, None]
    den = L * a + c_d * fw
    pos = den > 0
    out = tl.where(pos[:, None], num / tl.where(pos, den, 1.0)[:, None], 0.0)
    lse = tl.where(pos, M_safe + tl.log(tl.where(pos, den, 1.0)), float("-inf"))
    if VALUE_ROT:
        out = _rotate_rows(out, BLOCK_M, BLOCK_D, ROT_B, LOG_ROT_B, ROT_SCALE)
    tl.store(out_ptr + bh * MROWS * d + rows[:, None] * d + cols[None, :], cast_rne(out, out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols < d)[None, :])
    tl.store(lse_ptr + bh * MROWS + rows, lse, mask=rmask)


def _block_t(block_m: int, block_d: int, group_size: int, key_per_channel: bool) -> int:
    """Token tile: a power of two in [16, 64] (16 is the tensor-core K) with BLOCK_M * BLOCK_T * BLOCK_D <= 2^16, so
    the unpacked code tiles and partial products fit in registers without spilling; per-token keys (two more
    per-token vectors in flight) take half of that. Both limits come from scripts/sm90_check.py (ptxas for sm_90).
    For per-channel keys the tile also divides the group size, so it never straddles two scale rows."""
    bt = max(16, min(_MAX_BLOCK_T, 2**16 // (block_m * block_d)))
    return min(bt, group_size & -group_size) if key_per_channel else max(16, bt // 2)


def launch_config(Hq: int, Hkv: int, t: int, d: int, bits: int, group_size: int, key_per_channel: bool,
                  channel_group: int, value_rotation: bool, df: int | None) -> tuple[dict, dict]:
    """Compile-time parameters (constexprs and num_warps) of the split and combine kernels for one problem class;
    ``df`` is the correction's feature dim or None. Shared by the launcher and the sm_90 compile test."""
    mrows = (Hq // Hkv) * t
    block_d = max(16, triton.next_power_of_2(d))
    # Query rows share every code byte; beyond 32 rows the fp32 accumulator alone costs 32+ registers per thread.
    block_m = max(16, min(32, triton.next_power_of_2(mrows)))
    block_t = _block_t(block_m, block_d, group_size, key_per_channel)
    rot_b = rotation_block(d)
    rot = dict(ROT_B=rot_b, LOG_ROT_B=rot_b.bit_length() - 1, ROT_SCALE=rot_b ** -0.5)
    split = dict(d=d, BITS=bits, G=group_size, KEY_PER_CHANNEL=key_per_channel, CG=channel_group, BLOCK_M=block_m,
                 BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_SPLIT_WARPS)
    combine = dict(d=d, DF=df or 1, HAS_CORR=df is not None, VALUE_ROT=value_rotation, **rot, BLOCK_M=block_m,
                   BLOCK_D=block_d, num_warps=4)
    return split, combine


def kv_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s,
                 corr_z, phi_q, bits: int, group_size: int, key_per_channel: bool, channel_group: int,
                 rotate_keys: bool, value_rotation: bool, scale: float, num_splits: int | None = None):
    """Launcher for ``lrkern::kv_attention`` (validated, contiguous arguments). Returns (out, lse).

    ``num_splits`` (default: enough programs for two waves of an H100) fixes how many token ranges the quantized
    region is cut into; tests set it to exercise the reduction at small shapes.
    """
    q_in = q
    B, Hq, t, d = q.shape
    Hkv, Tq, W = k_win.shape[1], k_codes.shape[2], k_win.shape[2]
    has_corr = phi_q is not None
    split_meta, combine_meta = launch_config(Hq, Hkv, t, d, bits, group_size, key_per_channel, channel_group,
                                             value_rotation, corr_s.shape[2] if has_corr else None)
    mrows = (Hq // Hkv) * t
    if rotate_keys:
        # Queries rotate like the keys, in fp32 by the Hadamard kernel: a separate small launch, since in-register
        # butterflies (or a dot with a generated H) before the token loop made the split kernel spill on sm_90.
        rb = rotation_block(d)
        q = hadamard(q.float().reshape(B, Hq, t, d // rb, rb)).reshape(B, Hq, t, d)
    block_t = split_meta["BLOCK_T"]
    n_mblk = triton.cdiv(mrows, split_meta["BLOCK_M"])
    # Splits partition the capacity Tq, not the rows' lengths (reading those would cost a device sync): a cache
    # reserved far beyond its contents puts all the work in the first splits. QuantizedKV grows by 1.25x at most.
    n_tiles = triton.cdiv(Tq, block_t)
    if num_splits is None:
        num_splits = max(1, triton.cdiv(_TARGET_PROGRAMS, B * Hkv * n_mblk))
    num_splits = min(num_splits, n_tiles)
    tiles_per_split = triton.cdiv(n_tiles, num_splits) if n_tiles else 0
    num_splits = triton.cdiv(n_tiles, tiles_per_split) if n_tiles else 0
    nsp = num_splits + 1  # the last split takes the window

    dev = q.device
    m_ws = torch.empty(B * Hkv, nsp, mrows, dtype=torch.float32, device=dev)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty(B * Hkv, nsp, mrows, split_meta["BLOCK_D"], dtype=torch.float32, device=dev)
    _kv_split_kernel[(B * Hkv, n_mblk, nsp)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, m_ws, l_ws, acc_ws,
        Hkv, Tq, W, mrows, tiles_per_split, num_splits, scale * _LOG2E, **split_meta)
    out = empty(q_in.shape, q_in.dtype, dev)
    lse = empty(q_in.shape[:3], torch.float32, dev)
    dummy = m_ws  # never read when HAS_CORR is False
    _kv_combine_kernel[(B * Hkv, n_mblk)](
        m_ws, l_ws, acc_ws, phi_q if has_corr else dummy, corr_s if has_corr else dummy,
        corr_z if has_corr else dummy, out, lse, mrows, nsp, **combine_meta)
    return out, lse
