"""Fast implementations of the low-rank projection ops (the reference is ``lrkern/reference/lowrank.py``).

CPU ("cpp" slot): ATen's GEMMs, ordered so the largest tensor is read once and never permuted. These ops are chains
of tall-skinny GEMMs. ``bench/bench_lance_ops.py`` measures them (2 EPYC cores): 2.5-7.6x faster than the reference
tensordot chain, but only 12-24% of a memcpy of the same bytes; small batched GEMMs (conv activations) and the
rank-64 contraction (2 * 64 FLOP per element of a [B, L, F] input) bound them, not memory. A fused C++ kernel could
gain on the conv shapes; it is not written yet (the training step is already faster than plain backprop on CPU).

CUDA ("triton" slot): ``lance_project`` and ``mode_gram_accumulate`` run the Triton kernels of
``lrkern/kernels/lowrank.py``; the few remaining GEMMs (batch mode, weight-gradient rebuild) stay on cuBLAS/cuDNN,
which are already at their ceiling for them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Factors = Sequence[Optional[torch.Tensor]]


def mode_mm(t: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """t x_k u^T for a contiguous t, as one GEMM on a view of t (no permute copy)."""
    shape = t.shape
    n, r = shape[k], u.shape[1]
    p, q = math.prod(shape[:k]), math.prod(shape[k + 1:])
    if q == 1:
        out = t.reshape(p, n) @ u
    elif p == 1:
        out = u.T @ t.reshape(n, q)
    else:
        out = torch.matmul(u.T, t.reshape(p, n, q))
    return out.reshape(*shape[:k], r, *shape[k + 1:])


def project_aten(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    # Contract the modes that shrink the tensor most first, so each later GEMM reads the smallest possible tensor.
    order = sorted((k for k, u in enumerate(factors) if u is not None),
                   key=lambda k: factors[k].shape[1] / factors[k].shape[0])
    g = x.to(torch.float32).contiguous()
    for k in order:
        g = mode_mm(g, k, factors[k]).contiguous()
    return g.clone() if g.data_ptr() == x.data_ptr() else g  # an op's output must never alias its input


def _kron_spatial(u_h: Optional[torch.Tensor], u_w: Optional[torch.Tensor], h: int, w: int, device) -> torch.Tensor:
    """[H*W, r_H*r_W] factor of the flattened spatial mode: (U_H kron U_W), with identity for an unprojected mode."""
    eye = lambda n: torch.eye(n, dtype=torch.float32, device=device)  # noqa: E731
    return torch.kron(u_h if u_h is not None else eye(h), u_w if u_w is not None else eye(w))


def project_triton(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    """Per sample, the core is A^T X[s] B (one read of x by the Triton kernel); the batch mode is a final GEMM."""
    from lrkern.kernels.lowrank import MAX_RANK, two_sided_project

    nd = x.dim()
    if nd == 2:  # [B, F]: the whole batch is one "sample" and U_B is its left factor
        x3, a, b, batch = x.unsqueeze(0), factors[0], factors[1], None
    elif nd == 3:  # [B, L, F]
        x3, a, b, batch = x, factors[1], factors[2], factors[0]
    else:  # [B, C, H, W]: the spatial modes share one Kronecker factor on the flattened H*W axis
        bsz, c, h, w = x.shape
        x3, a, batch = x.reshape(bsz, c, h * w), factors[1], factors[0]
        u_h, u_w = factors[2], factors[3]
        b = None if u_h is None and u_w is None else _kron_spatial(u_h, u_w, h, w, x.device)
    if a is None or b is None or max(a.shape[1], b.shape[1]) > MAX_RANK:
        return project_aten(x, factors)  # one-sided cases are plain GEMMs, already at cuBLAS speed
    if a.shape[1] < b.shape[1]:
        # The kernel contracts b's side first (2 * R2 FLOP per element of x); the transposed problem
        # out^T = b^T X^T a puts the smaller rank first, which keeps fp32 inputs memory-bound at larger ranks.
        core = two_sided_project(x3.transpose(1, 2), b, a).transpose(1, 2).contiguous()
    else:
        core = two_sided_project(x3, a, b)
    if nd == 2:
        return core[0]
    if nd == 4:
        r_h = factors[2].shape[1] if factors[2] is not None else h
        core = core.reshape(bsz, a.shape[1], r_h, -1)
    return mode_mm(core, 0, batch).contiguous() if batch is not None else core


def gram_aten(x: torch.Tensor, out: torch.Tensor, dim: int, alpha: float) -> None:
    xf = x.to(torch.float32).contiguous()
    n = xf.shape[dim]
    p, q = math.prod(xf.shape[:dim]), math.prod(xf.shape[dim + 1:])
    if q == 1:
        t = xf.reshape(p, n)
        out.addmm_(t.T, t, alpha=alpha)
    elif p == 1:
        t = xf.reshape(n, q)
        out.addmm_(t, t.T, alpha=alpha)
    elif p * n * n <= xf.numel():
        t = xf.reshape(p, n, q)  # batched GEMM on views; the [p, n, n] partials are no larger than x
        out.add_(torch.bmm(t, t.transpose(1, 2)).sum(0), alpha=alpha)
    else:
        t = xf.reshape(p, n, q).transpose(0, 1).reshape(n, p * q)  # one copy of x, then a single SYRK-shaped GEMM
        out.addmm_(t, t.T, alpha=alpha)


def gram_triton(x: torch.Tensor, out: torch.Tensor, dim: int, alpha: float) -> None:
    from lrkern.kernels.lowrank import mode_gram_accumulate

    mode_gram_accumulate(x, out, dim, alpha)
