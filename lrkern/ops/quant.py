"""``torch.ops.lrkern.quant_pack`` / ``torch.ops.lrkern.dequant``: asymmetric min-max group quantization.

The exact arithmetic (which every backend reproduces bit for bit in the codes) is in ``lrkern.reference.quant``.
"""
from __future__ import annotations

import torch

from lrkern.layout import SUPPORTED_BITS, codes_per_byte, packed_shapes, unpacked_shape
from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher
from lrkern.reference.quant import grouped

_quant_impl = Dispatcher(
    "quant_pack",
    reference="lrkern.reference.quant:quant_pack",
    triton="lrkern.kernels.quant:quant_pack",
    cpp="lrkern.ops._cpp:quant_pack",
)
_dequant_impl = Dispatcher(
    "dequant",
    reference="lrkern.reference.quant:dequant",
    triton="lrkern.kernels.quant:dequant",
    cpp="lrkern.ops._cpp:dequant",
)


def _normalise_axis(axis: int, ndim: int) -> int | None:
    """-1 or -2 for the accepted spellings of the last / second-to-last dim, None for anything else."""
    if axis in (-1, ndim - 1):
        return -1
    if ndim >= 2 and axis in (-2, ndim - 2):
        return -2
    return None


def _check_layout(shape, bits: int, group_size: int, axis: int, what: str) -> int:
    """Validates bits/group_size/axis against an (unpacked) ``shape``; returns axis normalised to -1 or -2."""
    _checks.integer("bits", bits, accepted=SUPPORTED_BITS)
    _checks.integer("group_size", group_size, minimum=1)
    _checks.integer("axis", axis)
    normalised = _normalise_axis(axis, len(shape))
    if normalised is None:
        raise ValueError(f"axis={axis} is not supported for {what} of shape {tuple(shape)}; accepted: -1 (groups along "
                         "the last dim) or -2 (groups of rows along the second-to-last dim, needs >= 2 dims)")
    axis = normalised
    per = codes_per_byte(bits)
    extent = shape[axis]
    if extent % group_size:
        raise ValueError(f"group_size={group_size} does not divide {what}.shape[{axis}]={extent}")
    if axis == -1 and group_size % per:
        raise ValueError(f"group_size={group_size} must be a multiple of {per} (codes per byte at bits={bits}) for "
                         "axis=-1, so that each group packs into whole bytes")
    if axis == -2 and shape[-1] % per:
        raise ValueError(f"{what}.shape[-1]={shape[-1]} must be a multiple of {per} (codes per byte at bits={bits})")
    return axis


