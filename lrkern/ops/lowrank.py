"""Low-rank activation projection ops: ``torch.ops.lrkern.{mode_gram_accumulate, lance_project, lance_linear_wgrad,
lance_conv2d_wgrad, lance_linear, lance_conv2d}``.

They are general HOSVD building blocks (LANCE, SVD-structured local learning, CURE/ICE and SlimDiff calibration
share them). A *factor list* has one entry per mode of the activation, mode 0 being the batch: ``factors[k]`` is an
fp32 ``[n_k, r_k]`` matrix with orthonormal columns, or None to keep mode k as it is. The *core* of x is
``G = x x_0 U_0^T x_1 U_1^T ...`` (fp32); ``X~ = G x_0 U_0 x_1 U_1 ...`` is what the core stands for.

``lance_linear`` / ``lance_conv2d`` are the layers: the forward output and the input gradient are exact, while
autograd keeps only the core (prod r_k floats instead of prod n_k) and rebuilds the weight gradient from it and the
output gradient without ever reconstructing X~.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher
from lrkern.ops._lowrank_impl import mode_mm

_I = "lrkern.ops._lowrank_impl"
_gram = Dispatcher("mode_gram_accumulate", reference="lrkern.reference.lowrank:mode_gram_accumulate",
                   triton=f"{_I}:gram_triton", cpp=f"{_I}:gram_aten")
_project = Dispatcher("lance_project", reference="lrkern.reference.lowrank:lance_project",
                      triton=f"{_I}:project_triton", cpp=f"{_I}:project_aten")


# ---------------------------------------------------------------------------------------------------- validation
def _check_activation(name: str, x: torch.Tensor, dims: Sequence[int]) -> None:
    _checks.tensor(name, x)
    if x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


def _check_factors(factors, shape: Sequence[int], name: str = "factors", of: str = "x") -> None:
    if not isinstance(factors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors or None, got {type(factors).__name__}")
    if len(factors) != len(shape):
        raise ValueError(f"{name} has {len(factors)} entries but {of} has {len(shape)} modes (shape {tuple(shape)}); "
                         "give one factor (or None) per mode, mode 0 being the batch")
    for k, u in enumerate(factors):
        if u is None:
            continue
        _checks.tensor(f"{name}[{k}]", u, dtypes=(torch.float32,), min_dim=2)
        if u.dim() != 2 or u.shape[0] != shape[k] or not 1 <= u.shape[1] <= u.shape[0]:
            raise ValueError(f"{name}[{k}] must be [n, r] with n = {of}.shape[{k}] = {shape[k]} and 1 <= r <= n, "
                             f"got shape {tuple(u.shape)}")


def core_shape(shape: Sequence[int], factors) -> list[int]:
    """The core's shape for an activation of ``shape``."""
    return [n if u is None else u.shape[1] for n, u in zip(shape, factors)]


def _same_device(x: torch.Tensor, factors, **others) -> None:
    tensors = {"x": x, **{f"factors[{k}]": u for k, u in enumerate(factors) if u is not None},
               **{k: v for k, v in others.items() if v is not None}}
    _checks.same_device(**tensors)


def _contig(factors):
    return [None if u is None else u.contiguous() for u in factors]


# ---------------------------------------------------------------------------------------------- Gram accumulation
@torch.library.custom_op("lrkern::mode_gram_accumulate", mutates_args=("out",))
def mode_gram_accumulate(x: torch.Tensor, out: torch.Tensor, dim: int, alpha: float) -> None:
    """out += alpha * X_(dim) @ X_(dim)^T, the mode-``dim`` Gram (fp32 accumulation).

    x: [N, F], [N, L, F] or [N, C, H, W] (fp32/fp16/bf16); out: fp32 contiguous [n, n], n = x.shape[dim].
    Summing it over calibration batches with alpha = 1/batches gives the mode covariance C_n of HOSVD.

    Example:
        >>> c = torch.zeros(64, 64); lrkern.mode_gram_accumulate(x, c, 1, 1.0)  # x: [B, 64, H, W]
    """
    _check_gram(x, out, dim, alpha)
    _gram(x.device, x, out, dim, float(alpha))


