"""``torch.ops.lrkern.lif_multistep``: a multi-step LIF neuron fused over time, forward and backward
(SpikingJelly ``LIFNode`` semantics; the maths is ``lrkern/reference/lif.py``).

Each backend gives a program (or thread) a block of neurons and loops over T inside it with the membrane in fp32
registers: the forward reads x once and writes the spikes and H once; the backward (its own registered op,
``lif_multistep_backward``, so compiled graphs trace it) reads grad_s, H and S once and writes grad_x once. What
autograd keeps: H in x's dtype plus the spikes (which the next layer usually keeps anyway); S is never recomputed
from a rounded H, where fp16 rounding could flip ``H >= v_threshold``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher, forced_backend, forced_scope

SURROGATES = {"sigmoid": 0, "atan": 1}

_fwd = Dispatcher("lif_multistep", reference="lrkern.reference.lif:lif_forward",
                  triton="lrkern.kernels.lif:lif_forward", cpp="lrkern.ops._cpp:lif_forward",
                  cuda="lrkern.kernels.cuda_lif:lif_forward")
_bwd = Dispatcher("lif_multistep_backward", reference="lrkern.reference.lif:lif_backward",
                  triton="lrkern.kernels.lif:lif_backward", cpp="lrkern.ops._cpp:lif_backward",
                  cuda="lrkern.kernels.cuda_lif:lif_backward")


def _number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}={value} must be > 0")
    return float(value)


def _check(x, v0, tau, v_threshold, v_reset, surrogate, alpha) -> None:
    _checks.tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty [T, ...] (time-major), got shape {tuple(x.shape)}")
    if v0 is not None:
        _checks.tensor("v0", v0, dtypes=(torch.float32,), min_dim=0)
        if tuple(v0.shape) != tuple(x.shape[1:]):
            raise ValueError(f"v0 must have x.shape[1:] = {tuple(x.shape[1:])} (one membrane per neuron), got "
                             f"{tuple(v0.shape)}")
        _checks.same_device(x=x, v0=v0)
    _number("tau", tau, positive=True)
    _number("v_threshold", v_threshold)
    if v_reset is not None:
        _number("v_reset", v_reset)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r} is not supported; accepted: {', '.join(SURROGATES)}")
    _number("alpha", alpha, positive=True)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(x.shape[0], -1)


@torch.library.custom_op("lrkern::lif_multistep", mutates_args=())
def lif_multistep(x: torch.Tensor, v0: Optional[torch.Tensor], tau: float, v_threshold: float,
                  v_reset: Optional[float], surrogate: str, alpha: float, detach_reset: bool, decay_input: bool,
                  store_v_seq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-step LIF over x [T, ...] (time-major): (spikes [T, ...] x.dtype, v_last [...] fp32,
    v_seq [T, ...] fp32 (empty unless store_v_seq), h [T, ...] x.dtype (the charged membrane, kept for backward)).

    v0: initial membrane (fp32, x.shape[1:]) or None (v_reset, or 0 under soft reset). v_reset None = soft reset.
    surrogate "sigmoid" | "atan" with slope alpha; detach_reset drops the reset's surrogate path; decay_input as in
    SpikingJelly. Gradients flow to x, v0 and through v_last / v_seq.

    Example:
        >>> s, v, _, _ = torch.ops.lrkern.lif_multistep(x, None, 2.0, 1.0, 0.0, "sigmoid", 4.0, False, True, False)
    """
    _check(x, v0, tau, v_threshold, v_reset, surrogate, alpha)
    xf = _flat(x)
    soft = v_reset is None
    if v0 is None:
        v0f = torch.full((xf.shape[1],), 0.0 if soft else float(v_reset), dtype=torch.float32, device=x.device)
    else:
        v0f = v0.contiguous().reshape(-1)
    s, h, v_last, v_seq = _fwd(x.device, xf, v0f, float(tau), float(v_threshold), 0.0 if soft else float(v_reset),
                               soft, bool(decay_input), bool(store_v_seq))
    v_seq = v_seq.reshape(x.shape) if store_v_seq else v_seq
    return s.reshape(x.shape), v_last.reshape(x.shape[1:]), v_seq, h.reshape(x.shape)


@lif_multistep.register_fake
def _(x, v0, tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input, store_v_seq):
    _check(x, v0, tau, v_threshold, v_reset, surrogate, alpha)
    v_seq = x.new_empty(x.shape if store_v_seq else (0,), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape[1:], dtype=torch.float32), v_seq, x.new_empty(x.shape)


@torch.library.custom_op("lrkern::lif_multistep_backward", mutates_args=())
def lif_multistep_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor,
                           h: torch.Tensor, s: torch.Tensor, tau: float, v_threshold: float, v_reset: Optional[float],
                           surrogate: str, alpha: float, detach_reset: bool,
                           decay_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [T, ...] in h's dtype, grad_v0 [...] fp32) of ``lif_multistep``, one reverse sweep over time.

    grad_v_seq: fp32 [T, ...] or an empty tensor when v_seq got no gradient.
    """
    soft = v_reset is None
    gs = grad_s.contiguous().reshape(h.shape[0], -1)
    gvs = grad_v_seq.to(torch.float32).contiguous().reshape(h.shape[0], -1) if grad_v_seq.numel() else grad_v_seq
    gx, gv0 = _bwd(h.device, gs, grad_v_last.to(torch.float32).contiguous().reshape(-1), gvs, _flat(h), _flat(s),
                   float(tau), float(v_threshold), 0.0 if soft else float(v_reset), soft, bool(decay_input),
                   bool(detach_reset), SURROGATES[surrogate], float(alpha))
    return gx.reshape(h.shape), gv0.reshape(h.shape[1:])


@lif_multistep_backward.register_fake
def _(grad_s, grad_v_last, grad_v_seq, h, s, tau, v_threshold, v_reset, surrogate, alpha, detach_reset,
      decay_input):
    return h.new_empty(h.shape), h.new_empty(h.shape[1:], dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, v0, tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input, store_v_seq = inputs
    s, _v_last, _v_seq, h = output
    ctx.mark_non_differentiable(h)  # an internal output; spikes get their gradient through the surrogate
    ctx.save_for_backward(h, s)
    ctx.conf = (tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input, v0 is not None)
    ctx.backend = forced_backend()


def _backward(ctx, grad_s, grad_v_last, grad_v_seq, _grad_h):
    h, s = ctx.saved_tensors
    tau, v_threshold, v_reset, surrogate, alpha, detach_reset, decay_input, has_v0 = ctx.conf
    if grad_s is None:
        grad_s = torch.zeros_like(h)
    if grad_v_last is None:
        grad_v_last = h.new_zeros(h.shape[1:], dtype=torch.float32)
    if grad_v_seq is None:
        grad_v_seq = h.new_empty((0,), dtype=torch.float32)
    with forced_scope(ctx.backend):
        gx, gv0 = lif_multistep_backward(grad_s, grad_v_last, grad_v_seq, h, s, tau, v_threshold, v_reset,
                                         surrogate, alpha, detach_reset, decay_input)
    return gx, (gv0 if has_v0 else None), None, None, None, None, None, None, None, None


lif_multistep.register_autograd(_backward, setup_context=_setup)
