"""CUDA C fused multi-step LIF neuron (forward and backward), compiled at run time by CuPy's NVRTC.

The kernels are ``csrc/cuda/lif.cu`` (one thread per neuron, loop over T, the reference's fp32 operations in the
reference's order, so fp32 spikes, h, v_last and v_seq are bit-identical to ``lrkern/reference/lif.py``). Each
(direction, dtype, flags) combination is one template instantiation, compiled on first use with ``--fmad=false`` and
cached (``lrkern.kernels._cuda_c``, which this launcher shares with ``cuda_stm``). Tensors stay torch tensors:
outputs are allocated by torch, kernels get raw pointers, and run on torch's current stream of the tensors' device.

CuPy is optional: this module imports it lazily, and the dispatcher only selects the ``cuda`` backend when it is
forced and ``why_unavailable("cuda", device)`` found CuPy importable and able to compile (``lrkern.spiking.LIF``
falls back to Triton with a warning otherwise). Same signatures as ``lrkern/kernels/lif.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lrkern._alloc import empty
from lrkern.kernels import _cuda_c
from lrkern.kernels._cuda_c import CTYPES as _CTYPES
from lrkern.kernels._cuda_c import OPTIONS  # noqa: F401  (part of this module's interface, read by the tests)
from lrkern.kernels._cuda_c import flag as _flag

SIGMOID, ATAN = 0, 1
# Threads (neurons) per block. Each thread's T steps are serial; bandwidth comes from many resident warps.
# TODO(gpu): tune on H100 (and try 2-wide / 4-wide vector loads); never measured on a GPU.
BLOCK = 256
SOURCE = "lif.cu"


def source_path() -> Path:
    """``lif.cu`` in the source tree (editable installs, the repo), else a copy shipped inside the package."""
    return _cuda_c.source_path(SOURCE)


def _code() -> str:
    return _cuda_c.code(SOURCE)


def _launch(name: str, device: torch.device, n: int, args: tuple) -> None:
    _cuda_c.launch(SOURCE, name, device, ((n + BLOCK - 1) // BLOCK,), (BLOCK,), args)


def _check(name: str, t: torch.Tensor, dtypes) -> None:
    _cuda_c.check("cuda_lif", name, t, dtypes)


def lif_forward(x: torch.Tensor, v0: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool,
                decay_input: bool, store_v_seq: bool):
    """Launcher for the LIF forward: x contiguous [T, N] fp32/fp16/bf16 on CUDA, v0 fp32 [N], validated.

    -> (s [T, N] x.dtype, h [T, N] x.dtype, v_last [N] fp32, v_seq [T, N] fp32 or an empty tensor).
    """
    _check("x", x, tuple(_CTYPES))
    _check("v0", v0, (torch.float32,))
    t = x.shape[0]
    tail = tuple(x.shape[1:])
    n = math.prod(tail)
    s = empty(x.shape, x.dtype, x.device)
    h = empty(x.shape, x.dtype, x.device)
    v_last = empty(tail, torch.float32, x.device)
    v_seq = empty((t, *tail) if store_v_seq else (0,), torch.float32, x.device)
    if n == 0:
        return s, h, v_last, v_seq
    name = (f"lif_fwd<{_CTYPES[x.dtype]}, {_flag(soft_reset)}, {_flag(decay_input)}, {_flag(store_v_seq)}>")
    _launch(name, x.device, n, (
        x.data_ptr(), v0.data_ptr(), s.data_ptr(), h.data_ptr(), v_last.data_ptr(),
        v_seq.data_ptr() if store_v_seq else 0, np.int64(t), np.int64(n), np.float32(tau), np.float32(v_threshold),
        np.float32(v_reset)))
    return s, h, v_last, v_seq


def lif_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, grad_v_seq: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, tau: float, v_threshold: float, v_reset: float, soft_reset: bool, decay_input: bool,
                 detach_reset: bool, surrogate_kind: int, alpha: float):
    """Launcher for the LIF backward: grad_s, h, s contiguous [T, N] (h's dtype); grad_v_last fp32 [N]; grad_v_seq
    fp32 [T, N] or empty; validated. surrogate_kind 0 = sigmoid, 1 = atan.

    -> (grad_x [T, N] in h's dtype, grad_v0 [N] fp32).
    """
    if surrogate_kind not in (SIGMOID, ATAN):
        raise ValueError(f"surrogate_kind must be 0 (sigmoid) or 1 (atan), got {surrogate_kind}")
    _check("h", h, tuple(_CTYPES))
    for nm, ten in (("grad_s", grad_s), ("s", s)):
        _check(nm, ten, (h.dtype,))
    _check("grad_v_last", grad_v_last, (torch.float32,))
    has_seq = grad_v_seq.numel() > 0
    if has_seq:
        _check("grad_v_seq", grad_v_seq, (torch.float32,))
    t = h.shape[0]
    tail = tuple(h.shape[1:])
    n = math.prod(tail)
    grad_x = empty(h.shape, h.dtype, h.device)
    grad_v0 = empty(tail, torch.float32, h.device)
    if n == 0:
        return grad_x, grad_v0
    tau, alpha = float(tau), float(alpha)
    name = (f"lif_bwd<{_CTYPES[h.dtype]}, {_flag(soft_reset)}, {_flag(decay_input)}, {_flag(detach_reset)}, "
            f"{_flag(surrogate_kind == ATAN)}, {_flag(has_seq)}>")
    # 1 - 1/tau, pi/2 * alpha and alpha/2 in double, as the reference forms them in Python, then rounded once.
    _launch(name, h.device, n, (
        grad_s.data_ptr(), grad_v_last.data_ptr(), grad_v_seq.data_ptr() if has_seq else 0, h.data_ptr(),
        s.data_ptr(), grad_x.data_ptr(), grad_v0.data_ptr(), np.int64(t), np.int64(n), np.float32(tau),
        np.float32(v_threshold), np.float32(v_reset), np.float32(1.0 - 1.0 / tau), np.float32(alpha),
        np.float32(math.pi / 2.0 * alpha), np.float32(alpha / 2.0)))
    return grad_x, grad_v0