@torch.library.custom_op("lrkern::quant_pack", mutates_args=())
def quant_pack(x: torch.Tensor, bits: int, group_size: int,
               axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization in groups, codes packed into uint8 along the last dim.

    ``group_size`` consecutive elements along ``axis`` share ``scale = (max - min) / (2^bits - 1)`` and
    ``zero = min``; ``code = clamp(rint((x - zero) / scale), 0, 2^bits - 1)`` (half to even).

    x: fp32/fp16/bf16. bits: 2, 4 or 8. axis=-1: x [..., n] -> codes [..., n*bits/8] uint8, scale/zero
    [..., n/group_size]. axis=-2: x [..., t, n] -> codes [..., t, n*bits/8], scale/zero [..., t/group_size, n].
    scale/zero have x's dtype. Returns (codes, scale, zero).

    Example:
        >>> codes, scale, zero = lrkern.quant_pack(torch.randn(2, 256), bits=2, group_size=128, axis=-1)
        >>> codes.shape, scale.shape
        (torch.Size([2, 64]), torch.Size([2, 2]))
    """
    _checks.tensor("x", x)
    axis = _check_layout(x.shape, bits, group_size, axis, "x")
    if x.numel() == 0:
        codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
        return (x.new_empty(codes_shape, dtype=torch.uint8), x.new_empty(scale_shape), x.new_empty(scale_shape))
    return _quant_impl(x.device, x.contiguous(), bits, group_size, axis)


@quant_pack.register_fake
def _(x, bits, group_size, axis):
    _checks.tensor("x", x)
    axis = _check_layout(x.shape, bits, group_size, axis, "x")
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    return x.new_empty(codes_shape, dtype=torch.uint8), x.new_empty(scale_shape), x.new_empty(scale_shape)


def _check_dequant(codes, scale, zero, bits, group_size, axis) -> int:
    _checks.tensor("codes", codes, dtypes=(torch.uint8,))
    _checks.tensor("scale", scale)
    _checks.tensor("zero", zero)
    _checks.same_device(codes=codes, scale=scale, zero=zero)
    if zero.dtype != scale.dtype:
        raise TypeError(f"zero has dtype {zero.dtype} but scale has {scale.dtype}; they must match")
    _checks.integer("bits", bits, accepted=SUPPORTED_BITS)
    shape = unpacked_shape(codes.shape, bits)
    axis = _check_layout(shape, bits, group_size, axis, "the unpacked codes")
    _, scale_shape = packed_shapes(shape, bits, group_size, axis)
    for name, t in (("scale", scale), ("zero", zero)):
        if list(t.shape) != scale_shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but codes {tuple(codes.shape)} with bits={bits}, "
                             f"group_size={group_size}, axis={axis} need {tuple(scale_shape)}")
    return axis


@torch.library.custom_op("lrkern::dequant", mutates_args=())
def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
            axis: int) -> torch.Tensor:
    """Inverse of ``quant_pack``: ``x_hat = code * scale + zero`` (fp32 inside), in scale's dtype.

    codes: uint8 [..., nb] packed as by ``quant_pack``; scale, zero: the shapes ``quant_pack`` returns for the
    unpacked shape [..., nb*8/bits]. Returns a tensor of the unpacked shape.

    Example:
        >>> x_hat = lrkern.dequant(*lrkern.quant_pack(x, 4, 64, -1), bits=4, group_size=64, axis=-1)
    """
    axis = _check_dequant(codes, scale, zero, bits, group_size, axis)
    if codes.numel() == 0:
        return scale.new_empty(unpacked_shape(codes.shape, bits))
    return _dequant_impl(codes.device, codes.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size,
                         axis)


@dequant.register_fake
def _(codes, scale, zero, bits, group_size, axis):
    _check_dequant(codes, scale, zero, bits, group_size, axis)
    return scale.new_empty(unpacked_shape(codes.shape, bits))


def _dequant_setup(ctx, inputs, output):
    codes, scale, zero, bits, group_size, axis = inputs
    ctx.save_for_backward(codes)
    ctx.layout = (bits, group_size, _normalise_axis(axis, codes.dim()))
    ctx.scale_dtype = scale.dtype


def _dequant_backward(ctx, grad):
    # d x_hat / d scale = code and d x_hat / d zero = 1, summed over each group. The float codes are dequant with
    # scale 1 and zero 0, so the backward reuses the forward kernel instead of a second unpack path.
    (codes,) = ctx.saved_tensors
    bits, group_size, axis = ctx.layout
    _, scale_shape = packed_shapes(unpacked_shape(codes.shape, bits), bits, group_size, axis)
    ones = torch.ones(scale_shape, dtype=torch.float32, device=codes.device)
    q = dequant(codes, ones, torch.zeros_like(ones), bits, group_size, axis)
    g = grad.to(torch.float32)

    def group_sum(t: torch.Tensor) -> torch.Tensor:
        view, dim = grouped(t, group_size, axis)
        return view.sum(dim)

    grad_scale = group_sum(g * q).to(ctx.scale_dtype)
    grad_zero = group_sum(g).to(ctx.scale_dtype)
    return None, grad_scale, grad_zero, None, None, None


dequant.register_autograd(_dequant_backward, setup_context=_dequant_setup)
