"""Shapes of the packed quantization layout, shared by the reference, every kernel and the fake ops.

Codes are packed into uint8 along the **last** dim, ``8 // bits`` codes per byte, the first element in the lowest bits.

- ``axis=-1`` (per-token): x ``[..., n]`` -> codes ``[..., n*bits/8]``, scale/zero ``[..., n/group_size]``.
- ``axis=-2`` (per-channel, groups of tokens): x ``[..., t, n]`` -> codes ``[..., t, n*bits/8]``,
  scale/zero ``[..., t/group_size, n]``.
"""
from __future__ import annotations

from typing import Sequence

SUPPORTED_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def packed_shapes(x_shape: Sequence[int], bits: int, group_size: int, axis: int) -> tuple[list[int], list[int]]:
    """(codes_shape, scale_shape) for a tensor of ``x_shape``; assumes arguments were validated."""
    shape = list(x_shape)
    per = codes_per_byte(bits)
    codes = shape[:-1] + [shape[-1] // per]
    if axis == -1:
        scale = shape[:-1] + [shape[-1] // group_size]
    else:
        scale = shape[:-2] + [shape[-2] // group_size, shape[-1]]
    return codes, scale


def unpacked_shape(codes_shape: Sequence[int], bits: int) -> list[int]:
    """Shape of the dequantized tensor for packed ``codes_shape``."""
    shape = list(codes_shape)
    return shape[:-1] + [shape[-1] * codes_per_byte(bits)]
