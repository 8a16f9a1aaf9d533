"""Reference orthonormal Walsh-Hadamard transform (Sylvester order)."""
from __future__ import annotations

import math

import torch


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H_n along the last dim, H_n[i, j] = (-1)^popcount(i & j) / sqrt(n); fp32 butterflies inside.

    x: [..., n] with n a power of two. Returns a tensor of x's shape and dtype.
    """
    n = x.shape[-1]
    y = x.to(torch.float32).reshape(-1, n)
    h = 1
    while h < n:
        # Stage with stride h: pair element j with j + h inside each block of 2h.
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The explicit orthonormal Hadamard matrix H_n ([n, n], symmetric, H_n @ H_n = I)."""
    i = torch.arange(n, device=device)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return ((1 - 2 * parity).to(torch.float64) / math.sqrt(n)).to(dtype)


def rotation_block(d: int) -> int:
    """Block size of the head-dim rotation: the largest power of two dividing d (d itself when d is a power of two).

    d = 64, 128, 256 -> the full H_d; d = 96 -> 32, i.e. the block-diagonal I_3 (x) H_32.
    """
    return d & -d


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal head-dim rotation x @ (I_{d/b} (x) H_b), b = ``rotation_block(d)``; its own inverse (fp32 math).

    The block-diagonal form keeps the rotation exact and cheap for head dims that are not powers of two (96 = 3 x 32),
    at the price of mixing only within each block.
    """
    d = x.shape[-1]
    b = rotation_block(d)
    return hadamard(x.reshape(*x.shape[:-1], d // b, b)).reshape(x.shape)
