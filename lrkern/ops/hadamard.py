"""``torch.ops.lrkern.hadamard``: orthonormal fast Walsh-Hadamard transform along the last dim."""
from __future__ import annotations

import torch

from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher

MIN_N, MAX_N = 2, 32768

_impl = Dispatcher(
    "hadamard",
    reference="lrkern.reference.hadamard:hadamard",
    triton="lrkern.kernels.hadamard:hadamard",
    cpp="lrkern.ops._cpp:hadamard",
)


def _check(x: torch.Tensor) -> None:
    _checks.tensor("x", x)
    _checks.power_of_two("x.shape[-1]", x.shape[-1], MIN_N, MAX_N)


@torch.library.custom_op("lrkern::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H_n along the last dim, H_n[i, j] = (-1)^popcount(i & j) / sqrt(n) (Sylvester order, orthonormal).

    x: [..., n], n a power of two in [2, 32768]; fp32, fp16 or bf16 (accumulation in fp32). Returns a new tensor of
    x's shape and dtype. H_n is symmetric and orthonormal, so ``hadamard(hadamard(x)) == x`` up to rounding.

    Example:
        >>> y = lrkern.hadamard(torch.randn(4, 128))
    """
    _check(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _impl(x.device, x.contiguous())


def hadamard_trusted(x: torch.Tensor) -> torch.Tensor:
    """``hadamard`` without its validation and torch.library's dispatch (~40 us per call on CPU), for internal callers
    whose x is a non-empty float tensor with a power-of-two last dim in range, in eager mode without autograd (the
    quantized KV cache rotates one token per layer per decode step). Backend selection is the same Dispatcher."""
    return _impl(x.device, x.contiguous())


@hadamard.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    # H is symmetric and orthonormal: the vector-Jacobian product is the transform itself.
    return hadamard(grad)


hadamard.register_autograd(_backward)
