"""``torch.ops.lrkern.stm_multistep``: the Spiking Temporal Modulator (spec ``spiking_video.md`` 3.2, lrkern
formulation) fused over time, forward and backward; the maths is ``lrkern/reference/stm.py``.

An STM is an LIF neuron (``lrkern.ops.lif``) with per-channel tau / theta0 / beta, an input gain per (clip, channel)
and a dynamic threshold theta = theta0 + beta * trace of the neuron's own spikes (trace = rho * trace + spike). Input
is time-major ``u [T, B, C, *spatial]``. Each backend gives a program (or thread) a block of neurons of one (b, c)
row and loops over T inside it with the membrane and the trace in fp32 registers: the forward reads u once and writes
the spikes and H once. The backward is its own registered op (``stm_multistep_backward``, so compiled graphs trace
it): with beta it first rebuilds the trace by a forward sweep over the saved spikes into an fp32 scratch (one extra
read of the spikes; the scratch is [T, N] fp32 on Triton and CUDA C, [T, 512] per thread on the C++ backend), then
sweeps in reverse, reading grad_s, H, S (and u) once and writing grad_u once. Backends: Triton (the CUDA default),
C++ (the CPU default), the reference, and CUDA C (``csrc/cuda/stm.cu`` through CuPy), which runs only when forced.

What autograd keeps: H in u's dtype plus the spikes (which the next layer usually keeps anyway); S is never recomputed
from a rounded H. u itself (and v0) is kept only when gain or tau needs a gradient: those two gradients need the input
(g_gain = sum U gX; dH/dtau needs x = g U and the rebuilt V[t-1]).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher, forced_backend, forced_scope
from lrkern.ops.lif import SURROGATES

_fwd = Dispatcher("stm_multistep", reference="lrkern.reference.stm:stm_forward",
                  triton="lrkern.kernels.stm:stm_forward", cpp="lrkern.ops._cpp:stm_forward",
                  cuda="lrkern.kernels.cuda_stm:stm_forward")
_bwd = Dispatcher("stm_multistep_backward", reference="lrkern.reference.stm:stm_backward",
                  triton="lrkern.kernels.stm:stm_backward", cpp="lrkern.ops._cpp:stm_backward",
                  cuda="lrkern.kernels.cuda_stm:stm_backward")

DEFAULT_RHO = math.exp(-0.25)  # a 4-step spike trace (spec 3.2)


def _number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}={value} must be > 0")
    return float(value)


def _param(name: str, p, shape: tuple, what: str) -> None:
    _checks.tensor(name, p, dtypes=(torch.float32,))
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(p.shape)}")


def _check(u, v0, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha, values: bool = True) -> None:
    """Validates the op's arguments; ``values``: also check tau > 0 elementwise (not on fake tensors)."""
    _checks.tensor("u", u, min_dim=3)
    if u.numel() == 0:
        raise ValueError(f"u must be non-empty [T, B, C, *spatial] (time-major), got shape {tuple(u.shape)}")
    b, c = u.shape[1], u.shape[2]
    _param("tau", tau, (c,), "[C]")
    _param("theta0", theta0, (c,), "[C]")
    tensors = {"u": u, "tau": tau, "theta0": theta0}
    if beta is not None:
        _param("beta", beta, (c,), "[C]")
        tensors["beta"] = beta
    if gain is not None:
        _param("gain", gain, (b, c), "[B, C]")
        tensors["gain"] = gain
    if v0 is not None:
        _checks.tensor("v0", v0, dtypes=(torch.float32,))
        if tuple(v0.shape) != tuple(u.shape[1:]):
            raise ValueError(f"v0 must have u.shape[1:] = {tuple(u.shape[1:])} (one membrane per neuron), got "
                             f"{tuple(v0.shape)}")
        tensors["v0"] = v0
    _checks.same_device(**tensors)
    rho = _number("rho", rho)
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1) (the spike trace's decay per step)")
    if v_reset is not None:
        _number("v_reset", v_reset)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r} is not supported; accepted: {', '.join(SURROGATES)}")
    _number("alpha", alpha, positive=True)
    # One host sync on CUDA (C values); skipped while a CUDA graph is being captured, where it cannot run.
    if values and not (tau.is_cuda and torch.cuda.is_current_stream_capturing()):
        bad = ~(tau > 0)  # also catches NaN
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            raise ValueError(f"tau must be > 0 in every channel; tau[{idx}] = {tau[idx].item()} (clamp or "
                             "reparametrise it in the caller: the op never clamps silently)")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[T, B, C, *spatial] as a contiguous [T, B, C, S]."""
    return x.contiguous().reshape(*x.shape[:3], -1)


def _v0(v0: Optional[torch.Tensor], u: torch.Tensor, v_reset: Optional[float]) -> torch.Tensor:
    if v0 is not None:
        return v0.contiguous().reshape(*u.shape[1:3], -1)
    fill = 0.0 if v_reset is None else float(v_reset)
    return torch.full((u.shape[1], u.shape[2], math.prod(u.shape[3:])), fill, dtype=torch.float32, device=u.device)


def _opt(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else p.contiguous()


@torch.library.custom_op("lrkern::stm_multistep", mutates_args=())
def stm_multistep(u: torch.Tensor, v0: Optional[torch.Tensor], gain: Optional[torch.Tensor], tau: torch.Tensor,
                  theta0: torch.Tensor, beta: Optional[torch.Tensor], rho: float, v_reset: Optional[float],
                  surrogate: str, alpha: float, detach_reset: bool,
                  decay_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spiking Temporal Modulator over u [T, B, C, *spatial] (time-major): (spikes [T, B, C, *spatial] u.dtype,
    v_last [B, C, *spatial] fp32, h [T, B, C, *spatial] u.dtype (the charged membrane, kept for backward)).

    Per neuron (b, c, p): x = gain[b, c] u (gain None: x = u), H = V + (x - (V - v_reset)) / tau[c] (decay_input;
    else V - (V - v_reset) / tau[c] + x), theta = theta0[c] + beta[c] A (beta None: theta0[c]), S = H >= theta,
    V = v_reset where S else H (v_reset None: soft reset, H - theta where S), A = rho A + S with A = 0 before t = 0.

    v0: initial membrane (fp32, u.shape[1:]) or None (v_reset, or 0 under soft reset). gain fp32 [B, C] or None;
    tau (> 0), theta0, beta fp32 [C]; rho in [0, 1). surrogate "sigmoid" | "atan" with slope alpha; detach_reset drops
    the reset's surrogate path (not the trace's). Gradients flow to u, v0, gain, tau, theta0, beta and through v_last.

    Example:
        >>> s, v, _ = torch.ops.lrkern.stm_multistep(u, None, gain, tau, theta0, beta, math.exp(-0.25), 0.0,
        ...                                          "sigmoid", 4.0, False, True)
    """
    _check(u, v0, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha)
    uf = _flat(u)
    soft = v_reset is None
    s, h, v_last = _fwd(u.device, uf, _v0(v0, uf, v_reset), _opt(gain), tau.contiguous(), theta0.contiguous(),
                        _opt(beta), float(rho), 0.0 if soft else float(v_reset), soft, bool(decay_input))
    return s.reshape(u.shape), v_last.reshape(u.shape[1:]), h.reshape(u.shape)


