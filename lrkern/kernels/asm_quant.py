"""Triton alphabet-set projection, fake quantization (forward and backward) and decomposition.

The arithmetic is ``lrkern/reference/asm_quant.py``'s, operation by operation, so w_int is bit-identical to the other
backends: u = div_rn(|w|, s) in fp32 (IEEE division; ``/`` is approximate on GPU), compared with the fp32 midpoints
(exact: multiples of 0.5 below 256). The magnitude is a branch-free count for w_bits = 4 (P = sum_j [u > t_j] *
(r_{j+1} - r_j) over the <= 15 midpoints, unrolled) and an 8-step binary search for w_bits = 8 (the 255-entry midpoint
table padded with +inf, then one gather from the magnitude table).

Tensors are viewed as [P, C, inner] (C channels along the op's axis). A program owns a tile of BLOCK_R rows of the
P * inner elements of a channel by BLOCK_C channels, addressed without divisions when P == 1 (MODE 0: the usual axis=0
weight) or inner == 1 (MODE 1: axis=-1, channels along the tile's fast dimension); MODE 2 is the general case. The
backward writes one partial sum of the scale gradient per (row block, channel) and the host sums them in row-block
order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from lrkern.kernels._common import cast_rne, to_f32

from lrkern._alloc import empty
from lrkern.asm.alphabet import kernel_tables
from lrkern.reference.asm_quant import gscale

# Elements per program. TODO(gpu): tune BLOCK and num_warps on H100 (first guesses; the kernels are memory bound).
BLOCK = 2048
MAX_BLOCK_C = 64


@triton.jit
def _magnitude(u, mid_ptr, delta_ptr, mag_ptr, N_MID: tl.constexpr, W_BITS: tl.constexpr):
    """P(u) = r_j, j = #{t_j < u}, as int32 (0 for NaN u: every comparison is false)."""
    if W_BITS == 4:
        p = tl.zeros(u.shape, tl.int32)
        for j in tl.static_range(N_MID):
            t = tl.load(mid_ptr + j)
            d = tl.load(delta_ptr + j)
            p += tl.where(u > t, d, 0)
    else:
        # j = #{t_k < u} over a sorted 255-entry table (+inf padded): add each power of two whose probe is below u.
        lo = tl.zeros(u.shape, tl.int32)
        # (128 >> k is a constexpr of the unrolled loop; naming it with `step: tl.constexpr = ...` compiles under the
        # interpreter only: a real compile refuses to reassign a constexpr on the next iteration.)
        for k in tl.static_range(8):
            t = tl.load(mid_ptr + lo + ((128 >> k) - 1))
            lo += tl.where(t < u, 128 >> k, 0)
        p = tl.load(mag_ptr + lo)
    return p


