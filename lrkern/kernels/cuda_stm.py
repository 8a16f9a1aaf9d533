"""CUDA C fused Spiking Temporal Modulator (forward and backward), compiled at run time by CuPy's NVRTC.

The kernels are ``csrc/cuda/stm.cu``: grid (B * C rows, ceil(S / block)), one thread per neuron looping over T, the
reference's fp32 operations in the reference's order, so fp32 spikes, h and v_last are bit-identical to
``lrkern/reference/stm.py``. The backward rebuilds the spike trace into an fp32 scratch [T, B, C, S] (with beta) and
writes one float64 partial per (parameter, row, block) of the per-(b, c) parameter gradients, which this launcher
adds in float64: deterministic, no atomics. Each (direction, dtype, flags) combination is one template instantiation,
compiled on first use with ``--fmad=false`` and cached (``lrkern.kernels._cuda_c``, shared with ``cuda_lif``); the
kernels run on torch's current stream of the tensors' device.

CuPy is optional and imported lazily; the dispatcher selects the ``cuda`` backend only when it is forced and CuPy
works on the device. Same signatures as ``lrkern/kernels/stm.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lrkern._alloc import empty
from lrkern.kernels import _cuda_c
from lrkern.kernels._cuda_c import CTYPES as _CTYPES
from lrkern.kernels._cuda_c import flag as _flag

SIGMOID, ATAN = 0, 1
SOURCE = "stm.cu"
# Threads per block: the row length rounded up to a power of two (the block reduction's tree needs one), at least a
# warp, at most MAX_BLOCK (stm.cu's LK_STM_MAX_BLOCK sizes its shared buffer for it). Longer rows span several blocks.
# TODO(gpu): never measured on a GPU; a 6x6 map (S = 36) fills 36 of 64 threads, and packing several rows per block
# (per-thread parameters, a segmented reduction) may pay off there.
MIN_BLOCK = 32
MAX_BLOCK = 256
_MAX_GRID_X, _MAX_GRID_Y = 2**31 - 1, 65535  # CUDA's limits on gridDim.x (rows) and .y (blocks of a row)


def source_path() -> Path:
    """``stm.cu`` in the source tree (editable installs, the repo), else a copy shipped inside the package."""
    return _cuda_c.source_path(SOURCE)


def _code() -> str:
    return _cuda_c.code(SOURCE)


def _launch(name: str, device: torch.device, grid: tuple, block: int, args: tuple) -> None:
    _cuda_c.launch(SOURCE, name, device, grid, (block,), args)


def _check(name: str, t: torch.Tensor, dtypes) -> None:
    _cuda_c.check("cuda_stm", name, t, dtypes)


def _block(row_len: int) -> int:
    return max(MIN_BLOCK, min(MAX_BLOCK, 1 << max(0, row_len - 1).bit_length()))


def _grid(rows: int, row_len: int) -> tuple[tuple[int, int], int]:
    """((rows, blocks per row), threads per block)."""
    block = _block(row_len)
    per_row = -(-row_len // block)
    if per_row > _MAX_GRID_Y:
        raise ValueError(f"cuda_stm: rows of S = {row_len} neurons (the product of the spatial dims) need {per_row} "
                         f"blocks of {block}; the CUDA C backend allows at most {_MAX_GRID_Y * MAX_BLOCK} per (b, c)")
    if rows > _MAX_GRID_X:
        raise ValueError(f"cuda_stm: B * C = {rows} rows exceed the CUDA grid's {_MAX_GRID_X} blocks")
    return (rows, per_row), block


def _params(gain, tau, theta0, beta) -> None:
    for name, p in (("gain", gain), ("tau", tau), ("theta0", theta0), ("beta", beta)):
        if p is not None:
            _check(name, p, (torch.float32,))


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def stm_forward(u: torch.Tensor, v0: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float,
                v_reset: float, soft_reset: bool, decay_input: bool):
    """Launcher for the STM forward: u contiguous [T, B, C, S] fp32/fp16/bf16 on CUDA, v0 fp32 [B, C, S], gain fp32
    [B, C] or None, tau / theta0 / beta (or None) fp32 [C], validated.

    -> (s [T, B, C, S] u.dtype, h [T, B, C, S] u.dtype, v_last [B, C, S] fp32).
    """
    _check("u", u, tuple(_CTYPES))
    _check("v0", v0, (torch.float32,))
    _params(gain, tau, theta0, beta)
    t, b, c, sp = u.shape
    s = empty(u.shape, u.dtype, u.device)
    h = empty(u.shape, u.dtype, u.device)
    v_last = empty(u.shape[1:], torch.float32, u.device)
    if b * c * sp == 0:
        return s, h, v_last
    grid, block = _grid(b * c, sp)
    name = f"stm_fwd<{_CTYPES[u.dtype]}, {_flag(soft_reset)}, {_flag(decay_input)}, {_flag(beta is not None)}>"
    _launch(name, u.device, grid, block, (
        u.data_ptr(), v0.data_ptr(), _ptr(gain), tau.data_ptr(), theta0.data_ptr(), _ptr(beta), s.data_ptr(),
        h.data_ptr(), v_last.data_ptr(), np.int64(t), np.int64(b * c * sp), np.int64(sp), np.int64(c),
        np.float32(rho), np.float32(v_reset)))
    return s, h, v_last


def stm_backward(grad_s: torch.Tensor, grad_v_last: torch.Tensor, u, v0: torch.Tensor, h: torch.Tensor,
                 s: torch.Tensor, gain, tau: torch.Tensor, theta0: torch.Tensor, beta, rho: float, v_reset: float,
                 soft_reset: bool, decay_input: bool, detach_reset: bool, surrogate_kind: int, alpha: float):
    """Launcher for the STM backward: grad_s, u (or None), h, s contiguous [T, B, C, S] in h's dtype; grad_v_last,
    v0 fp32 [B, C, S]; parameters as the forward's; validated. surrogate_kind 0 = sigmoid, 1 = atan.

    -> (grad_u [T, B, C, S] in h's dtype, grad_v0 [B, C, S] fp32, grad_params [4, B, C] fp32: gain, tau, theta0,
    beta per (b, c); rows 0 and 1 zeros when u is None, row 3 when beta is None).
    """
    if surrogate_kind not in (SIGMOID, ATAN):
        raise ValueError(f"surrogate_kind must be 0 (sigmoid) or 1 (atan), got {surrogate_kind}")
    _check("h", h, tuple(_CTYPES))
    for nm, ten in (("grad_s", grad_s), ("s", s)) + ((("u", u),) if u is not None else ()):
        _check(nm, ten, (h.dtype,))
    for nm, ten in (("grad_v_last", grad_v_last), ("v0", v0)):
        _check(nm, ten, (torch.float32,))
    _params(gain, tau, theta0, beta)
    t, b, c, sp = h.shape
    grad_u = empty(h.shape, h.dtype, h.device)
    grad_v0 = empty(h.shape[1:], torch.float32, h.device)
    if t == 0 or b * c * sp == 0:
        grad_v0.copy_(grad_v_last.reshape(grad_v0.shape))
        return grad_u, grad_v0, torch.zeros((4, b, c), dtype=torch.float32, device=h.device)
    grid, block = _grid(b * c, sp)
    partial = empty((4, b * c, grid[1]), torch.float64, h.device)
    trace = empty(h.shape, torch.float32, h.device) if beta is not None else None
    alpha = float(alpha)
    name = (f"stm_bwd<{_CTYPES[h.dtype]}, {_flag(soft_reset)}, {_flag(decay_input)}, {_flag(beta is not None)}, "
            f"{_flag(surrogate_kind == ATAN)}, {_flag(u is not None)}>")
    # pi/2 * alpha and alpha/2 in double, as the reference forms them in Python, then rounded once.
    _launch(name, h.device, grid, block, (
        grad_s.data_ptr(), grad_v_last.data_ptr(), _ptr(u), v0.data_ptr(), h.data_ptr(), s.data_ptr(), _ptr(gain),
        tau.data_ptr(), theta0.data_ptr(), _ptr(beta), _ptr(trace), grad_u.data_ptr(), grad_v0.data_ptr(),
        partial.data_ptr(), np.int64(t), np.int64(b * c * sp), np.int64(sp), np.int64(c), np.float32(rho),
        np.float32(v_reset), np.int32(bool(detach_reset)), np.float32(alpha), np.float32(math.pi / 2.0 * alpha),
        np.float32(alpha / 2.0)))
    return grad_u, grad_v0, reduce_partials(partial, tau, b, decay_input)


def reduce_partials(partial: torch.Tensor, tau: torch.Tensor, b: int, decay_input: bool) -> torch.Tensor:
    """The kernel's float64 partials [4, B * C, blocks per row] -> grad_params [4, B, C] fp32: the blocks added in
    float64 in a fixed order, the tau row scaled by -1/tau^2 (decay_input) or 1/tau^2, as the reference does."""
    c = tau.shape[0]
    sums = partial.sum(-1).view(4, b, c)
    tau64 = tau.to(torch.float64).view(1, c)
    sums[1] = sums[1] / (tau64 * tau64) * (-1.0 if decay_input else 1.0)
    return sums.to(torch.float32)
