"""``torch.ops.lrkern.lance_linear`` and ``lance_conv2d``: Linear / Conv2d whose backward keeps only the HOSVD core.

Forward output and input gradient are exact (they need W, not X). The weight gradient is that of the input's
low-rank reconstruction X~, rebuilt by ``lance_linear_wgrad`` / ``lance_conv2d_wgrad`` from the core and the output
gradient. What autograd saves: the core (fp32, prod r_k) plus references to W and the factors, which live for the
whole run anyway. Each op returns ``(y, core)``; the core is returned (non-differentiable) so that the saved tensor
is an output of the op, and callers drop it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lrkern.ops import _checks
from lrkern.ops.lowrank import (_check_activation, _check_factors, _contig, _same_device, core_shape,
                                lance_conv2d_wgrad, lance_linear_wgrad, project)


def _check_weight(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dims: int) -> None:
    _checks.tensor("weight", weight)
    if weight.dim() != dims:
        raise ValueError(f"weight must have {dims} dims, got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match (no silent casts)")
    if bias is not None:
        _checks.tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {x.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")


def _pair(name: str, v) -> list[int]:
    v = list(v)
    if len(v) != 2 or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be two ints, got {v!r}")
    return v


def _no_grads(factors):
    # The factor list gets no gradient. torch.library wants the input's pytree structure back, and it flattens a
    # list of tensors into leaves but keeps a list holding any None as one leaf.
    return [None] * len(factors) if all(u is not None for u in factors) else None


# ------------------------------------------------------------------------------------------------------- Linear
def _check_linear(x, weight, bias, factors) -> None:
    _check_activation("x", x, (2, 3))
    _check_weight(x, weight, bias, 2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but x has {x.shape[-1]} features (x.shape[-1])")
    _check_factors(factors, x.shape)
    _same_device(x, factors, weight=weight, bias=bias)


@torch.library.custom_op("lrkern::lance_linear", mutates_args=())
def lance_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 factors: list[Optional[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, core): y = F.linear(x, weight, bias) exactly, core = lance_project(x, factors).

    x: [N, F] or [N, L, F]; weight: [O, F] and bias [O] of x's dtype; factors: one fp32 [n_k, r_k] or None per mode
    of x. Backward: dx exact, dW = ``lance_linear_wgrad(core, factors, dy)``, db exact.

    Example:
        >>> y, _ = lrkern.ops.lance_linear(x, lin.weight, lin.bias, [None, u_l, u_f])
    """
    _check_linear(x, weight, bias, factors)
    return F.linear(x, weight, bias), project(x, _contig(factors))


@lance_linear.register_fake
def _(x, weight, bias, factors):
    _check_linear(x, weight, bias, factors)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty(core_shape(x.shape, factors), dtype=torch.float32)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, factors = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], weight, *factors)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_y: torch.Tensor, _grad_core):
    core, weight, *factors = ctx.saved_tensors
    grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
    grad_w = lance_linear_wgrad(core, factors, grad_y).to(weight.dtype) \
        if ctx.needs_input_grad[1] else None
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, _no_grads(factors)


lance_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------------- Conv2d
def im2col_shape(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    """[N, L, C*kh*kw]: the patch matrix of the convolution, L output positions per sample."""
    n, c, h, w = x_shape
    _, _, kh, kw = weight_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, ho * wo, c * kh * kw]


def _check_conv(x, weight, bias, factors, stride, padding, dilation, im2col) -> list[int]:
    _check_activation("x", x, (4,))
    _check_weight(x, weight, bias, 4)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but x has {x.shape[1]} channels: only groups=1 "
                         "convolutions can be compressed (grouped/depthwise weight gradients are per group)")
    stride, padding, dilation = (_pair(n, v) for n, v in (("stride", stride), ("padding", padding),
                                                            ("dilation", dilation)))
    shape = im2col_shape(x.shape, weight.shape, stride, padding, dilation) if im2col else list(x.shape)
    _check_factors(factors, shape, of="the im2col patches [N, L, C*kh*kw]" if im2col else "x")
    _same_device(x, factors, weight=weight, bias=bias)
    return shape


def _patches(x, weight_shape, stride, padding, dilation) -> torch.Tensor:
    return F.unfold(x, tuple(weight_shape[2:]), dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


@torch.library.custom_op("lrkern::lance_conv2d", mutates_args=())
def lance_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 factors: list[Optional[torch.Tensor]], stride: list[int], padding: list[int], dilation: list[int],
                 im2col: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, core): y = F.conv2d(x, weight, bias, stride, padding, dilation) exactly (groups = 1) and the core.

    im2col=False: factors act on the 4 modes of x [N, C, H, W] (HOSVD of the activation, the fine-tuning setting).
    im2col=True: factors act on the 3 modes of the patch matrix [N, L, C*kh*kw] (the continual-learning setting:
    weight updates then have rows in span(U_F) of the C*kh*kw patch space). Backward: dx exact, dW from the core.
    """
    _check_conv(x, weight, bias, factors, stride, padding, dilation, im2col)
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))
    src = _patches(x, weight.shape, stride, padding, dilation) if im2col else x
    return y, project(src, _contig(factors))


@lance_conv2d.register_fake
def _(x, weight, bias, factors, stride, padding, dilation, im2col):
    shape = _check_conv(x, weight, bias, factors, stride, padding, dilation, im2col)
    _, _, kh, kw = weight.shape
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = x.new_empty((x.shape[0], weight.shape[0], ho, wo))
    return y, x.new_empty(core_shape(shape, factors), dtype=torch.float32)


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, factors, stride, padding, dilation, im2col = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], weight, *factors)
    ctx.conf = (list(x.shape), list(stride), list(padding), list(dilation), im2col, bias is not None)


# Backward calls the registered wgrad ops (not their implementations) so torch.compile can trace it.
def _conv_backward(ctx, grad_y: torch.Tensor, _grad_core):
    core, weight, *factors = ctx.saved_tensors
    x_shape, stride, padding, dilation, im2col, has_bias = ctx.conf
    grad_y = grad_y.contiguous()
    grad_x = torch.nn.grad.conv2d_input(x_shape, weight, grad_y, stride, padding, dilation) \
        if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        if im2col:  # conv = Linear on the patch matrix: dW_(O, Ckk) from the [N, L, O] output gradient
            dy = grad_y.reshape(grad_y.shape[0], grad_y.shape[1], -1).transpose(1, 2).contiguous()
            grad_w = lance_linear_wgrad(core, factors, dy).reshape(weight.shape)
        else:
            grad_w = lance_conv2d_wgrad(core, factors, grad_y, list(weight.shape), stride, padding, dilation)
        grad_w = grad_w.to(weight.dtype)
    grad_b = grad_y.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, _no_grads(factors), None, None, None, None


lance_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)
