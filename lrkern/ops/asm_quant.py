"""``torch.ops.lrkern.asm_project``, ``asm_fake_quant`` (with its backward, ``asm_fake_quant_backward``) and
``asm_decompose``: alphabet-set weight projection, fake quantization and the hardware code format (spec asm.md 3.3,
3.5, 4 items 1-2; the maths is ``lrkern/reference/asm_quant.py``).

The projection is elementwise and memory bound: one read of w (and of the [C] scale), one write of w_int or w_hat. The
backward of ``asm_fake_quant`` is its own registered op (so compiled graphs trace it): it recomputes u from w and the
scale (autograd keeps w and the scale only), writes grad_w and reduces the LSQ scale gradient per channel in a fixed
order (per-program partial sums plus a host sum on Triton, fixed blocks on C++; no atomics).
"""
from __future__ import annotations

import math

import torch

from lrkern.asm.alphabet import check_w_bits, parse_alphabet
from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher, forced_backend, forced_scope
from lrkern.reference.asm_quant import check_decomposed

_project = Dispatcher("asm_project", reference="lrkern.reference.asm_quant:project",
                      triton="lrkern.kernels.asm_quant:project", cpp="lrkern.ops._cpp:asm_project")
_fq_fwd = Dispatcher("asm_fake_quant", reference="lrkern.reference.asm_quant:fake_quant",
                     triton="lrkern.kernels.asm_quant:fake_quant", cpp="lrkern.ops._cpp:asm_fake_quant")
_fq_bwd = Dispatcher("asm_fake_quant_backward", reference="lrkern.reference.asm_quant:fake_quant_backward",
                     triton="lrkern.kernels.asm_quant:fake_quant_backward",
                     cpp="lrkern.ops._cpp:asm_fake_quant_backward")
_decompose = Dispatcher("asm_decompose", reference="lrkern.reference.asm_quant:decompose",
                        triton="lrkern.kernels.asm_quant:decompose", cpp="lrkern.ops._cpp:asm_decompose")


def _check(w, scale, axis, alphabet, w_bits, values: bool) -> tuple[tuple[int, ...], int, int]:
    """Validates the arguments -> (sorted alphabet, w_bits, inner = prod(w.shape[axis + 1:])). ``values``: also check
    the scale's values (positive and finite), which needs real tensors (not under fake tensors)."""
    _checks.tensor("w", w)
    _checks.integer("axis", axis)
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis={axis} is out of range for w with {w.dim()} dim(s) (shape {tuple(w.shape)})")
    ax = axis % w.dim()
    _checks.tensor("scale", scale, dtypes=(torch.float32,))
    if tuple(scale.shape) != (w.shape[ax],):
        raise ValueError(f"scale must have shape [w.shape[axis]] = [{w.shape[ax]}] (one scale per channel along "
                         f"axis={axis}), got {tuple(scale.shape)}")
    _checks.same_device(w=w, scale=scale)
    alpha = parse_alphabet(alphabet)
    w_bits = check_w_bits(w_bits)
    if values and scale.numel() and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        bad = scale[~((scale > 0) & torch.isfinite(scale))][0].item()
        raise ValueError(f"scale must be positive and finite, got {bad} (scale='max' uses 1 for all-zero channels)")
    return alpha, w_bits, math.prod(w.shape[ax + 1:])


@torch.library.custom_op("lrkern::asm_project", mutates_args=())
def asm_project(w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet: list[int], w_bits: int) -> torch.Tensor:
    """Alphabet-set projection -> w_int int16 (w's shape): u = |w| / scale (per channel along ``axis``),
    w_int = sign(w) * r_j with j = #{t_j < u} over the midpoints of the representable magnitudes (nearest, ties to the
    smaller magnitude, saturating at r_max). w fp32/fp16/bf16, scale fp32 [w.shape[axis]] positive; alphabet a list of
    odd ints in 1..15 containing 1 (e.g. [1, 3]); w_bits 4 or 8 (magnitude bits, sign excluded).

    Example:
        >>> w_int = torch.ops.lrkern.asm_project(w, w.abs().amax(1) / 12, 0, [1, 3], 4)
    """
    alpha, w_bits, inner = _check(w, scale, axis, alphabet, w_bits, values=True)
    return _project(w.device, w.contiguous(), scale.contiguous(), inner, alpha, w_bits)


@asm_project.register_fake
def _(w, scale, axis, alphabet, w_bits):
    _check(w, scale, axis, alphabet, w_bits, values=False)
    return w.new_empty(w.shape, dtype=torch.int16)