@triton.jit
def _tile(M, C, inner, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr):
    """(flat offsets [BLOCK_R, BLOCK_C], channels [BLOCK_C], mask, row block) of this program's tile."""
    n_cb = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_c = pid % n_cb
    pid_r = pid // n_cb
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < M)[:, None] & (c < C)[None, :]
    if MODE == 0:  # P == 1: channel c is the contiguous run [c * inner, (c + 1) * inner)
        flat = c[None, :] * inner + r[:, None]
    elif MODE == 1:  # inner == 1: element (p, c) at p * C + c
        flat = r[:, None] * C + c[None, :]
    else:
        flat = (r // inner)[:, None] * (C * inner) + c[None, :] * inner + (r % inner)[:, None]
    return flat, c, mask, pid_r


@triton.jit
def _project_kernel(w_ptr, scale_ptr, out_ptr, mid_ptr, delta_ptr, mag_ptr, M, C, inner, N_MID: tl.constexpr,
                    W_BITS: tl.constexpr, FAKE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    MODE: tl.constexpr):
    """w_int = sign(w) * P(|w| / s) (int16), or FAKE: w_hat = dtype(s * w_int)."""
    flat, c, mask, _ = _tile(M, C, inner, BLOCK_R, BLOCK_C, MODE)
    s = tl.load(scale_ptr + c, mask=c < C, other=1.0)[None, :]
    w = to_f32(tl.load(w_ptr + flat, mask=mask, other=0.0))
    u = tl.math.div_rn(tl.abs(w), s)
    p = _magnitude(u, mid_ptr, delta_ptr, mag_ptr, N_MID, W_BITS)
    wi = tl.where(w > 0, p, tl.where(w < 0, -p, 0))
    if FAKE:
        tl.store(out_ptr + flat, cast_rne(s * wi.to(tl.float32), out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + flat, wi.to(tl.int16), mask=mask)


@triton.jit
def _fq_bwd_kernel(g_ptr, w_ptr, scale_ptr, gw_ptr, part_ptr, mid_ptr, delta_ptr, mag_ptr, M, C, inner, r_max,
                   N_MID: tl.constexpr, W_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   MODE: tl.constexpr):
    """grad_w = g where u <= r_max else 0; part[row block, c] = sum of g * sign(w) * (P(u) - u or r_max)."""
    flat, c, mask, pid_r = _tile(M, C, inner, BLOCK_R, BLOCK_C, MODE)
    cmask = c < C
    s = tl.load(scale_ptr + c, mask=cmask, other=1.0)[None, :]
    w = to_f32(tl.load(w_ptr + flat, mask=mask, other=0.0))
    g = tl.load(g_ptr + flat, mask=mask, other=0.0)
    u = tl.math.div_rn(tl.abs(w), s)
    p = _magnitude(u, mid_ptr, delta_ptr, mag_ptr, N_MID, W_BITS)
    inside = u <= r_max
    tl.store(gw_ptr + flat, tl.where(inside, g, tl.zeros_like(g)), mask=mask)
    sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
    term = tl.where(inside, p.to(tl.float32) - u, r_max) * sign
    contrib = tl.where(mask, to_f32(g) * term, 0.0)
    tl.store(part_ptr + pid_r.to(tl.int64) * C + c, tl.sum(contrib, axis=0), mask=cmask)


@triton.jit
def _decompose_kernel(w_ptr, codes_ptr, first_ptr, code_ptr, n, Q: tl.constexpr, QMAX: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """codes[e, i] = code byte of quartet i of |w_int[e]|; first[pid] = the program's first offending index (or n)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    m = tl.abs(tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32))
    bad = m > QMAX
    for i in tl.static_range(Q):
        code = tl.load(code_ptr + ((m >> (4 * i)) & 15))
        bad = bad | (code < 0)
        tl.store(codes_ptr + offs * Q + i, tl.maximum(code, 0).to(tl.uint8), mask=mask)
    tl.store(first_ptr + tl.program_id(0), tl.min(tl.where(bad & mask, offs, n), axis=0))


def _layout(numel: int, channels: int, inner: int):
    """(M, MODE, BLOCK_R, BLOCK_C, number of row blocks, grid)."""
    m = numel // channels
    if inner == 1:
        mode, block_c = 1, min(MAX_BLOCK_C, triton.next_power_of_2(channels))
    else:
        mode, block_c = (0 if m == inner else 2), 1
    block_r = max(1, min(BLOCK // block_c, triton.next_power_of_2(m)))
    n_rb = triton.cdiv(m, block_r)
    return m, mode, block_r, block_c, n_rb, (n_rb * triton.cdiv(channels, block_c),)


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _launch_project(w, scale, inner, alphabet, w_bits, fake: bool):
    out = empty(w.shape, w.dtype if fake else torch.int16, w.device)
    if w.numel() == 0:
        return out
    tab = kernel_tables(alphabet, w_bits, w.device)
    m, mode, block_r, block_c, _, grid = _layout(w.numel(), scale.numel(), inner)
    _project_kernel[grid](w, scale, out, tab.mid, tab.delta, tab.mag, m, scale.numel(), inner, N_MID=tab.n_mid,
                          W_BITS=w_bits, FAKE=fake, BLOCK_R=block_r, BLOCK_C=block_c, MODE=mode,
                          num_warps=_num_warps(block_r * block_c), enable_fp_fusion=False)
    return out


def project(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int) -> torch.Tensor:
    """Launcher: w contiguous fp32/fp16/bf16, scale fp32 [C] (validated) -> w_int int16, w's shape."""
    return _launch_project(w, scale, inner, alphabet, w_bits, fake=False)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int) -> torch.Tensor:
    """Launcher: -> w_hat = dtype(s * w_int) in w's dtype and shape."""
    return _launch_project(w, scale, inner, alphabet, w_bits, fake=True)


def fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet,
                        w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: grad, w contiguous (same dtype and shape) -> (grad_w in w's dtype, grad_scale fp32 [C])."""
    c = scale.numel()
    grad_w = empty(w.shape, w.dtype, w.device)
    if w.numel() == 0:
        return grad_w, torch.zeros_like(scale)
    tab = kernel_tables(alphabet, w_bits, w.device)
    m, mode, block_r, block_c, n_rb, grid = _layout(w.numel(), c, inner)
    part = empty((n_rb, c), torch.float32, w.device)
    _fq_bwd_kernel[grid](grad, w, scale, grad_w, part, tab.mid, tab.delta, tab.mag, m, c, inner, float(tab.r_max),
                         N_MID=tab.n_mid, W_BITS=w_bits, BLOCK_R=block_r, BLOCK_C=block_c, MODE=mode,
                         num_warps=_num_warps(block_r * block_c), enable_fp_fusion=False)
    gs = torch.tensor(gscale(w.numel(), c, tab.r_max), dtype=torch.float32, device=w.device)
    return grad_w, part.sum(0) * gs


def decompose(w_int: torch.Tensor, alphabet, w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: w_int contiguous int16 -> (codes uint8 [..., Q], first offending flat index or numel, int64 0-dim)."""
    q = w_bits // 4
    n = w_int.numel()
    codes = empty((*w_int.shape, q), torch.uint8, w_int.device)
    if n == 0:
        return codes, torch.zeros((), dtype=torch.int64, device=w_int.device)
    tab = kernel_tables(alphabet, w_bits, w_int.device)
    block = max(1, min(BLOCK, triton.next_power_of_2(n)))
    grid = triton.cdiv(n, block)
    first = empty((grid,), torch.int64, w_int.device)
    _decompose_kernel[(grid,)](w_int, codes, first, tab.code, n, Q=q, QMAX=(1 << w_bits) - 1, BLOCK_N=block,
                               num_warps=_num_warps(block))
    return codes, first.min()


__all__ = ["project", "fake_quant", "fake_quant_backward", "decompose"]
