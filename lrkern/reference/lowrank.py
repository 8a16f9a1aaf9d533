"""Reference low-rank projection ops: the executable specification of ``lrkern/ops/lowrank.py``.

Notation (Kolda & Bader): X is an N-mode tensor with mode sizes n_0..n_{N-1}; mode 0 is the batch. The mode-k
unfolding X_(k) is [n_k, prod_{j != k} n_j]; the mode-k product ``X x_k A^T`` with A: [n_k, r] replaces mode k by r.

- ``mode_gram_accumulate``: ``out += alpha * X_(k) X_(k)^T`` (the calibration statistic of HOSVD).
- ``lance_project``: the HOSVD core ``G = X x_0 U_0^T x_1 U_1^T ...`` over the modes whose factor is given.
- ``lance_linear_wgrad`` / ``lance_conv2d_wgrad``: the weight gradient of a Linear / Conv2d layer whose input is
  replaced by its low-rank reconstruction ``X~ = G x_0 U_0 x_1 U_1 ...``. The reference reconstructs X~ and
  applies the layer's plain weight gradient; the fast implementations never build X~.

Everything is computed in fp32 (fp64 would hide nothing the tests look for and is slow on GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Factors = Sequence[Optional[torch.Tensor]]


def unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """X_(dim): [x.shape[dim], numel / x.shape[dim]] (a copy unless dim is 0)."""
    return torch.movedim(x, dim, 0).reshape(x.shape[dim], -1)


def mode_product(x: torch.Tensor, dim: int, a: torch.Tensor) -> torch.Tensor:
    """x x_dim a^T for a: [x.shape[dim], r]: mode ``dim`` of the result has size r."""
    return torch.movedim(torch.tensordot(x, a, dims=([dim], [0])), -1, dim)


def mode_gram_accumulate(x: torch.Tensor, out: torch.Tensor, dim: int, alpha: float) -> None:
    xf = unfold(x.to(torch.float32), dim)
    out.add_(xf @ xf.T, alpha=alpha)


def lance_project(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    g = x.to(torch.float32, copy=True)
    for k, u in enumerate(factors):
        if u is not None:
            g = mode_product(g, k, u.to(torch.float32))
    return g.contiguous()


def reconstruct(core: torch.Tensor, factors: Factors) -> torch.Tensor:
    """X~ = G x_0 U_0 x_1 U_1 ... (the inverse of ``lance_project`` on span(U))."""
    x = core.to(torch.float32)
    for k, u in enumerate(factors):
        if u is not None:
            x = mode_product(x, k, u.to(torch.float32).T)
    return x


def lance_linear_wgrad(core: torch.Tensor, factors: Factors, grad_out: torch.Tensor) -> torch.Tensor:
    x = reconstruct(core, factors)
    dy = grad_out.to(torch.float32)
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def lance_conv2d_wgrad(core: torch.Tensor, factors: Factors, grad_out: torch.Tensor, weight_shape: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    # ATen's own convolution weight-gradient on the full-size X~ (autograd is off inside an op's implementation).
    x = reconstruct(core, factors)
    return torch.nn.grad.conv2d_weight(x, tuple(weight_shape), grad_out.to(torch.float32), tuple(stride),
                                       tuple(padding), tuple(dilation))