@torch.library.custom_op("lrkern::asm_fake_quant", mutates_args=())
def asm_fake_quant(w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet: list[int], w_bits: int) -> torch.Tensor:
    """w_hat = scale * asm_project(w, ...) in w's dtype (fp32 multiply, one rounding). Differentiable: clipped STE to
    w (gradient where |w| / scale <= r_max) and the LSQ gradient to scale (see asm_fake_quant_backward). Mirrors
    torch.fake_quantize_per_channel_affine(w, scale, 0, axis, -r_max, r_max) on the alphabet's grid.
    """
    alpha, w_bits, inner = _check(w, scale, axis, alphabet, w_bits, values=True)
    return _fq_fwd(w.device, w.contiguous(), scale.contiguous(), inner, alpha, w_bits)


@asm_fake_quant.register_fake
def _(w, scale, axis, alphabet, w_bits):
    _check(w, scale, axis, alphabet, w_bits, values=False)
    return w.new_empty(w.shape)


@torch.library.custom_op("lrkern::asm_fake_quant_backward", mutates_args=())
def asm_fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, axis: int, alphabet: list[int],
                            w_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_w in w's dtype, grad_scale fp32 [C]) of asm_fake_quant for the output gradient ``grad``:
    grad_w = grad where u <= r_max else 0; grad_scale[c] = sum over channel c of grad * sign(w) * (P(u) - u if
    u <= r_max else r_max), times 1 / sqrt(K * r_max) with K = w.numel() / w.shape[axis].
    """
    alpha, w_bits, inner = _check(w, scale, axis, alphabet, w_bits, values=False)
    _checks.tensor("grad", grad, min_dim=0)
    if tuple(grad.shape) != tuple(w.shape):
        raise ValueError(f"grad must have w's shape {tuple(w.shape)}, got {tuple(grad.shape)}")
    return _fq_bwd(w.device, grad.to(w.dtype).contiguous(), w.contiguous(), scale.contiguous(), inner, alpha, w_bits)


@asm_fake_quant_backward.register_fake
def _(grad, w, scale, axis, alphabet, w_bits):
    _check(w, scale, axis, alphabet, w_bits, values=False)
    return w.new_empty(w.shape), scale.new_empty(scale.shape)


def _setup(ctx, inputs, output) -> None:
    w, scale, axis, alphabet, w_bits = inputs
    ctx.save_for_backward(w, scale)
    ctx.conf = (axis, list(alphabet), w_bits)
    ctx.backend = forced_backend()


def _backward(ctx, grad):
    w, scale = ctx.saved_tensors
    axis, alphabet, w_bits = ctx.conf
    with forced_scope(ctx.backend):
        grad_w, grad_scale = asm_fake_quant_backward(grad, w, scale, axis, alphabet, w_bits)
    return (grad_w if ctx.needs_input_grad[0] else None), (grad_scale if ctx.needs_input_grad[1] else None), \
        None, None, None


asm_fake_quant.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("lrkern::asm_decompose", mutates_args=())
def asm_decompose(w_int: torch.Tensor, alphabet: list[int], w_bits: int) -> torch.Tensor:
    """Hardware code format of projected weights: w_int int16 -> codes uint8 [*w_int.shape, Q], Q = w_bits // 4,
    codes[..., i] for quartet i (i = 0 the low one): bit 7 = nonzero flag, bits 4..6 = index into the sorted
    alphabet, bits 0..3 = shift s, so that quartet = alphabet[idx] << s; the sign stays in w_int
    (``lrkern.asm.alphabet.asm_compose(codes, w_int, alphabet)`` inverts it). Raises ValueError naming the first
    weight (flat index, value) with a quartet outside the alphabet or |w_int| > 2^w_bits - 1.
    """
    _checks.tensor("w_int", w_int, dtypes=(torch.int16,), min_dim=0)
    alpha, w_bits = parse_alphabet(alphabet), check_w_bits(w_bits)
    codes, first = _decompose(w_int.device, w_int.contiguous(), alpha, w_bits)
    check_decomposed(w_int, first, alpha, w_bits)
    return codes


@asm_decompose.register_fake
def _(w_int, alphabet, w_bits):
    _checks.tensor("w_int", w_int, dtypes=(torch.int16,), min_dim=0)
    parse_alphabet(alphabet)
    return w_int.new_empty((*w_int.shape, check_w_bits(w_bits) // 4), dtype=torch.uint8)