@stm_multistep.register_fake
def _(u, v0, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha, detach_reset, decay_input):
    _check(u, v0, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha, values=False)
    return u.new_empty(u.shape), u.new_empty(u.shape[1:], dtype=torch.float32), u.new_empty(u.shape)


@torch.library.custom_op("lrkern::stm_multistep_backward", mutates_args=())
def stm_multistep_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, u: Optional[torch.Tensor],
                           v0: Optional[torch.Tensor], h: torch.Tensor, s: torch.Tensor,
                           gain: Optional[torch.Tensor], tau: torch.Tensor, theta0: torch.Tensor,
                           beta: Optional[torch.Tensor], rho: float, v_reset: Optional[float], surrogate: str,
                           alpha: float, detach_reset: bool,
                           decay_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_u [T, B, C, *spatial] in h's dtype, grad_v0 [B, C, *spatial] fp32, grad_params [4, B, C] fp32) of
    ``stm_multistep``: a trace-rebuild sweep over s (with beta), then one reverse sweep over time.

    grad_params rows: the gradients of gain, tau, theta0 and beta per (b, c), summed over t and space but not over b
    (tau's, theta0's and beta's gradients are the sums over b). u = None skips the gain and tau gradients (rows 0 and
    1 are zeros; v0 is then not read); row 3 is zeros when beta is None. The math is ``lrkern/reference/stm.py``.
    """
    soft = v_reset is None
    hf = _flat(h)
    uf = None if u is None else _flat(u.to(h.dtype))
    gvl = grad_v_last.to(torch.float32).contiguous().reshape(hf.shape[1:])
    v0f = _v0(v0, hf, v_reset) if u is not None else gvl  # without u, v0 is never read: any fp32 [B, C, S]
    gu, gv0, gp = _bwd(h.device, _flat(grad_s.to(h.dtype)), gvl, uf, v0f, hf, _flat(s), _opt(gain), tau.contiguous(),
                       theta0.contiguous(), _opt(beta), float(rho), 0.0 if soft else float(v_reset), soft,
                       bool(decay_input), bool(detach_reset), SURROGATES[surrogate], float(alpha))
    return gu.reshape(h.shape), gv0.reshape(h.shape[1:]), gp


@stm_multistep_backward.register_fake
def _(grad_s, grad_v_last, u, v0, h, s, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha, detach_reset,
      decay_input):
    return (h.new_empty(h.shape), h.new_empty(h.shape[1:], dtype=torch.float32),
            h.new_empty((4, h.shape[1], h.shape[2]), dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    u, v0, gain, tau, theta0, beta, rho, v_reset, surrogate, alpha, detach_reset, decay_input = inputs
    s, _v_last, h = output
    ctx.mark_non_differentiable(h)  # an internal output; spikes get their gradient through the surrogate
    # u (and v0) only when the gain or tau gradient needs them.
    need_u = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    ctx.save_for_backward(h, s, u if need_u else None, v0 if need_u else None, gain, tau, theta0, beta)
    ctx.conf = (rho, v_reset, surrogate, alpha, detach_reset, decay_input, need_u)
    ctx.backend = forced_backend()


def _backward(ctx, grad_s, grad_v_last, _grad_h):
    h, s, u, v0, gain, tau, theta0, beta = ctx.saved_tensors
    rho, v_reset, surrogate, alpha, detach_reset, decay_input, need_u = ctx.conf
    if grad_s is None:
        grad_s = torch.zeros_like(h)
    if grad_v_last is None:
        grad_v_last = h.new_zeros(h.shape[1:], dtype=torch.float32)
    with forced_scope(ctx.backend):
        gu, gv0, gp = stm_multistep_backward(grad_s, grad_v_last, u if need_u else None, v0, h, s, gain, tau,
                                             theta0, beta, rho, v_reset, surrogate, alpha, detach_reset, decay_input)
    need = ctx.needs_input_grad
    return (gu if need[0] else None, gv0 if need[1] else None, gp[0] if need[2] else None,
            gp[1].sum(0) if need[3] else None, gp[2].sum(0) if need[4] else None,
            gp[3].sum(0) if need[5] else None, None, None, None, None, None, None)


stm_multistep.register_autograd(_backward, setup_context=_setup)
