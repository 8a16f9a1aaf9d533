"""Reference alphabet-set projection, fake quantization and decomposition (spec asm.md 3.2, 3.3, 3.5): the executable
specification of ``lrkern::asm_project``, ``lrkern::asm_fake_quant`` (and its backward) and ``lrkern::asm_decompose``.

Projection, per element of w with the scale s_c of its channel c (the index along ``axis``), in fp32:

    u     = |w| / s_c                         (IEEE fp32 division, never a multiply by 1/s)
    P(u)  = r_j with j = #{t_j < u}           (t_j = (r_j + r_{j+1}) / 2 in fp32, exact: multiples of 0.5 below 256)
    w_int = sign(w) * P(u)                    (int16; NaN weights give 0)

so P is the nearest representable magnitude, ties go to the smaller one, and u > r_max saturates at r_max. Every backend
computes u by the same fp32 division and compares it with the same fp32 midpoints, so w_int is bit-identical.

Fake quantization: w_hat = dtype(s_c * float(w_int)) (one fp32 multiply, one rounding to w's dtype). Backward (clipped
straight-through estimator and the LSQ step-size gradient on the non-uniform grid):

    dL/dw   = g  where u <= r_max, else 0                                   (in w's dtype)
    dL/ds_c = gscale * sum over channel c of g * sign(w) * (P(u) - u  if u <= r_max  else r_max)
    gscale  = fp32(1 / sqrt(K * r_max)),  K = w.numel() / w.shape[axis]

summed in fp32 (the kernels sum in another, fixed order: compare dL/ds with a tolerance).

Decomposition of w_int (int16): for each of the Q = w_bits / 4 quartets q_i = (|w_int| >> 4i) & 15 one code byte,
bit 7 = nonzero flag, bits 4..6 = index of odd(q_i) in the sorted alphabet, bits 0..3 = trailing zeros of q_i (0 for
q_i == 0); codes [..., Q], quartet 0 (the low one) first. |w_int| > 2^w_bits - 1 or a quartet whose odd part is not in
the alphabet is an error, reported with the first offending flat index.

Implementation contract (every backend): w, grad, w_int contiguous; scale fp32 [C] contiguous; the channel of flat
element e is (e // inner) % C (inner = prod(w.shape[axis + 1:])); alphabet a validated sorted tuple, w_bits 4 or 8.
decompose returns (codes, first_bad) with first_bad an int64 0-dim tensor: the first offending flat index, or numel.
"""
from __future__ import annotations

import math

import torch

from lrkern.asm.alphabet import kernel_tables, parse_alphabet, check_w_bits


def _channels(t: torch.Tensor, scale: torch.Tensor, inner: int) -> torch.Tensor:
    return t.reshape(-1, scale.numel(), inner)


def _u(w: torch.Tensor, scale: torch.Tensor, inner: int) -> torch.Tensor:
    # Tensor / tensor on one device: an IEEE division on CPU and CUDA (a Python-float divisor may become a reciprocal).
    return _channels(w, scale, inner).to(torch.float32).abs() / scale.view(1, -1, 1)


def _sign(w: torch.Tensor, scale: torch.Tensor, inner: int) -> torch.Tensor:
    wf = _channels(w, scale, inner)
    return (wf > 0).to(torch.int16) - (wf < 0).to(torch.int16)


def _magnitude(u: torch.Tensor, alphabet, w_bits: int) -> torch.Tensor:
    """P(u) as int32 (same shape as u)."""
    tab = kernel_tables(alphabet, w_bits, u.device)
    # right=False: j = #{t_j < u}, so a u exactly on a midpoint stays below it (ties to the smaller magnitude).
    j = torch.bucketize(u, tab.mid[: tab.n_mid], right=False)
    j = torch.where(torch.isnan(u), 0, j)
    return tab.mag[j]


