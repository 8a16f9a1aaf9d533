"""Triton fused multi-step LIF neuron (forward and backward), per ``lrkern/reference/lif.py``.

One program owns BLOCK neurons and walks all T steps with the membrane potential in fp32 registers: the forward reads
x once and writes s and h once (and v_seq when asked); the backward walks t from T - 1 down to 0, reading grad_s, h,
s (and grad_v_seq) once and writing grad_x once. Neurons are independent, so nothing is shared between programs.

The fp32 arithmetic follows the reference operation by operation, so fp32 spikes, h, v_last and v_seq are
bit-identical: division by tau is ``div_rn`` (IEEE; ``/`` is approximate on GPU) and never a reciprocal multiply,
firing is the non-strict ``h >= v_threshold`` on the fp32 h (never on the stored, rounded h), h is rounded to x's
dtype with ``cast_rne``. Scalars the reference computes in Python doubles (``1 - 1/tau``, ``pi / 2 * alpha``,
``alpha / 2``) are computed here on the host too and passed as fp32, and both kernels are compiled without FMA
contraction, so the backward rounds each product as the reference does. Only the surrogate's exponential differs
(tl.exp vs torch's), which the error-ratio comparison of the gradients absorbs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32

from lrkern._alloc import empty

SIGMOID, ATAN = 0, 1
# Neurons per program. Each T step moves BLOCK elements per tensor per program (4 KiB of fp32 at 1024), and a
# program's steps are serial, so bandwidth comes from many resident programs. BLOCK, MIN_BLOCK and _MIN_PROGRAMS are
# read at call time (tests lower _MIN_PROGRAMS to reach the full block at small N).
# TODO(gpu): autotune BLOCK, _MIN_PROGRAMS and num_warps on H100 (and whether the loads want num_stages pipelining);
# these are first guesses, never measured on a GPU.
BLOCK = 1024
# Smallest block the launcher narrows to when N is too small to give _MIN_PROGRAMS programs at BLOCK.
MIN_BLOCK = 128
# Fewest programs a launch aims for (about two per H100 SM) before narrowing its block.
_MIN_PROGRAMS = 264
# Elements per thread: BLOCK / (32 * num_warps) = 8 at 1024, 4 warps. Compiled for sm_90 (Triton 3.9, no GPU here):
# with N % 16 == 0 the loads are 16-byte vectors and the kernels use 33-56 registers; with other N the offsets are
# not provably aligned, every element is its own load with its own 64-bit address, and they use 87-168; no spills.
ELEMS_PER_THREAD = 8


@triton.jit
def _lif_fwd_kernel(
    x_ptr,  # x: [T, N] contiguous, fp32/fp16/bf16
    v0_ptr,  # v0: [N] fp32
    s_ptr,  # s, h: [T, N] in x's dtype
    h_ptr,
    v_last_ptr,  # v_last: [N] fp32
    v_seq_ptr,  # v_seq: [T, N] fp32 (any fp32 tensor when STORE_V_SEQ is off; never touched)
    T,
    N,
    tau,  # fp32 scalars
    v_threshold,
    v_reset,
    SOFT_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    STORE_V_SEQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Charge, fire, reset for T steps (reference order, fp32): s[t], h[t] in x's dtype, v after each step."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    v = to_f32(tl.load(v0_ptr + n, mask=mask, other=0.0))
    tau_b = tl.full((BLOCK,), tau, tl.float32)  # div_rn does not broadcast a scalar
    off = n  # int64 offset of element (t, n): T * N may exceed 2^31
    for _ in range(T):
        xt = to_f32(tl.load(x_ptr + off, mask=mask, other=0.0))
        h = _charge(v, xt, tau_b, v_reset, DECAY_INPUT, SOFT_RESET)
        spike = h >= v_threshold
        if SOFT_RESET:
            v = tl.where(spike, h - v_threshold, h)
        else:
            v = tl.where(spike, v_reset, h)
        tl.store(s_ptr + off, cast_rne(tl.where(spike, 1.0, 0.0), s_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + off, cast_rne(h, h_ptr.dtype.element_ty), mask=mask)
        if STORE_V_SEQ:
            tl.store(v_seq_ptr + off, v, mask=mask)
        off += N
    tl.store(v_last_ptr + n, v, mask=mask)


@triton.jit
def _charge(v, x, tau_b, v_reset, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr):
    """H from the membrane v and the input x, in the reference's order (IEEE division by tau; shared with the STM).
    Soft reset charges towards 0: (v - 0.0) is v, so the soft branches simply drop v_reset."""
    if DECAY_INPUT:
        if SOFT_RESET:
            h = v + tl.math.div_rn(x - v, tau_b)
        else:
            h = v + tl.math.div_rn(x - (v - v_reset), tau_b)
    else:
        if SOFT_RESET:
            h = v - tl.math.div_rn(v, tau_b) + x
        else:
            h = v - tl.math.div_rn(v - v_reset, tau_b) + x
    return h


@triton.jit
def _surrogate(x, KIND: tl.constexpr, alpha, atan_scale, half_alpha):
    """SpikingJelly surrogate gradient at x = h - v_threshold, in the reference's operation order (fp32)."""
    if KIND == 0:
        # torch.sigmoid is 1 / (1 + exp(-z)); psi = (alpha * sg) * (1 - sg).
        z = alpha * x
        one = tl.full(z.shape, 1.0, tl.float32)
        sg = tl.math.div_rn(one, 1.0 + tl.exp(-z))
        return alpha * sg * (1.0 - sg)
    else:
        # (alpha / 2) / (1 + (pi / 2 * alpha * x) ** 2): a scalar over a tensor is reciprocal() * scalar in torch.
        u = atan_scale * x
        one = tl.full(u.shape, 1.0, tl.float32)
        return tl.math.div_rn(one, 1.0 + u * u) * half_alpha


