"""Spiking Temporal Modulator layer (spec ``spiking_video.md`` 3.2; **lrkern formulation**, the paper's STM equations
are not public) on the fused ``torch.ops.lrkern.stm_multistep`` op.

Per channel c an LIF neuron with its own tau_c, a dynamic threshold theta = theta0_c + beta_c * trace (the trace of
the neuron's own spikes, decaying by rho per step) and an optional input gain g[b, c] (the I-frame's cross-domain
modulation). At initialisation (beta = 0, no gain) it is exactly ``lrkern.spiking.LIF`` with the same tau, threshold,
reset, surrogate and flags: bit-identical spikes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lrkern.ops.lif import SURROGATES
from lrkern.ops.stm import DEFAULT_RHO, stm_multistep

_DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0}  # SpikingJelly's surrogate defaults, as lrkern.spiking.LIF


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class STM(nn.Module):
    """Spiking Temporal Modulator: ``u [T, B, C, *spatial] -> spikes`` (u's dtype), stateless per call.

    Args:
        channels: C. tau: initial membrane time constant of every channel (> 0). v_threshold: initial theta0.
        v_reset: reset potential, or None for a soft reset (subtract theta). surrogate "sigmoid" | "atan"; alpha: its
        slope (default 4 / 2). detach_reset, decay_input: as ``lrkern.spiking.LIF``. rho: the spike trace's decay
        per step (default exp(-1/4), a 4-step trace). dynamic_threshold: learn beta (initialised to 0); False: the
        threshold is theta0 alone (no trace is kept, beta is None). learn_tau: tau is a Parameter (else a buffer).

    Parameters: ``tau [C]``, ``theta0 [C]``, ``beta [C]`` (or None), all fp32; the op reads them as fp32 (``.float()``
    is applied, so a ``.half()`` model still runs its neurons in fp32).

    tau must stay > 0. It is neither clamped (that would silently change the neuron) nor reparametrised (then the
    initial tau would not be exactly the given value and the LIF parity would be lost): a forward with any tau <= 0
    raises ValueError naming the channel. Keep the learning rate of tau modest, or constrain it in the optimiser.

    ``forward(u, gain=None, v0=None)``: gain fp32 [B, C] or None (1); v0 fp32 [B, C, *spatial] or None (v_reset, or
    0 under soft reset). The final membrane is kept in ``self.v`` (not reused by the next call; pass it as v0 to
    carry the state on).

    Example:
        >>> stm = lrkern.spiking.STM(128)
        >>> spikes = stm(torch.randn(16, 8, 128, 6, 6), gain=1 + torch.tanh(torch.randn(8, 128)))
    """

    def __init__(self, channels: int, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate: str = "sigmoid", alpha: Optional[float] = None, detach_reset: bool = False,
                 decay_input: bool = True, rho: float = DEFAULT_RHO, dynamic_threshold: bool = True,
                 learn_tau: bool = True):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate={surrogate!r} is not supported; accepted: {', '.join(SURROGATES)}")
        if _finite("tau", tau) <= 0:
            raise ValueError(f"tau={tau} must be > 0")
        rho = _finite("rho", rho)
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho={rho} must be in [0, 1) (the spike trace's decay per step)")
        self.channels = channels
        self.v_reset = None if v_reset is None else _finite("v_reset", v_reset)
        self.surrogate = surrogate
        self.alpha = _finite("alpha", alpha) if alpha is not None else _DEFAULT_ALPHA[surrogate]
        self.detach_reset, self.decay_input, self.rho = bool(detach_reset), bool(decay_input), rho
        tau_init = torch.full((channels,), float(tau), dtype=torch.float32)
        if learn_tau:
            self.tau = nn.Parameter(tau_init)
        else:
            self.register_buffer("tau", tau_init)
        self.theta0 = nn.Parameter(torch.full((channels,), _finite("v_threshold", v_threshold), dtype=torch.float32))
        if dynamic_threshold:
            self.beta = nn.Parameter(torch.zeros(channels, dtype=torch.float32))
        else:
            self.register_parameter("beta", None)
        self.v: Optional[torch.Tensor] = None

    def forward(self, u: torch.Tensor, gain: Optional[torch.Tensor] = None,
                v0: Optional[torch.Tensor] = None) -> torch.Tensor:
        if u.dim() < 3 or u.shape[2] != self.channels:
            raise ValueError(f"u must be [T, B, C={self.channels}, *spatial] (time-major), got shape "
                             f"{tuple(u.shape)}")
        beta = None if self.beta is None else self.beta.float()
        s, v_last, _ = stm_multistep(u, v0, None if gain is None else gain.float(), self.tau.float(),
                                     self.theta0.float(), beta, self.rho, self.v_reset, self.surrogate, self.alpha,
                                     self.detach_reset, self.decay_input)
        self.v = v_last
        return s

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard to {self.v_reset}"
        return (f"{self.channels}, reset={reset}, surrogate={self.surrogate}(alpha={self.alpha}), "
                f"detach_reset={self.detach_reset}, decay_input={self.decay_input}, rho={self.rho:.4g}, "
                f"dynamic_threshold={self.beta is not None}, learn_tau={isinstance(self.tau, nn.Parameter)}")


__all__ = ["STM"]