def gscale(numel: int, channels: int, r_max: int) -> float:
    """The LSQ gradient scale 1 / sqrt(K * r_max), K = numel / channels, as the fp32 value every backend uses."""
    k = max(numel // max(channels, 1), 1)
    return float(torch.tensor(1.0 / math.sqrt(k * r_max), dtype=torch.float32))


def project(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int) -> torch.Tensor:
    """Implementation contract: -> w_int int16, w's shape."""
    if w.numel() == 0:
        return torch.empty(w.shape, dtype=torch.int16, device=w.device)
    p = _magnitude(_u(w, scale, inner), alphabet, w_bits)
    return (_sign(w, scale, inner) * p).to(torch.int16).reshape(w.shape)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet, w_bits: int) -> torch.Tensor:
    """Implementation contract: -> w_hat in w's dtype and shape."""
    if w.numel() == 0:
        return torch.empty_like(w)
    w_int = project(w, scale, inner, alphabet, w_bits)
    w_hat = scale.view(1, -1, 1) * _channels(w_int, scale, inner).to(torch.float32)
    return w_hat.to(w.dtype).reshape(w.shape)


def fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, inner: int, alphabet,
                        w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Implementation contract: grad in w's dtype and shape -> (grad_w in w's dtype, grad_scale fp32 [C])."""
    tab = kernel_tables(alphabet, w_bits, w.device)
    if w.numel() == 0:
        return torch.empty_like(w), torch.zeros_like(scale)
    u = _u(w, scale, inner)
    p = _magnitude(u, alphabet, w_bits)
    inside = u <= tab.r_max  # False for NaN
    g = _channels(grad, scale, inner)
    grad_w = torch.where(inside, g, torch.zeros((), dtype=g.dtype, device=g.device)).reshape(w.shape)
    term = torch.where(inside, p.to(torch.float32) - u, float(tab.r_max)) * _sign(w, scale, inner).to(torch.float32)
    total = (g.to(torch.float32) * term).sum(dim=(0, 2))
    gs = torch.tensor(gscale(w.numel(), scale.numel(), tab.r_max), dtype=torch.float32, device=w.device)
    return grad_w, total * gs


def decompose(w_int: torch.Tensor, alphabet, w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Implementation contract: -> (codes uint8 [..., Q], first_bad int64 0-dim: first offending flat index or
    numel). Codes of offending weights are unspecified."""
    tab = kernel_tables(alphabet, w_bits, w_int.device)
    nq = w_bits // 4
    m = w_int.to(torch.int32).abs()
    bad = m > (1 << w_bits) - 1
    codes = []
    for i in range(nq):
        c = tab.code[(m >> (4 * i)) & 15]
        bad |= c < 0
        codes.append(c.clamp_min(0))
    codes = torch.stack(codes, dim=-1).to(torch.uint8)
    idx = torch.nonzero(bad.reshape(-1))
    first = idx[0, 0] if idx.numel() else torch.tensor(w_int.numel(), device=w_int.device)
    return codes, first.to(torch.int64)


# User-facing forms with the registered ops' signatures (no validation; see lrkern.ops.asm_quant).

def _inner(w: torch.Tensor, axis: int) -> int:
    return math.prod(w.shape[axis % w.dim() + 1:])


def asm_project(w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet, w_bits: int) -> torch.Tensor:
    return project(w.contiguous(), scale, _inner(w, axis), parse_alphabet(alphabet), check_w_bits(w_bits))


def asm_fake_quant(w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet, w_bits: int) -> torch.Tensor:
    return fake_quant(w.contiguous(), scale, _inner(w, axis), parse_alphabet(alphabet), check_w_bits(w_bits))


def asm_fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet,
                            w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fake_quant_backward(grad.to(w.dtype).contiguous(), w.contiguous(), scale, _inner(w, axis),
                               parse_alphabet(alphabet), check_w_bits(w_bits))


def asm_decompose(w_int: torch.Tensor, alphabet, w_bits: int) -> torch.Tensor:
    alpha, w_bits = parse_alphabet(alphabet), check_w_bits(w_bits)
    codes, first = decompose(w_int.contiguous(), alpha, w_bits)
    check_decomposed(w_int, first, alpha, w_bits)
    return codes


def check_decomposed(w_int: torch.Tensor, first: torch.Tensor, alphabet, w_bits: int) -> None:
    """Raise ValueError naming the first offending weight (flat index and value) unless first == numel."""
    first = int(first)
    if first < w_int.numel():
        value = int(w_int.reshape(-1)[first])
        raise ValueError(f"w_int: the weight at flat index {first} (value {value}) is not representable with "
                         f"alphabet {tuple(alphabet)} and w_bits={w_bits} (every 4-bit quartet of |w_int| must be 0 "
                         f"or a << s with a in the alphabet, and |w_int| <= {(1 << w_bits) - 1})")