@triton.jit
def _lif_bwd_kernel(
    grad_s_ptr,  # grad_s: [T, N], any float dtype
    grad_v_last_ptr,  # grad_v_last: [N] fp32
    grad_v_seq_ptr,  # grad_v_seq: [T, N] fp32 (any fp32 tensor when HAS_V_SEQ is off; never touched)
    h_ptr,  # h, s: [T, N] in x's dtype, as the forward stored them
    s_ptr,
    grad_x_ptr,  # grad_x: [T, N] in h's dtype
    grad_v0_ptr,  # grad_v0: [N] fp32
    T,
    N,
    tau,  # fp32 scalars
    v_threshold,
    v_reset,
    decay,  # 1 - 1 / tau, computed in double on the host as the reference does
    alpha,
    atan_scale,  # pi / 2 * alpha (host, double)
    half_alpha,  # alpha / 2 (host, double)
    SOFT_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_V_SEQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Reverse-time recurrence: gH = grad_s psi + (carry + grad_v_seq) dV/dH, gX = gH (/ tau), carry = gH decay."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    carry = to_f32(tl.load(grad_v_last_ptr + n, mask=mask, other=0.0))
    tau_b = tl.full((BLOCK,), tau, tl.float32)
    for i in range(T):
        off = (T - 1 - i).to(tl.int64) * N + n  # element (T - 1 - i, n), int64 (T == 1 is a constexpr, i is not)
        ht = to_f32(tl.load(h_ptr + off, mask=mask, other=0.0))
        if HAS_V_SEQ:
            gv = carry + to_f32(tl.load(grad_v_seq_ptr + off, mask=mask, other=0.0))
        else:
            gv = carry
        psi = _surrogate(ht - v_threshold, SURROGATE, alpha, atan_scale, half_alpha)
        gs = to_f32(tl.load(grad_s_ptr + off, mask=mask, other=0.0))
        if SOFT_RESET:
            if DETACH_RESET:
                gh = gs * psi + gv  # dV/dH = 1
            else:
                gh = gs * psi + gv * (1.0 - v_threshold * psi)
        else:
            st = to_f32(tl.load(s_ptr + off, mask=mask, other=0.0))
            if DETACH_RESET:
                gh = gs * psi + gv * (1.0 - st)
            else:
                gh = gs * psi + gv * ((1.0 - st) + (v_reset - ht) * psi)
        if DECAY_INPUT:
            gx = tl.math.div_rn(gh, tau_b)
        else:
            gx = gh
        tl.store(grad_x_ptr + off, cast_rne(gx, grad_x_ptr.dtype.element_ty), mask=mask)
        carry = gh * decay
    tl.store(grad_v0_ptr + n, carry, mask=mask)


def _block(n: int) -> int:
    """BLOCK, narrowed (not below MIN_BLOCK) until there are _MIN_PROGRAMS programs, and never past N's power of
    two (small inputs do not compute, or under the interpreter simulate, padding)."""
    block = BLOCK
    while block > MIN_BLOCK and triton.cdiv(n, block) < _MIN_PROGRAMS:
        block //= 2
    return max(1, min(block, triton.next_power_of_2(n)))


def _num_warps(block: int) -> int:
    return max(1, min(8, block // (32 * ELEMS_PER_THREAD)))


def lif_forward(x: torch.Tensor, v0: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool,
                decay_input: bool, store_v_seq: bool):
    """Launcher for the LIF forward: x contiguous [T, N] fp32/fp16/bf16, v0 fp32 [N], validated.

    -> (s [T, N] x.dtype, h [T, N] x.dtype, v_last [N] fp32, v_seq [T, N] fp32 or an empty tensor).
    """
    t = x.shape[0]
    tail = tuple(x.shape[1:])
    n = math.prod(tail)
    s = empty(x.shape, x.dtype, x.device)
    h = empty(x.shape, x.dtype, x.device)
    v_last = empty(tail, torch.float32, x.device)
    v_seq = empty((t, *tail) if store_v_seq else (0,), torch.float32, x.device)
    if n == 0:
        return s, h, v_last, v_seq
    block = _block(n)
    _lif_fwd_kernel[(triton.cdiv(n, block),)](
        x, v0, s, h, v_last, v_seq if store_v_seq else v_last, t, n, float(tau), float(v_threshold), float(v_reset),
        SOFT_RESET=bool(soft_reset), DECAY_INPUT=bool(decay_input), STORE_V_SEQ=bool(store_v_seq), BLOCK=block,
        num_warps=_num_warps(block), enable_fp_fusion=False)
    return s, h, v_last, v_seq


def lif_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool, decay_input: bool,
                 detach_reset: bool, surrogate_kind: int, alpha: float):
    """Launcher for the LIF backward: grad_s, h, s contiguous [T, N]; grad_v_last fp32 [N]; grad_v_seq fp32 [T, N]
    or empty; validated. surrogate_kind 0 = sigmoid, 1 = atan.

    -> (grad_x [T, N] in h's dtype, grad_v0 [N] fp32).
    """
    if surrogate_kind not in (SIGMOID, ATAN):
        raise ValueError(f"surrogate_kind must be 0 (sigmoid) or 1 (atan), got {surrogate_kind}")
    t = h.shape[0]
    tail = tuple(h.shape[1:])
    n = math.prod(tail)
    grad_x = empty(h.shape, h.dtype, h.device)
    grad_v0 = empty(tail, torch.float32, h.device)
    if n == 0:
        return grad_x, grad_v0
    has_seq = grad_v_seq.numel() > 0
    tau, alpha = float(tau), float(alpha)
    block = _block(n)
    _lif_bwd_kernel[(triton.cdiv(n, block),)](
        grad_s, grad_v_last, grad_v_seq if has_seq else grad_v_last, h, s, grad_x, grad_v0, t, n, tau,
        float(v_threshold), float(v_reset), 1.0 - 1.0 / tau, alpha, math.pi / 2.0 * alpha, alpha / 2.0,
        SOFT_RESET=bool(soft_reset), DECAY_INPUT=bool(decay_input), DETACH_RESET=bool(detach_reset),
        SURROGATE=int(surrogate_kind), HAS_V_SEQ=has_seq, BLOCK=block, num_warps=_num_warps(block),
        enable_fp_fusion=False)
    return grad_x, grad_v0
