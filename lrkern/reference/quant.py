"""Reference asymmetric min-max group quantization with uint8 code packing.

The arithmetic is specified step by step, because every backend must produce bit-identical codes:

1. ``mn, mx`` = min and max of the group, in fp32 (exact for fp16/bf16/fp32 inputs).
2. ``scale = to_dtype((mx - mn) / (2^bits - 1))`` and ``zero = to_dtype(mn)``: fp32 subtract, fp32 IEEE division
   (round to nearest), then one rounding to x's dtype. These stored values are the ones used below.
3. ``code = clamp(rint((x - zero) / scale), 0, 2^bits - 1)`` in fp32 with IEEE division and round-half-to-even;
   a group whose stored scale is 0 (max == min, or a range that underflows x's dtype) gets code 0.
4. Codes are packed along the last dim, ``8 // bits`` per byte, the first element in the lowest bits.

Dequantization is ``code * scale + zero`` in fp32, rounded once to scale's dtype. Behaviour on non-finite input is
unspecified.
"""
from __future__ import annotations

import torch

from lrkern.layout import codes_per_byte


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(codes_per_byte(bits), device=device, dtype=torch.int32) * bits


def grouped(x: torch.Tensor, group_size: int, axis: int) -> tuple[torch.Tensor, int]:
    """x viewed as [..., groups, group_size] (axis -1) or [..., groups, group_size, n] (axis -2), and the dim to
    reduce over."""
    if axis == -1:
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size), -1
    return x.reshape(*x.shape[:-2], x.shape[-2] // group_size, group_size, x.shape[-1]), -2


def quant_pack(x: torch.Tensor, bits: int, group_size: int, axis: int):
    """Quantize x in groups of ``group_size`` along ``axis`` (-1 or -2) and pack the codes into uint8.

    Returns (codes uint8, scale, zero); scale/zero have x's dtype. See the module docstring for the exact maths.
    """
    qmax = (1 << bits) - 1
    g, dim = grouped(x.to(torch.float32), group_size, axis)
    mn = g.amin(dim=dim, keepdim=True)
    mx = g.amax(dim=dim, keepdim=True)
    # Divide by a tensor: for a Python-scalar divisor PyTorch's CUDA kernel multiplies by the reciprocal, which is not
    # the IEEE division the specification (and every kernel) uses.
    scale = ((mx - mn) / torch.full_like(mx, qmax)).to(x.dtype)
    zero = mn.to(x.dtype)
    s, z = scale.to(torch.float32), zero.to(torch.float32)
    nonzero = s > 0
    q = torch.round((g - z) / torch.where(nonzero, s, torch.ones_like(s)))
    q = torch.where(nonzero, q, torch.zeros_like(q)).clamp_(0, qmax).to(torch.int32)
    q = q.reshape(x.shape)
    per = codes_per_byte(bits)
    q = q.reshape(*x.shape[:-1], x.shape[-1] // per, per)
    codes = (q << _shifts(bits, x.device)).sum(dim=-1).to(torch.uint8)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int32) from packed bytes: [..., nb] -> [..., nb * 8 / bits]."""
    qmax = (1 << bits) - 1
    q = (codes.to(torch.int32).unsqueeze(-1) >> _shifts(bits, codes.device)) & qmax
    return q.reshape(*codes.shape[:-1], codes.shape[-1] * codes_per_byte(bits))


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, axis: int):
    """x_hat = code * scale + zero (fp32 inside), in scale's dtype, of the unpacked shape."""
    q = unpack(codes, bits).to(torch.float32)
    dim = -1 if axis == -1 else -2
    s = scale.to(torch.float32).repeat_interleave(group_size, dim=dim)
    z = zero.to(torch.float32).repeat_interleave(group_size, dim=dim)
    return (q * s + z).to(scale.dtype)
