"""Reference Spiking Temporal Modulator (spec ``spiking_video.md`` 3.2, **lrkern formulation**): the executable
specification of ``torch.ops.lrkern.stm_multistep``'s forward and backward implementations.

An STM is an LIF neuron (``lrkern/reference/lif.py``, SpikingJelly ``LIFNode`` semantics) with per-channel parameters,
a per-(clip, channel) input gain and a dynamic threshold driven by a trace of the neuron's own spikes. Per neuron
(b, c, p), in fp32 and in exactly this order (the kernels follow it operation by operation, so fp32 spikes, h and
v_last are bit-identical; tau divides, it is never replaced by a reciprocal):

    x     = g[b, c] * U[t]                                   (no multiply when gain is None)
    H     = V + (x - (V - vr)) / tau_c                       (decay_input; else H = V - (V - vr) / tau_c + x)
    theta = theta0_c + beta_c * A                            (A: the trace before this step, 0 at t = 0;
                                                              beta None: theta = theta0_c and no trace)
    S     = H >= theta                                       (non-strict)
    V     = hard: v_reset where S else H                     soft: H - theta where S else H
    A     = rho * A + S

vr = v_reset under a hard reset, 0 under a soft one. With beta = 0 and no gain this is exactly the LIF neuron.

Backward, in reverse t, with psi = surrogate(H - theta) (SpikingJelly's, see ``lrkern.reference.lif.surrogate``).
gV is dL/dV after step t (starts as grad_v_last), gA is dL/dA after step t (starts 0). Derivation: theta enters
through S (dS/dtheta = -psi) and, under a soft reset, directly through V = H - theta S; the reset's dependence on S
is the "reset path" that detach_reset cuts (the trace keeps its gradient to S: it is not the reset).

    gS    = grad_s[t] + gA                                   (beta None: gS = grad_s[t])
    q     = hard: (v_reset - H) psi     soft: -(theta psi)   (dV/dS times psi: the reset path; 0 with detach_reset)
    dV/dH = hard: (1 - S) + q           soft: 1 + q
    gH    = gS psi + gV dV/dH
    gtheta = -(gS psi + gV q) - [soft] gV S                  (= -(gH - gV (1 - S)) in all four reset cases)
    gA    <- rho gA + beta gtheta
    gX    = gH / tau (decay_input) or gH;    grad_u[t] = g gX;    gV <- gH (1 - 1 / tau)

grad_v0 = the final gV. Parameter gradients are sums over t and space per (b, c):

    gain:   sum U[t] gX
    tau:    sum gH dH/dtau,  dH/dtau = -(x - (V[t-1] - vr)) / tau^2 (decay_input) or (V[t-1] - vr) / tau^2
    theta0: sum gtheta
    beta:   sum gtheta A[t-1]

V[t-1] is rebuilt from the stored H[t-1] and S[t-1] and theta[t-1] (v0 at t = 0); it is exact in fp32 and as
accurate as the stored H in fp16 / bf16. The backward needs the trace before each step in reverse order, so it first
rebuilds it by a forward sweep over the saved spikes into an fp32 scratch [T, N] (only when beta is given), in the
forward's fp32 order, so theta is bit-identical to the forward's. Summation order: per neuron over t in fp32, then
over space in float64, then tau's sum is scaled by -+1 / tau^2 in float64.

Implementation contract (every backend). Shapes are flattened to [T, B, C, S] (S = the product of the spatial dims):
u, s, h, grad_s, grad_u are contiguous [T, B, C, S] in u's dtype; v0, v_last, grad_v_last, grad_v0 are fp32
[B, C, S]; gain is fp32 [B, C] or None; tau, theta0 and beta (or None) are fp32 [C]. The backward returns
(grad_u, grad_v0, grad_params) where grad_params is fp32 [4, B, C]: the per-(b, c) gradients of gain, tau, theta0 and
beta (not yet summed over b). When the backward gets u = None it computes neither the gain nor the tau gradient (rows
0 and 1 are zeros; it then skips the V[t-1] rebuild and never needs v0); row 3 is zeros when beta is None.
"""
from __future__ import annotations

import torch

from lrkern.reference.lif import ATAN, SIGMOID, surrogate

__all__ = ["SIGMOID", "ATAN", "stm_forward", "stm_backward", "trace_before"]


def _rows(p: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] tensor as [1, C, 1], broadcasting over [B, C, S]."""
    return p.to(torch.float32).view(1, -1, 1)


def _threshold(theta0: torch.Tensor, beta: torch.Tensor | None, a: torch.Tensor | None, like: torch.Tensor):
    if beta is None:
        return _rows(theta0).expand_as(like)
    return _rows(theta0) + _rows(beta) * a


def trace_before(s: torch.Tensor, rho: float) -> torch.Tensor:
    """fp32 [T, B, C, S]: the spike trace before each step (A[t-1], 0 at t = 0), in the forward's fp32 order."""
    out = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    a = torch.zeros(s.shape[1:], dtype=torch.float32, device=s.device)
    for t in range(s.shape[0]):
        out[t] = a
        a = rho * a + s[t].to(torch.float32)
    return out