def _check_gram(x, out, dim, alpha) -> None:
    _check_activation("x", x, (2, 3, 4))
    _checks.integer("dim", dim)
    if not 0 <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}; accepted: 0..{x.dim() - 1}")
    _checks.tensor("out", out, dtypes=(torch.float32,), min_dim=2)
    n = x.shape[dim]
    if tuple(out.shape) != (n, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 [{n}, {n}] tensor (x.shape[{dim}] = {n}), "
                         f"got shape {tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    _checks.same_device(x=x, out=out)


@mode_gram_accumulate.register_fake
def _(x, out, dim, alpha) -> None:
    _check_gram(x, out, dim, alpha)


# ---------------------------------------------------------------------------------------------------- projection
@torch.library.custom_op("lrkern::lance_project", mutates_args=())
def lance_project(x: torch.Tensor, factors: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """The HOSVD core G = x x_0 U_0^T x_1 U_1^T ... over the modes whose factor is given, in fp32.

    x: [N, F], [N, L, F] or [N, C, H, W] (fp32/fp16/bf16); factors: one fp32 [n_k, r_k] (or None) per mode.
    Returns fp32 [r_0 | N, r_1 | n_1, ...]. On CUDA the per-sample contraction is one Triton pass over x.

    Example:
        >>> g = lrkern.lance_project(x, [None, u_c, u_h, u_w])  # x: [B, C, H, W] -> g: [B, r_C, r_H, r_W]
    """
    _check_activation("x", x, (2, 3, 4))
    _check_factors(factors, x.shape)
    _same_device(x, factors)
    return _project(x.device, x, _contig(factors))


@lance_project.register_fake
def _(x, factors):
    _check_activation("x", x, (2, 3, 4))
    _check_factors(factors, x.shape)
    return x.new_empty(core_shape(x.shape, factors), dtype=torch.float32)


def project(x: torch.Tensor, factors) -> torch.Tensor:
    """``lance_project`` without validation or torch.library's dispatch, for callers inside this module whose
    arguments were already checked (it is called inside other ops' implementations and backward)."""
    return _project(x.device, x, _contig(factors))


# ------------------------------------------------------------------------------------------ weight-gradient rebuild
def _linear_wgrad(core, factors, grad_out) -> torch.Tensor:
    """dW = sum_{b,l} dY[b,l,:]^T X~[b,l,:] = (dY x_B U_B^T x_L U_L^T)_(F)^T G_(F) U_F^T: projecting dY onto the
    batch/token factors turns the sum over B*L rows into one over r_B*r_L rows."""
    o = grad_out.shape[-1]
    dyp = project(grad_out, list(factors[:-1]) + [None])
    dw = dyp.reshape(-1, o).T @ core.reshape(-1, core.shape[-1])
    u_f = factors[-1]
    return dw @ u_f.T if u_f is not None else dw


def _conv2d_wgrad(core, factors, grad_out, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """The weight gradient is linear in the batch and channel axes of the input, so it is computed on the reduced
    tensors: dY' = dY x_B U_B^T, X' = G x_H U_H x_W U_W ([r_B, r_C, H, W]), dW' = conv_weight_grad(X', dY')
    ([O, r_C, kh, kw]), then dW = dW' x_1 U_C. Weight-gradient FLOPs shrink by (B C) / (r_B r_C)."""
    dyp = project(grad_out, [factors[0], None, None, None])
    xp = core
    for k in (2, 3):
        if factors[k] is not None:
            xp = mode_mm(xp.contiguous(), k, factors[k].T.contiguous())
    o, _, kh, kw = weight_shape
    dwp = torch.nn.grad.conv2d_weight(xp.contiguous(), (o, xp.shape[1], kh, kw), dyp, stride, padding, dilation)
    u_c = factors[1]
    return torch.einsum("oikl,ci->ockl", dwp, u_c).contiguous() if u_c is not None else dwp


_linear_wgrad_impl = Dispatcher("lance_linear_wgrad", reference="lrkern.reference.lowrank:lance_linear_wgrad",
                                triton=f"{__name__}:_linear_wgrad", cpp=f"{__name__}:_linear_wgrad")
_conv2d_wgrad_impl = Dispatcher("lance_conv2d_wgrad", reference="lrkern.reference.lowrank:lance_conv2d_wgrad",
                                triton=f"{__name__}:_conv2d_wgrad", cpp=f"{__name__}:_conv2d_wgrad")


def _check_grad_out(grad_out, dims, leading: Sequence[int]) -> None:
    _check_activation("grad_out", grad_out, dims)
    if tuple(grad_out.shape[:len(leading)]) != tuple(leading):
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}; its leading dims must match the activation's "
                         f"{tuple(leading)}")


def _activation_shape(core, factors) -> list[int]:
    return [c if u is None else u.shape[0] for c, u in zip(core.shape, factors)]


def _check_core(core, factors, dims) -> list[int]:
    _check_activation("core", core, dims)
    if core.dtype != torch.float32:
        raise TypeError(f"core has dtype {core.dtype}; accepted: float32 (lance_project's output)")
    shape = _activation_shape(core, factors) if isinstance(factors, (list, tuple)) and len(factors) == core.dim() \
        else core.shape
    _check_factors(factors, shape, of="the activation")
    if list(core.shape) != core_shape(shape, factors):
        raise ValueError(f"core has shape {tuple(core.shape)} but the factors give {core_shape(shape, factors)}")
    return shape


@torch.library.custom_op("lrkern::lance_linear_wgrad", mutates_args=())
def lance_linear_wgrad(core: torch.Tensor, factors: list[Optional[torch.Tensor]],
                       grad_out: torch.Tensor) -> torch.Tensor:
    """dW = dY_(F)^T X~_(F) of a Linear layer whose input X ([N, F] or [N, L, F]) is represented by its core.

    core: fp32, ``lance_project(x, factors)``; grad_out: [N, O] or [N, L, O]. Returns fp32 [O, F]. X~ is never
    built: the cost is ~2 r_B r_L O r_F + 2 O r_F F instead of 2 N L O F.
    """
    shape = _check_core(core, factors, (2, 3))
    _check_grad_out(grad_out, (core.dim(),), shape[:-1])
    _same_device(core, factors, grad_out=grad_out)
    return _linear_wgrad_impl(core.device, core.contiguous(), _contig(factors), grad_out.contiguous())


@lance_linear_wgrad.register_fake
def _(core, factors, grad_out):
    shape = _check_core(core, factors, (2, 3))
    return core.new_empty((grad_out.shape[-1], shape[-1]))


@torch.library.custom_op("lrkern::lance_conv2d_wgrad", mutates_args=())
def lance_conv2d_wgrad(core: torch.Tensor, factors: list[Optional[torch.Tensor]], grad_out: torch.Tensor,
                       weight_shape: list[int], stride: list[int], padding: list[int],
                       dilation: list[int]) -> torch.Tensor:
    """dW of ``F.conv2d(X~, W, stride, padding, dilation)`` (groups = 1), X~ [N, C, H, W] given by its core.

    core: fp32 ``lance_project(x, factors)``; grad_out: [N, O, H', W']; weight_shape: [O, C, kh, kw]. Returns fp32
    ``weight_shape``. The convolution weight-gradient runs on [r_B, r_C, H, W] instead of [N, C, H, W].
    """
    shape = _check_core(core, factors, (4,))
    _check_conv_grad(grad_out, shape, weight_shape)
    _same_device(core, factors, grad_out=grad_out)
    return _conv2d_wgrad_impl(core.device, core.contiguous(), _contig(factors), grad_out.contiguous(),
                              list(weight_shape), list(stride), list(padding), list(dilation))


def _check_conv_grad(grad_out, shape, weight_shape) -> None:
    _check_grad_out(grad_out, (4,), shape[:1])
    if len(weight_shape) != 4 or weight_shape[1] != shape[1] or weight_shape[0] != grad_out.shape[1]:
        raise ValueError(f"weight_shape={list(weight_shape)} must be [O, C, kh, kw] with C = {shape[1]} (the "
                         f"activation's channels) and O = {grad_out.shape[1]} (grad_out's channels)")


@lance_conv2d_wgrad.register_fake
def _(core, factors, grad_out, weight_shape, stride, padding, dilation):
    shape = _check_core(core, factors, (4,))
    _check_conv_grad(grad_out, shape, weight_shape)
    return core.new_empty(tuple(weight_shape))
