"""The one epilogue of every ASM GEMM path (spec asm.md 3.4): y = (s_x * s_w) * acc + bias in fp32.

Every path (emulation, fast path, any backend, module in "exact" or "emulate" mode) produces the same int32 ``acc``
and then calls this function, so the floats are identical too. The order is fixed: the fp32 product of the two
scales first (one rounding), then the fp32 product with ``acc.float()`` (``acc`` is exact in fp32 while
|acc| <= 2^24; beyond that its conversion rounds to nearest even, the same on every path), then the bias (one more
rounding). Eager PyTorch runs each step as its own elementwise op, so no fused multiply-add changes a result.
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def _scale_x(s_x: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    if isinstance(s_x, torch.Tensor):
        if s_x.numel() != 1:
            raise ValueError(f"s_x must be a float or a one-element (per-tensor) tensor, got shape {tuple(s_x.shape)}")
        if not s_x.dtype.is_floating_point:
            raise TypeError(f"s_x has dtype {s_x.dtype}; expected a floating-point scale")
        return s_x.reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(s_x, bool) or not isinstance(s_x, (int, float)):
        raise TypeError(f"s_x must be a float or a 0-dim fp32 tensor, got {type(s_x).__name__}")
    # Rounded to fp32 once, exactly as a 0-dim fp32 tensor holding the same value would be.
    return torch.tensor(float(s_x), dtype=torch.float32, device=device)


def asm_epilogue(acc: torch.Tensor, s_x: Union[float, torch.Tensor], s_w: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 [M, N] = (s_x * s_w) * acc.float() + bias, in exactly that order, in fp32.

    acc: int32 [M, N] (from ``asm_gemm`` or ``asm_gemm_emulate``); s_x: per-tensor activation scale (float or a
    one-element float tensor, rounded to fp32); s_w: fp32 [N] per-output-channel weight scale; bias: fp32 [N] or None.
    """
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or acc.dim() != 2:
        got = f"{acc.dtype} {tuple(acc.shape)}" if isinstance(acc, torch.Tensor) else type(acc).__name__
        raise TypeError(f"acc must be an int32 [M, N] tensor, got {got}")
    n = acc.shape[1]
    if not isinstance(s_w, torch.Tensor) or s_w.dtype != torch.float32 or tuple(s_w.shape) != (n,):
        got = f"{s_w.dtype} {tuple(s_w.shape)}" if isinstance(s_w, torch.Tensor) else type(s_w).__name__
        raise ValueError(f"s_w must be an fp32 tensor of shape [N] = ({n},), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (n,)):
        got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or an fp32 tensor of shape [N] = ({n},), got {got}")
    scale = _scale_x(s_x, acc.device) * s_w  # fp32 [N]: s_x * s_w, one rounding
    y = scale * acc.to(torch.float32)  # fp32 [M, N] (broadcast over rows)
    if bias is not None:
        y = y + bias
    return y


__all__ = ["asm_epilogue"]