def stm_forward(u: torch.Tensor, v0: torch.Tensor, gain: torch.Tensor | None, tau: torch.Tensor,
                theta0: torch.Tensor, beta: torch.Tensor | None, rho: float, v_reset: float, soft_reset: bool,
                decay_input: bool):
    """-> (s [T, B, C, S] u.dtype, h [T, B, C, S] u.dtype, v_last [B, C, S] fp32)."""
    vr = 0.0 if soft_reset else v_reset
    tau_c = _rows(tau)  # a tensor on u's device: a true IEEE division on every device (see lif._divisor)
    g = None if gain is None else gain.to(torch.float32).unsqueeze(-1)
    v = v0.to(torch.float32).clone()
    a = torch.zeros_like(v) if beta is not None else None
    s_out = torch.empty_like(u)
    h_out = torch.empty_like(u)
    for t in range(u.shape[0]):
        x = u[t].to(torch.float32)
        if g is not None:
            x = g * x
        h = v + (x - (v - vr)) / tau_c if decay_input else v - (v - vr) / tau_c + x
        theta = _threshold(theta0, beta, a, h)
        spike = h >= theta
        if soft_reset:
            v = torch.where(spike, h - theta, h)
        else:
            v = torch.where(spike, torch.full_like(h, v_reset), h)
        if a is not None:
            a = rho * a + spike.to(torch.float32)
        s_out[t] = spike.to(u.dtype)
        h_out[t] = h.to(u.dtype)
    return s_out, h_out, v


def stm_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, u: torch.Tensor | None, v0: torch.Tensor,
                 h: torch.Tensor, s: torch.Tensor, gain: torch.Tensor | None, tau: torch.Tensor,
                 theta0: torch.Tensor, beta: torch.Tensor | None, rho: float, v_reset: float, soft_reset: bool,
                 decay_input: bool, detach_reset: bool, surrogate_kind: int, alpha: float):
    """-> (grad_u [T, B, C, S] in h's dtype, grad_v0 [B, C, S] fp32, grad_params [4, B, C] fp32: gain, tau, theta0,
    beta per (b, c); rows 0 and 1 are zeros when u is None, row 3 when beta is None)."""
    T, B, C, _ = h.shape
    vr = 0.0 if soft_reset else v_reset
    tau_c = _rows(tau)
    k = 1.0 - 1.0 / tau_c  # dH/dV[t-1], the same for both charge forms
    g = None if gain is None else gain.to(torch.float32).unsqueeze(-1)
    params = u is not None
    a_hist = trace_before(s, rho) if beta is not None else None
    gv = grad_v_last.to(torch.float32).clone()
    ga = torch.zeros_like(gv) if beta is not None else None
    acc = torch.zeros((4, *gv.shape), dtype=torch.float32, device=gv.device)  # per-neuron sums over t
    grad_u = torch.empty_like(h)
    for t in range(T - 1, -1, -1):
        ht = h[t].to(torch.float32)
        st = s[t].to(torch.float32)
        theta = _threshold(theta0, beta, None if a_hist is None else a_hist[t], ht)
        psi = surrogate(ht - theta, surrogate_kind, alpha)
        gs = grad_s[t].to(torch.float32)
        if ga is not None:
            gs = gs + ga
        gsp = gs * psi
        if detach_reset:
            q = torch.zeros_like(ht)
        else:
            q = (v_reset - ht) * psi if not soft_reset else -(theta * psi)
        dvdh = 1.0 + q if soft_reset else (1.0 - st) + q
        gh = gsp + gv * dvdh
        gth = -(gsp + gv * q)
        if soft_reset:
            gth = gth - gv * st
        gx = gh / tau_c if decay_input else gh
        grad_u[t] = (gx if g is None else g * gx).to(h.dtype)
        acc[2] += gth
        if ga is not None:
            acc[3] += gth * a_hist[t]
            ga = rho * ga + _rows(beta) * gth
        if params:
            ut = u[t].to(torch.float32)
            x = ut if g is None else g * ut
            if t == 0:
                vp = v0.to(torch.float32)
            else:
                hp = h[t - 1].to(torch.float32)
                thp = _threshold(theta0, beta, None if a_hist is None else a_hist[t - 1], hp)
                fired = s[t - 1] != 0
                if soft_reset:
                    vp = torch.where(fired, hp - thp, hp)
                else:
                    vp = torch.where(fired, torch.full_like(hp, v_reset), hp)
            acc[0] += ut * gx
            acc[1] += gh * (x - (vp - vr) if decay_input else vp - vr)
        gv = gh * k
    sums = acc.sum(-1, dtype=torch.float64)  # [4, B, C]
    tau64 = tau.to(torch.float64).view(1, C)
    sums[1] = sums[1] / (tau64 * tau64) * (-1.0 if decay_input else 1.0)
    if not params:
        sums[0:2] = 0.0
    return grad_u, gv, sums.to(torch.float32)
