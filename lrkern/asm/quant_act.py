"""Unsigned per-tensor activation quantization for ASM layers (spec ``asm.md`` sections 3.4 and 3.5).

    x_int = clamp(round(x / s_x), 0, 2^a - 1)        (torch.round: half to even; a = a_bits in {4, 8})
    x_hat = s_x * x_int                              (fake quantization, training)

Activations are not constrained to alphabets: the activation is the input of the pre-computer bank, not a decomposed
operand. ``ActQuantizer`` holds s_x and does both the fake quantization of training (``forward``) and the integer
quantization of the exact paths (``quantize``); both divide by the same s_x in the same way, so the integers behind a
fake-quantized tensor are exactly the ones the integer path sees.

Backward (clipped straight-through estimator): dL/dx = dL/dx_hat where 0 <= x <= (2^a - 1) s_x, else 0. With
``scale="lsq"`` s_x is a learnable parameter with the LSQ gradient (Esser et al., "Learned Step Size Quantization",
arXiv 1902.08153) for an unsigned grid: dx_hat/ds = round(x/s) - x/s inside the range, 0 below it and 2^a - 1 above it,
times g = 1 / sqrt(numel(x) / batch * (2^a - 1)) (the number of activations per example, as in LSQ's N_F).

Calibration of s_x (``scale="ema"``, default): s_x = max(x) / (2^a - 1) of the first batch seen, then an exponential
moving average s_x <- 0.9 s_x + 0.1 max(x) / (2^a - 1) of the batch maxima, updated on every forward in training mode
(or inside ``calibrating(model)``), until ``freeze()`` (the QAT recipe freezes after the first QAT epoch). A frozen or
LSQ scale never changes by itself.

Pixel input (``pixel=(mean, std)``, the first layer under ``convert(..., all_layers=True)``): the input is a
normalised image x = (p / 255 - mean) / std with integer pixels p; the quantizer recovers p = round((x std + mean) 255)
(8 bits), with the fixed scale s_x = 1 / (255 std) and the offset o = -mean / std, so x = s_x p + o exactly in real
arithmetic. The layer adds the offset's contribution to its output (``lrkern.asm.modules``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from lrkern.asm.alphabet import check_a_bits

ACT_SCALES = ("ema", "lsq")
EMA_MOMENTUM = 0.9


class _FakeQuantAct(torch.autograd.Function):
    """x_hat = s * clamp(round(x / s), 0, qmax) with the clipped STE to x and the LSQ gradient to s."""

    @staticmethod
    def forward(ctx, x, s, qmax, grad_scale):
        v = x / s
        ctx.qmax, ctx.grad_scale = qmax, grad_scale
        if ctx.needs_input_grad[1]:  # LSQ: the scale gradient needs v and q
            q = torch.clamp(torch.round(v), 0, qmax)
            ctx.save_for_backward(v, q)
            return q * s
        # The STE alone needs only the in-range mask (1 byte per element); then v is rounded in place.
        ctx.save_for_backward(torch.clamp(v, 0, qmax) == v)
        return v.round_().clamp_(0, qmax).mul_(s)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[1]:
            (inside,) = ctx.saved_tensors
            return (g * inside.to(g.dtype) if ctx.needs_input_grad[0] else None), None, None, None
        v, q = ctx.saved_tensors
        inside = (v >= 0) & (v <= ctx.qmax)
        gx = g * inside.to(g.dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            # d x_hat / d s: round(v) - v inside, 0 below the range, qmax above it.
            d = torch.where(v < 0, torch.zeros_like(v), torch.where(v > ctx.qmax, torch.full_like(v, ctx.qmax), q - v))
            gs = (g * d).sum().reshape(()) * ctx.grad_scale
        return gx, gs, None, None


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, a_bits: int, grad_scale: float = 1.0) -> torch.Tensor:
    """s_x * clamp(round(x / s_x), 0, 2^a_bits - 1) with the clipped straight-through estimator to ``x`` and the LSQ
    gradient (times ``grad_scale``) to ``scale`` (a 0-dim float tensor)."""
    a_bits = check_a_bits(a_bits)
    if not x.is_floating_point():
        raise TypeError(f"x: fake quantization takes a float tensor, got {x.dtype}")
    return _FakeQuantAct.apply(x, scale.to(x.dtype), float(2 ** a_bits - 1), float(grad_scale))


def quantize_act(x: torch.Tensor, scale: torch.Tensor, a_bits: int) -> torch.Tensor:
    """x_int = clamp(round(x / s_x), 0, 2^a_bits - 1) as uint8 (no gradient)."""
    a_bits = check_a_bits(a_bits)
    if not x.is_floating_point():
        raise TypeError(f"x: activations to quantize must be a float tensor, got {x.dtype}")
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale.to(x.dtype)), 0, 2 ** a_bits - 1).to(torch.uint8)


class ActQuantizer(nn.Module):
    """Per-tensor unsigned activation quantizer with scale s_x (buffer, or Parameter for ``scale="lsq"``).

    Args:
        a_bits: 4 or 8.
        scale: ``"ema"`` (batch-max EMA, momentum 0.9, until ``freeze()``) or ``"lsq"`` (learned; initialised from
            the first batch's max / (2^a - 1), like the EMA).
        pixel: ``(mean, std)`` of a normalised 8-bit image input (see the module docstring); forces a_bits = 8 and a
            fixed scale.

    ``forward(x)`` fake-quantizes (float in, float out); ``quantize(x)`` returns ``(x_int uint8, s_x 0-dim fp32)``.
    """

    def __init__(self, a_bits: int = 4, scale: str = "ema", pixel: Optional[tuple[float, float]] = None):
        super().__init__()
        if scale not in ACT_SCALES:
            raise ValueError(f"scale={scale!r} is not supported for activations; accepted: {', '.join(ACT_SCALES)}")
        self.mode = scale
        self.pixel = None if pixel is None else (float(pixel[0]), float(pixel[1]))
        if self.pixel is not None:
            if not self.pixel[1] > 0:
                raise ValueError(f"pixel: std must be positive, got {pixel!r}")
            a_bits = 8
        self.a_bits = check_a_bits(a_bits)
        self.qmax = 2 ** self.a_bits - 1
        if self.pixel is not None:
            init = torch.tensor(1.0 / (255.0 * self.pixel[1]), dtype=torch.float32)
        else:
            init = torch.tensor(1.0, dtype=torch.float32)
        if scale == "lsq" and self.pixel is None:
            self.scale = nn.Parameter(init)
        else:
            self.register_buffer("scale", init)
        # initialized: s_x holds a calibrated value; frozen: the EMA no longer updates.
        self.register_buffer("initialized", torch.tensor(self.pixel is not None))
        self.register_buffer("frozen", torch.tensor(self.pixel is not None))
        self.calibrating = False

    @property
    def offset(self) -> float:
        """The input offset o (x = s_x x_int + o): -mean/std for a pixel input, else 0."""
        return 0.0 if self.pixel is None else -self.pixel[0] / self.pixel[1]

    def freeze(self) -> None:
        """Stop the EMA calibration (an LSQ scale keeps learning through its gradient)."""
        if not bool(self.initialized):
            raise RuntimeError("ActQuantizer.freeze(): the scale was never calibrated (run a forward in training mode "
                               "or inside lrkern.asm.calibrating(model) first)")
        self.frozen.fill_(True)

    def _observe(self, x: torch.Tensor) -> None:
        if self.pixel is not None:
            return
        updating = (self.training or self.calibrating) and not bool(self.frozen)
        if self.mode == "lsq" and bool(self.initialized):
            updating = False
        if not updating:
            return
        with torch.no_grad():
            s = x.detach().max().float().clamp_min(0) / self.qmax
            if float(s) == 0.0:  # an all-zero (or all-negative) batch carries no range information
                return
            if bool(self.initialized) and self.mode == "ema":
                s = EMA_MOMENTUM * self.scale.detach() + (1 - EMA_MOMENTUM) * s
            self.scale.data.copy_(s)
            self.initialized.fill_(True)

    def _check_ready(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError("ActQuantizer: s_x is not calibrated yet; run forwards in training mode or inside "
                               "lrkern.asm.calibrating(model) before evaluating or using the integer path")

    def _pixel_ints(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.pixel
        return torch.clamp(torch.round((x * std + mean) * 255.0), 0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"x: ActQuantizer takes float activations, got {x.dtype}")
        self._observe(x)
        self._check_ready()
        if self.pixel is not None:
            # No gradient reaches a pixel input (it is the network input).
            return (self._pixel_ints(x.detach()) * self.scale + self.offset).to(x.dtype)
        grad_scale = 1.0
        if isinstance(self.scale, nn.Parameter):
            per_example = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()
            grad_scale = 1.0 / math.sqrt(max(per_example, 1) * self.qmax)
        return fake_quant_act(x, self.scale, self.a_bits, grad_scale)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_int uint8 [same shape], s_x fp32 0-dim)``; x_int is exactly the integer behind ``forward(x)``."""
        if not x.is_floating_point():
            raise TypeError(f"x: ActQuantizer.quantize takes float activations, got {x.dtype}")
        self._check_ready()
        s = self.scale.detach().to(torch.float32)
        if self.pixel is not None:
            with torch.no_grad():
                return self._pixel_ints(x).to(torch.uint8), s
        return quantize_act(x.detach(), self.scale.detach(), self.a_bits), s

    def extra_repr(self) -> str:
        if self.pixel is not None:
            return f"a_bits=8, pixel(mean={self.pixel[0]}, std={self.pixel[1]})"
        return f"a_bits={self.a_bits}, scale={self.mode}, s_x={float(self.scale):.4g}, frozen={bool(self.frozen)}"


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    """Every ``ActQuantizer`` in ``model``."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            yield m


def freeze_act_scales(model: nn.Module) -> int:
    """``freeze()`` every calibrated activation quantizer of ``model``; returns how many were frozen."""
    n = 0
    for q in act_quantizers(model):
        if bool(q.initialized):
            q.freeze()
            n += 1
    return n


@contextmanager
def calibrating(model: nn.Module):
    """Inside the block, activation quantizers update their EMA scale even in eval mode (BN statistics stay fixed):

        model.eval()
        with torch.no_grad(), lrkern.asm.calibrating(model):
            for x, _ in itertools.islice(loader, 20):
                model(x)
    """
    qs = list(act_quantizers(model))
    saved = [q.calibrating for q in qs]
    for q in qs:
        q.calibrating = True
    try:
        yield model
    finally:
        for q, flag in zip(qs, saved):
            q.calibrating = flag
