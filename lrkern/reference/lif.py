"""Reference multi-step LIF neuron (SpikingJelly ``LIFNode`` semantics, spec ``spiking_video.md`` 3.1): the
executable specification of ``torch.ops.lrkern.lif_multistep``'s forward and backward implementations.

Per neuron, in fp32 and in exactly this order (the kernels follow it operation by operation, so fp32 spikes are
bit-identical; tau divides, it is never replaced by a reciprocal):

    charge   decay_input: H = V + (X - (V - v_reset)) / tau       else: H = V - (V - v_reset) / tau + X
    fire     S = H >= v_threshold                                  (non-strict, as SpikingJelly's heaviside)
    reset    hard: V = v_reset where S else H                      soft: V = H - v_threshold where S else H

Soft reset charges with v_reset = 0. Backward runs in reverse t with psi = surrogate(H - v_threshold):

    gV  = carry + grad_v_seq[t]            (carry starts as grad_v_last)
    dV/dH = hard: (1 - S) + (v_reset - H) psi     soft: 1 - v_threshold psi     (detach_reset: drop the psi term)
    gH  = grad_s[t] psi + gV dV/dH
    gX  = gH / tau (decay_input) or gH;  carry = gH (1 - 1 / tau);  grad_v0 = the final carry

Surrogates (SpikingJelly): 0 = sigmoid, psi(x) = alpha sig(alpha x)(1 - sig(alpha x)); 1 = atan,
psi(x) = (alpha / 2) / (1 + (pi / 2 alpha x)^2).

Implementation contract (every backend): x, h, s, grads are [T, N] contiguous; v0, v_last, grad_v_last, grad_v0
are fp32 [N]; v_seq / grad_v_seq are fp32 [T, N] or an empty tensor when not stored / not given.
"""
from __future__ import annotations

import math

import torch

SIGMOID, ATAN = 0, 1


def _divisor(tau: float, device) -> torch.Tensor:
    # A 0-dim tensor on x's device, not a Python float: CUDA torch turns division by a CPU scalar into a multiply by
    # its reciprocal, which is not the IEEE division the kernels (and the spec) use.
    return torch.tensor(tau, dtype=torch.float32, device=device)


def surrogate(x: torch.Tensor, kind: int, alpha: float) -> torch.Tensor:
    if kind == SIGMOID:
        sg = torch.sigmoid(alpha * x)
        return alpha * sg * (1.0 - sg)
    return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)


def lif_forward(x: torch.Tensor, v0: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool,
                decay_input: bool, store_v_seq: bool):
    """-> (s [T, N] x.dtype, h [T, N] x.dtype, v_last [N] fp32, v_seq [T, N] fp32 or empty)."""
    T = x.shape[0]
    vr = 0.0 if soft_reset else v_reset
    tau_t = _divisor(tau, x.device)
    v = v0.to(torch.float32).clone()
    s_out = torch.empty_like(x)
    h_out = torch.empty_like(x)
    v_seq = torch.empty((T, *x.shape[1:]) if store_v_seq else (0,), dtype=torch.float32, device=x.device)
    for t in range(T):
        xt = x[t].to(torch.float32)
        h = v + (xt - (v - vr)) / tau_t if decay_input else v - (v - vr) / tau_t + xt
        spike = h >= v_threshold
        if soft_reset:
            v = torch.where(spike, h - v_threshold, h)
        else:
            v = torch.where(spike, torch.full_like(h, v_reset), h)
        s_out[t] = spike.to(x.dtype)
        h_out[t] = h.to(x.dtype)
        if store_v_seq:
            v_seq[t] = v
    return s_out, h_out, v, v_seq


def lif_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool,
                 decay_input: bool, detach_reset: bool, surrogate_kind: int, alpha: float):
    """-> (grad_x [T, N] in h's dtype, grad_v0 [N] fp32)."""
    T = h.shape[0]
    tau_t = _divisor(tau, h.device)
    carry = grad_v_last.to(torch.float32).clone()
    grad_x = torch.empty_like(h)
    has_seq = grad_v_seq.numel() > 0
    for t in range(T - 1, -1, -1):
        ht = h[t].to(torch.float32)
        st = s[t].to(torch.float32)
        gv = carry + grad_v_seq[t].to(torch.float32) if has_seq else carry
        psi = surrogate(ht - v_threshold, surrogate_kind, alpha)
        if soft_reset:
            dvdh = torch.ones_like(ht) if detach_reset else 1.0 - v_threshold * psi
        else:
            dvdh = 1.0 - st if detach_reset else (1.0 - st) + (v_reset - ht) * psi
        gh = grad_s[t].to(torch.float32) * psi + gv * dvdh
        grad_x[t] = (gh / tau_t if decay_input else gh).to(h.dtype)
        carry = gh * (1.0 - 1.0 / tau)
    return grad_x, carry
