"""Spiking neurons on lrkern's fused multi-step kernels (spec ``spiking_video.md``).

``LIF`` follows SpikingJelly's ``LIFNode`` in multi-step mode (``step_mode="m"``): same defaults (tau 2, threshold 1,
hard reset to 0, decay_input, sigmoid surrogate with alpha 4), same update order, so a model can switch without
surprises; the whole time loop, forward and backward, is one ``torch.ops.lrkern.lif_multistep`` call.
``STM`` is the Spiking Temporal Modulator (``lrkern.spiking.stm``); ``from_spikingjelly(model)`` swaps a SpikingJelly
model's ``LIFNode`` modules for ``LIF`` modules.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import nn

from lrkern.ops._dispatch import select_backend, use_backend, why_unavailable
from lrkern.ops.lif import SURROGATES, lif_multistep
from lrkern.spiking.stm import STM

DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0}  # SpikingJelly's surrogate defaults
# The module's backend names (spec section 5) -> lrkern's dispatcher backends; "auto" leaves the choice to it.
MODULE_BACKENDS = {"auto": None, "torch": "reference", "cpp": "cpp", "triton": "triton", "cuda": "cuda"}


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neurons: ``x [T, ...] -> spikes [T, ...]`` (x's dtype).

    Args:
        tau: membrane time constant (> 0). v_threshold: firing threshold. v_reset: reset potential, or None for a
        soft reset (subtract the threshold). surrogate: "sigmoid" | "atan"; alpha: its slope (default 4 / 2).
        detach_reset: no gradient through the reset. decay_input: H = V + (X - (V - v_reset)) / tau (True) or
        H = V - (V - v_reset) / tau + X. store_v_seq: keep the membrane after every step in ``self.v_seq``.
        stateful: carry the final membrane into the next call (until ``reset()``), like SpikingJelly's memory.
        backend: "auto" (lrkern's choice: Triton on CUDA, C++ on CPU), "torch" (the eager reference), "cpp",
        "triton", or "cuda" (CUDA C compiled at run time by CuPy). An explicit backend that cannot run the input
        raises with the reason, except "cuda": without CuPy or a GPU it falls back to Triton (or, where Triton
        cannot run either, to lrkern's automatic choice) with one warning that gives the reason.

    Example:
        >>> lif = lrkern.spiking.LIF(tau=2.0)
        >>> spikes = lif(torch.randn(16, 8, 128))    # T = 16 steps of [8, 128] inputs
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate: str = "sigmoid", alpha: Optional[float] = None, detach_reset: bool = False,
                 decay_input: bool = True, store_v_seq: bool = False, stateful: bool = False, backend: str = "auto"):
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate={surrogate!r} is not supported; accepted: {', '.join(SURROGATES)}")
        if backend not in MODULE_BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; accepted: {', '.join(MODULE_BACKENDS)}")
        self.backend = backend
        self._warned_fallback = False
        self.tau, self.v_threshold, self.v_reset = float(tau), float(v_threshold), v_reset
        self.surrogate = surrogate
        self.alpha = float(alpha) if alpha is not None else DEFAULT_ALPHA[surrogate]
        self.detach_reset, self.decay_input, self.store_v_seq, self.stateful = (detach_reset, decay_input,
                                                                               store_v_seq, stateful)
        self.v: Optional[torch.Tensor] = None
        self.v_seq: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.v, self.v_seq = None, None

    def _backend_for(self, device: torch.device) -> Optional[str]:
        """The dispatcher backend to force for ``device`` (None: automatic); warns once when "cuda" falls back."""
        name = MODULE_BACKENDS[self.backend]
        if name != "cuda":
            return name
        reason = why_unavailable("cuda", device)
        if reason is None:
            return "cuda"
        fallback = "triton" if why_unavailable("triton", device) is None else None
        if not self._warned_fallback:
            self._warned_fallback = True
            instead = "the Triton backend" if fallback else f"lrkern's automatic choice ({select_backend(device)})"
            warnings.warn(f"lrkern.spiking.LIF(backend='cuda'): the CUDA C backend cannot run here ({reason}); "
                          f"using {instead} instead", RuntimeWarning, stacklevel=3)
        return fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v0 = self.v if self.stateful else None
        if v0 is not None and tuple(v0.shape) != tuple(x.shape[1:]):
            raise ValueError(f"the carried membrane has shape {tuple(v0.shape)} but x has {tuple(x.shape[1:])} "
                             "neurons per step; call reset() between inputs of different shapes")
        name = self._backend_for(x.device)
        with use_backend(name) if name is not None else contextlib.nullcontext():
            s, v_last, v_seq, _ = lif_multistep(x, v0, self.tau, self.v_threshold, self.v_reset, self.surrogate,
                                                self.alpha, self.detach_reset, self.decay_input, self.store_v_seq)
        self.v = v_last
        self.v_seq = v_seq if self.store_v_seq else None
        return s

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard to {self.v_reset}"
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, reset={reset}, surrogate={self.surrogate}"
                f"(alpha={self.alpha}), detach_reset={self.detach_reset}, decay_input={self.decay_input}"
                + ("" if self.backend == "auto" else f", backend={self.backend}"))


from lrkern.spiking.compat import from_spikingjelly  # noqa: E402  (compat builds LIF modules)

__all__ = ["LIF", "STM", "from_spikingjelly"]
