"""Triton fused Spiking Temporal Modulator (forward and backward), per ``lrkern/reference/stm.py``.

Tensors are [T, B, C, S] (S: the flattened spatial dims). The grid is (B * C rows, ceil(S / BLOCK)): every program
lies inside one (b, c) row, so the channel's tau, theta0, beta and the row's gain are per-program scalars, and the
program walks all T steps with the membrane, the spike trace (and in the backward the gradient carries) in fp32
registers. The forward reads u once and writes s and h once; the backward first rebuilds the spike trace by a forward
sweep over the saved spikes into an fp32 scratch [T, N] (only with beta; one extra read of s and one write and read
of the scratch), then walks t from T - 1 down to 0 reading grad_s, h, s (and u) once and writing grad_u once. With u
it also rebuilds V[t-1] from H[t-1] and S[t-1] for the tau gradient; those rows are carried to the next (earlier)
step, so each is still loaded once.

Parameter gradients: each program sums its lanes' per-neuron fp32 sums over t (``tl.sum``) into a
[4, B * C, n_blocks] fp32 buffer (gain, tau, theta0, beta); the launcher adds the blocks in float64 and scales the tau
row by -+1 / tau^2 in float64. No atomics: the result is deterministic.

Exactness, as ``lrkern/kernels/lif.py``: the fp32 arithmetic follows the reference operation by operation (division
by tau is ``div_rn``, never a reciprocal; firing is the non-strict ``h >= theta`` on the fp32 h; h is rounded to u's
dtype with ``cast_rne``), and both kernels are compiled without FMA contraction, so fp32 spikes, h and v_last are
bit-identical to the reference. Only the surrogate's exponential differs (tl.exp vs torch's), which the error-ratio
comparison of the gradients absorbs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32
from lrkern.kernels.lif import _charge, _surrogate

from lrkern._alloc import empty

SIGMOID, ATAN = 0, 1
# Largest / smallest neurons per program: BLOCK = min(MAX_BLOCK, next_pow2(S)), at least MIN_BLOCK.
# TODO(gpu): never measured on a GPU; a 6x6 spatial row (S = 36) fills 36 of 64 lanes, and packing several rows per
# program (per-lane channel parameters) may pay off there.
MAX_BLOCK = 1024
MIN_BLOCK = 16
ELEMS_PER_THREAD = 8


@triton.jit
def _stm_fwd_kernel(
    u_ptr,  # u: [T, B, C, S] contiguous, fp32/fp16/bf16
    v0_ptr,  # v0: [B, C, S] fp32
    gain_ptr,  # gain: [B, C] fp32 (any fp32 tensor when HAS_GAIN is off; never read)
    tau_ptr,  # tau, theta0, beta: [C] fp32 (beta: any fp32 tensor when HAS_BETA is off)
    theta0_ptr,
    beta_ptr,
    s_ptr,  # s, h: [T, B, C, S] in u's dtype
    h_ptr,
    v_last_ptr,  # v_last: [B, C, S] fp32
    T,
    N,  # B * C * S: the stride of t
    S,
    C,
    rho,  # fp32 scalars
    v_reset,
    SOFT_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Charge, threshold, fire, reset, trace for T steps (reference order, fp32)."""
    row = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < S
    ch = row % C
    n = row.to(tl.int64) * S + p  # int64 offset of neuron (row, p); T * N may exceed 2^31
    tau_b = tl.zeros((BLOCK,), tl.float32) + tl.load(tau_ptr + ch)  # div_rn does not broadcast a scalar
    theta0 = tl.load(theta0_ptr + ch)
    if HAS_BETA:
        beta = tl.load(beta_ptr + ch)
    if HAS_GAIN:
        g = tl.load(gain_ptr + row)
    v = tl.load(v0_ptr + n, mask=mask, other=0.0)
    a = tl.zeros((BLOCK,), tl.float32)
    off = n
    for _ in range(T):
        x = to_f32(tl.load(u_ptr + off, mask=mask, other=0.0))
        if HAS_GAIN:
            x = g * x
        h = _charge(v, x, tau_b, v_reset, DECAY_INPUT, SOFT_RESET)
        if HAS_BETA:
            theta = theta0 + beta * a
        else:
            theta = tl.zeros((BLOCK,), tl.float32) + theta0
        spike = h >= theta
        sp = tl.where(spike, 1.0, 0.0)
        if SOFT_RESET:
            v = tl.where(spike, h - theta, h)
        else:
            v = tl.where(spike, v_reset, h)
        if HAS_BETA:
            a = rho * a + sp
        tl.store(s_ptr + off, cast_rne(sp, s_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + off, cast_rne(h, h_ptr.dtype.element_ty), mask=mask)
        off += N
    tl.store(v_last_ptr + n, v, mask=mask)


@triton.jit
def _stm_bwd_kernel(
    grad_s_ptr,  # grad_s: [T, B, C, S] in h's dtype
    grad_v_last_ptr,  # grad_v_last: [B, C, S] fp32
    u_ptr,  # u: [T, B, C, S] in h's dtype (any tensor when PARAMS is off; never read)
    v0_ptr,  # v0: [B, C, S] fp32 (read only under PARAMS)
    h_ptr,  # h, s: [T, B, C, S] as the forward stored them
    s_ptr,
    gain_ptr,  # gain [B, C], tau / theta0 / beta [C]: fp32 (absent ones: any fp32 tensor, never read)
    tau_ptr,
    theta0_ptr,
    beta_ptr,
    trace_ptr,  # fp32 [T, N] scratch: the spike trace before each step (HAS_BETA only)
    grad_u_ptr,  # grad_u: [T, B, C, S] in h's dtype
    grad_v0_ptr,  # grad_v0: [B, C, S] fp32
    partial_ptr,  # fp32 [4, B * C, n_blocks]: this program's sums (gain, tau, theta0, beta)
    T,
    N,
    S,
    C,
    n_blocks,
    rho,  # fp32 scalars
    v_reset,
    alpha,
    atan_scale,  # pi / 2 * alpha (host, double)
    half_alpha,  # alpha / 2 (host, double)
    SOFT_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    HAS_BETA: tl.constexpr,
    PARAMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Trace rebuild (with beta), then the reverse-time recurrence of the reference's backward."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    p = blk * BLOCK + tl.arange(0, BLOCK)
    mask = p < S
    ch = row % C
    n = row.to(tl.int64) * S + p
    tau = tl.load(tau_ptr + ch)
    tau_b = tl.zeros((BLOCK,), tl.float32) + tau
    one = tl.full((BLOCK,), 1.0, tl.float32)
    k = 1.0 - tl.math.div_rn(one, tau_b)  # 1 - 1 / tau as the reference forms it (fp32, IEEE)
    theta0 = tl.load(theta0_ptr + ch)
    if HAS_BETA:
        beta = tl.load(beta_ptr + ch)
        # A[-1] = 0; A[t] = rho A[t-1] + S[t]: the forward's fp32 operations, so theta is bit-identical.
        a = tl.zeros((BLOCK,), tl.float32)
        off = n
        for _ in range(T):
            tl.store(trace_ptr + off, a, mask=mask)
            a = rho * a + to_f32(tl.load(s_ptr + off, mask=mask, other=0.0))
            off += N
    if HAS_GAIN:
        g = tl.load(gain_ptr + row)
    gv = tl.load(grad_v_last_ptr + n, mask=mask, other=0.0)
    ga = tl.zeros((BLOCK,), tl.float32)
    acc_g = tl.zeros((BLOCK,), tl.float32)
    acc_tau = tl.zeros((BLOCK,), tl.float32)
    acc_th = tl.zeros((BLOCK,), tl.float32)
    acc_b = tl.zeros((BLOCK,), tl.float32)
    if PARAMS:
        v0 = tl.load(v0_ptr + n, mask=mask, other=0.0)
    last = tl.cast(T - 1, tl.int64) * N + n  # T == 1 may be a constexpr: tl.cast, not .to
    ht = to_f32(tl.load(h_ptr + last, mask=mask, other=0.0))
    st = to_f32(tl.load(s_ptr + last, mask=mask, other=0.0))
    if HAS_BETA:
        at = tl.load(trace_ptr + last, mask=mask, other=0.0)
    for i in range(T):
        t = T - 1 - i
        off = t.to(tl.int64) * N + n
        if HAS_BETA:
            theta = theta0 + beta * at
        else:
            theta = tl.zeros((BLOCK,), tl.float32) + theta0
        psi = _surrogate(ht - theta, SURROGATE, alpha, atan_scale, half_alpha)
        gs = to_f32(tl.load(grad_s_ptr + off, mask=mask, other=0.0))
        if HAS_BETA:
            gs = gs + ga
        gsp = gs * psi
        if DETACH_RESET:
            q = tl.zeros((BLOCK,), tl.float32)
        else:
            if SOFT_RESET:
                q = -(theta * psi)
            else:
                q = (v_reset - ht) * psi
        if SOFT_RESET:
            dvdh = 1.0 + q
        else:
            dvdh = (1.0 - st) + q
        gh = gsp + gv * dvdh
        gth = -(gsp + gv * q)
        if SOFT_RESET:
            gth = gth - gv * st
        if DECAY_INPUT:
            gx = tl.math.div_rn(gh, tau_b)
        else:
            gx = gh
        if HAS_GAIN:
            gu = g * gx
        else:
            gu = gx
        tl.store(grad_u_ptr + off, cast_rne(gu, grad_u_ptr.dtype.element_ty), mask=mask)
        acc_th += gth
        if HAS_BETA:
            acc_b += gth * at
            ga = rho * ga + beta * gth
        # The previous step's rows (clamped at t = 0, where they are not used): V[t-1] for the tau gradient, and
        # h, s, trace of the next iteration.
        prev = tl.maximum(t - 1, 0).to(tl.int64) * N + n
        hp = to_f32(tl.load(h_ptr + prev, mask=mask, other=0.0))
        sp = to_f32(tl.load(s_ptr + prev, mask=mask, other=0.0))
        if HAS_BETA:
            ap = tl.load(trace_ptr + prev, mask=mask, other=0.0)
        if PARAMS:
            uu = to_f32(tl.load(u_ptr + off, mask=mask, other=0.0))
            if HAS_GAIN:
                x = g * uu
            else:
                x = uu
            if HAS_BETA:
                thp = theta0 + beta * ap
            else:
                thp = tl.zeros((BLOCK,), tl.float32) + theta0
            fired = sp != 0.0
            if SOFT_RESET:
                vp = tl.where(fired, hp - thp, hp)
            else:
                vp = tl.where(fired, v_reset, hp)
            vp = tl.where(t > 0, vp, v0)
            acc_g += uu * gx
            if SOFT_RESET:
                vd = vp
            else:
                vd = vp - v_reset
            if DECAY_INPUT:
                acc_tau += gh * (x - vd)
            else:
                acc_tau += gh * vd
        gv = gh * k
        ht = hp
        st = sp
        if HAS_BETA:
            at = ap
    tl.store(grad_v0_ptr + n, gv, mask=mask)
    zero = tl.zeros((BLOCK,), tl.float32)
    rows = tl.num_programs(0)
    base = row.to(tl.int64) * n_blocks + blk
    plane = rows.to(tl.int64) * n_blocks
    tl.store(partial_ptr + base, tl.sum(tl.where(mask, acc_g, zero), axis=0))
    tl.store(partial_ptr + plane + base, tl.sum(tl.where(mask, acc_tau, zero), axis=0))
    tl.store(partial_ptr + 2 * plane + base, tl.sum(tl.where(mask, acc_th, zero), axis=0))
    tl.store(partial_ptr + 3 * plane + base, tl.sum(tl.where(mask, acc_b, zero), axis=0))


def _block(s: int) -> int:
    return max(MIN_BLOCK, min(MAX_BLOCK, triton.next_power_of_2(max(1, s))))


def _num_warps(block: int) -> int:
    return max(1, min(8, block // (32 * ELEMS_PER_THREAD)))


def stm_forward(u: torch.Tensor, v0: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float,
                v_reset: float, soft_reset: bool, decay_input: bool):
    """Launcher for the STM forward: u contiguous [T, B, C, S], v0 fp32 [B, C, S], gain fp32 [B, C] or None,
    tau / theta0 / beta (or None) fp32 [C], validated.

    -> (s [T, B, C, S] u.dtype, h [T, B, C, S] u.dtype, v_last [B, C, S] fp32).
    """
    t, b, c, sp = u.shape
    s = empty(u.shape, u.dtype, u.device)
    h = empty(u.shape, u.dtype, u.device)
    v_last = empty(u.shape[1:], torch.float32, u.device)
    if b * c * sp == 0:
        return s, h, v_last
    block = _block(sp)
    _stm_fwd_kernel[(b * c, triton.cdiv(sp, block))](
        u, v0, tau if gain is None else gain, tau, theta0, tau if beta is None else beta, s, h, v_last, t, b * c * sp,
        sp, c, float(rho), float(v_reset), SOFT_RESET=bool(soft_reset), DECAY_INPUT=bool(decay_input),
        HAS_GAIN=gain is not None, HAS_BETA=beta is not None, BLOCK=block, num_warps=_num_warps(block),
        enable_fp_fusion=False)
    return s, h, v_last


def stm_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, u, v0: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float, v_reset: float,
                 soft_reset: bool, decay_input: bool, detach_reset: bool, surrogate_kind: int, alpha: float):
    """Launcher for the STM backward: grad_s, u (or None), h, s contiguous [T, B, C, S] in one dtype; grad_v_last,
    v0 fp32 [B, C, S]; parameters as the forward's; validated. surrogate_kind 0 = sigmoid, 1 = atan.

    -> (grad_u [T, B, C, S] in h's dtype, grad_v0 [B, C, S] fp32, grad_params [4, B, C] fp32: gain, tau, theta0,
    beta per (b, c); rows 0 and 1 zeros when u is None, row 3 when beta is None).
    """
    if surrogate_kind not in (SIGMOID, ATAN):
        raise ValueError(f"surrogate_kind must be 0 (sigmoid) or 1 (atan), got {surrogate_kind}")
    t, b, c, sp = h.shape
    grad_u = empty(h.shape, h.dtype, h.device)
    grad_v0 = empty(h.shape[1:], torch.float32, h.device)
    if t == 0 or b * c * sp == 0:
        grad_v0.copy_(grad_v_last.reshape(grad_v0.shape))
        return grad_u, grad_v0, torch.zeros((4, b, c), dtype=torch.float32, device=h.device)
    block = _block(sp)
    n_blocks = triton.cdiv(sp, block)
    partial = empty((4, b * c, n_blocks), torch.float32, h.device)
    trace = empty(h.shape, torch.float32, h.device) if beta is not None else grad_v0
    alpha = float(alpha)
    _stm_bwd_kernel[(b * c, n_blocks)](
        grad_s, grad_v_last, h if u is None else u, v0, h, s, tau if gain is None else gain, tau, theta0,
        tau if beta is None else beta, trace, grad_u, grad_v0, partial, t, b * c * sp, sp, c, n_blocks, float(rho),
        float(v_reset), alpha, math.pi / 2.0 * alpha, alpha / 2.0, SOFT_RESET=bool(soft_reset),
        DECAY_INPUT=bool(decay_input), DETACH_RESET=bool(detach_reset), SURROGATE=int(surrogate_kind),
        HAS_GAIN=gain is not None, HAS_BETA=beta is not None, PARAMS=u is not None, BLOCK=block,
        num_warps=_num_warps(block), enable_fp_fusion=False)
    sums = partial.sum(-1, dtype=torch.float64).view(4, b, c)
    tau64 = tau.to(torch.float64).view(1, c)
    sums[1] = sums[1] / (tau64 * tau64) * (-1.0 if decay_input else 1.0)
    if u is None:
        sums[0:2] = 0.0
    if beta is None:
        sums[3] = 0.0
    return grad_u, grad_v0, sums.to(torch.float32)
