"""``torch.ops.lrkern.asm_gemm_emulate`` and ``torch.ops.lrkern.asm_gemm``: the two integer GEMMs of the Alphabet Set
Multiplier (spec asm.md 3.1, 3.4, section 4 items 3-4; references in ``lrkern/reference/asm_gemm.py``).

Both compute acc[m, n] = sum_k x_int[m, k] * w_int[n, k] as int32 [M, N], bit-identical on every backend:
- ``asm_gemm_emulate(x_int, w_int, alphabet, w_bits, a_bits)``: the shift-add datapath (pre-computer bank x * a by
  shift-add, per quartet a mux over the bank, a shift by s + 4i and an add, the sign, int32 accumulation). Compute
  bound: a test oracle and structural model, not a production kernel.
- ``asm_gemm(x_int, w_int, w_bits, a_bits)``: the fast path, an ordinary int8 x int8 -> int32 GEMM of the same
  integers (x - 128 offset for 8-bit activations, quartet planes w = 16 w_hi + w_lo for 8-bit weights).

Arguments: x_int [M, K] of an integer dtype (uint8, int8, int16, int32, int64) with values in [0, 2^a_bits - 1];
w_int [N, K] of an integer dtype (int16 is what ``asm_project`` returns) with |w_int| <= 2^w_bits - 1 and, for the
emulation, every quartet representable in ``alphabet``. Both raise unless K * r_max * (2^a_bits - 1) < 2^30, where
r_max is the alphabet's largest magnitude for the emulation and 2^w_bits - 1 for the fast path (which takes no
alphabet): nothing ever relies on wrap-around. No autograd (integer ops); the epilogue that turns acc into floats is
``lrkern.asm.epilogue.asm_epilogue``.
"""
from __future__ import annotations

import torch

from lrkern.asm.alphabet import check_a_bits, check_w_bits, code_table, parse_alphabet, representable_quartets
from lrkern.ops._checks import DEVICE_TYPES, same_device
from lrkern.ops._dispatch import Dispatcher

_emulate = Dispatcher("asm_gemm_emulate", reference="lrkern.reference.asm_gemm:asm_gemm_emulate",
                      triton="lrkern.kernels.asm_gemm:asm_gemm_emulate", cpp="lrkern.ops._cpp:asm_gemm_emulate")
_fast = Dispatcher("asm_gemm", reference="lrkern.reference.asm_gemm:asm_gemm",
                   triton="lrkern.kernels.asm_gemm:asm_gemm", cpp="lrkern.ops._cpp:asm_gemm")

INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# The accumulator bound: K * r_max * (2^a_bits - 1) < 2^30 keeps every partial sum, and the offset and plane terms of
# the fast path, inside int32 with margin (spec 3.4).
ACC_BOUND = 2**30


def max_k(r: int, a_bits: int) -> int:
    """Largest K with K * r * (2^a_bits - 1) < 2^30 (r: the largest weight magnitude)."""
    return (ACC_BOUND - 1) // (r * (2**a_bits - 1))


def _r_max(alphabet: tuple[int, ...], w_bits: int) -> int:
    """The alphabet's largest magnitude (as ``lrkern.asm.alphabet.r_max``) in plain Python, so the fake impl creates
    no tensor (under FakeTensorMode a tensor built there would be fake and could not be read)."""
    q = max(representable_quartets(alphabet))
    return q if w_bits == 4 else 17 * q  # R8 = {16 h + l}: largest 16 q + q


def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected an integer dtype "
                        f"({', '.join(str(d).removeprefix('torch.') for d in INT_DTYPES)})")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({'[M, K]' if name == 'x_int' else '[N, K]'}), got shape "
                         f"{tuple(t.shape)}")
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} is on {t.device}; accepted devices: {', '.join(DEVICE_TYPES)}")


def _check_static(x_int, w_int, w_bits, a_bits, r: int, what: str) -> None:
    """Checks that need no data (also run by the fake impls)."""
    _tensor("x_int", x_int)
    _tensor("w_int", w_int)
    if x_int.shape[1] != w_int.shape[1]:
        raise ValueError(f"x_int [M, K] and w_int [N, K] must share K, got {tuple(x_int.shape)} and "
                         f"{tuple(w_int.shape)}")
    same_device(x_int=x_int, w_int=w_int)
    k = x_int.shape[1]
    if k * r * (2**a_bits - 1) >= ACC_BOUND:
        raise ValueError(f"K={k} is too large for an exact int32 accumulator: K * r_max * (2^a_bits - 1) = {k} * {r} * "
                         f"{2**a_bits - 1} = {k * r * (2**a_bits - 1)} must be < 2^30 ({what}, a_bits={a_bits}); "
                         f"the largest K here is {max_k(r, a_bits)}: split K and sum the int32 results")


def _first(mask: torch.Tensor, values: torch.Tensor) -> tuple[int, int]:
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    return flat, int(values.reshape(-1)[flat])


def _check_values(x_int: torch.Tensor, w_int: torch.Tensor, w_bits: int, a_bits: int) -> None:
    """Data-dependent range checks: one aminmax pass per operand; the offending element is located only on error."""
    hi = 2**a_bits - 1
    if x_int.numel():
        lo_v, hi_v = torch.aminmax(x_int)
        if int(lo_v) < 0 or int(hi_v) > hi:
            x64 = x_int.to(torch.int64)
            flat, v = _first((x64 < 0) | (x64 > hi), x64)
            raise ValueError(f"x_int must hold unsigned activations in [0, 2^a_bits - 1] = [0, {hi}] "
                             f"(a_bits={a_bits}); got {v} at flat index {flat}")
    if w_int.numel():
        wmax = 2**w_bits - 1
        lo_v, hi_v = torch.aminmax(w_int)
        if int(lo_v) < -wmax or int(hi_v) > wmax:
            w64 = w_int.to(torch.int64)
            flat, v = _first(w64.abs() > wmax, w64)
            raise ValueError(f"w_int must satisfy |w_int| <= 2^w_bits - 1 = {wmax} (w_bits={w_bits}); got {v} at "
                             f"flat index {flat}")


def _check_alphabet(w_int: torch.Tensor, alphabet: tuple[int, ...], w_bits: int) -> None:
    """Every quartet of every |w| must be 0 or a << s with a in the alphabet; names the first weight that is not."""
    if not w_int.numel():
        return
    m = w_int.to(torch.int32).abs()
    table = code_table(alphabet).to(w_int.device)
    for i in range(w_bits // 4):
        bad = table[(m >> (4 * i)) & 15] < 0
        if bool(bad.any()):
            flat, v = _first(bad, w_int)
            q = (abs(v) >> (4 * i)) & 15
            raise ValueError(f"w_int holds {v} at flat index {flat}, whose quartet {i} = {q} alphabet "
                             f"{list(alphabet)} cannot represent (project the weights with asm_project first)")


def _kernel_dtypes(x_int: torch.Tensor, w_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dtypes the kernels take: x uint8/int16/int32 (values already range-checked), w int16; contiguous."""
    if x_int.dtype == torch.int8:
        x_int = x_int.to(torch.int16)
    elif x_int.dtype == torch.int64:
        x_int = x_int.to(torch.int32)
    if w_int.dtype != torch.int16:
        w_int = w_int.to(torch.int16)
    return x_int.contiguous(), w_int.contiguous()


def _empty_result(x_int: torch.Tensor, w_int: torch.Tensor):
    m, k = x_int.shape
    n = w_int.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=x_int.device)
    return None


@torch.library.custom_op("lrkern::asm_gemm_emulate", mutates_args=())
def asm_gemm_emulate(x_int: torch.Tensor, w_int: torch.Tensor, alphabet: list[int], w_bits: int,
                     a_bits: int) -> torch.Tensor:
    """int32 [M, N] = x_int [M, K] @ w_int [N, K]^T through the bit-exact ASM shift-add datapath.

    alphabet: the sorted alphabet set (odd ints in 1..15 containing 1), e.g. [1, 3, 5, 7]; w_bits 4 or 8 (weight
    magnitude bits, sign excluded); a_bits 4 or 8 (unsigned activation bits).

    Example:
        >>> acc = torch.ops.lrkern.asm_gemm_emulate(x_int, w_int, [1, 3, 5, 7], 4, 4)
    """
    alpha = parse_alphabet(alphabet)
    w_bits, a_bits = check_w_bits(w_bits), check_a_bits(a_bits)
    _check_static(x_int, w_int, w_bits, a_bits, _r_max(alpha, w_bits), f"alphabet {list(alpha)}, w_bits={w_bits}")
    _check_values(x_int, w_int, w_bits, a_bits)
    _check_alphabet(w_int, alpha, w_bits)
    empty = _empty_result(x_int, w_int)
    if empty is not None:
        return empty
    x, w = _kernel_dtypes(x_int, w_int)
    return _emulate(x.device, x, w, list(alpha), w_bits, a_bits)


@asm_gemm_emulate.register_fake
def _(x_int, w_int, alphabet, w_bits, a_bits):
    alpha = parse_alphabet(alphabet)
    w_bits, a_bits = check_w_bits(w_bits), check_a_bits(a_bits)
    _check_static(x_int, w_int, w_bits, a_bits, _r_max(alpha, w_bits), f"alphabet {list(alpha)}, w_bits={w_bits}")
    return x_int.new_empty((x_int.shape[0], w_int.shape[0]), dtype=torch.int32)


@torch.library.custom_op("lrkern::asm_gemm", mutates_args=())
def asm_gemm(x_int: torch.Tensor, w_int: torch.Tensor, w_bits: int, a_bits: int) -> torch.Tensor:
    """int32 [M, N] = x_int [M, K] @ w_int [N, K]^T, the exact fast path (int8 x int8 -> int32 GEMM).

    Bit-identical to ``asm_gemm_emulate`` for weights that the alphabet represents. The overflow bound uses
    r_max = 2^w_bits - 1 (the op takes no alphabet).

    Example:
        >>> acc = torch.ops.lrkern.asm_gemm(x_int, w_int, 4, 4)
    """
    w_bits, a_bits = check_w_bits(w_bits), check_a_bits(a_bits)
    _check_static(x_int, w_int, w_bits, a_bits, 2**w_bits - 1, f"r_max = 2^w_bits - 1, w_bits={w_bits}")
    _check_values(x_int, w_int, w_bits, a_bits)
    empty = _empty_result(x_int, w_int)
    if empty is not None:
        return empty
    x, w = _kernel_dtypes(x_int, w_int)
    return _fast(x.device, x, w, w_bits, a_bits)


@asm_gemm.register_fake
def _(x_int, w_int, w_bits, a_bits):
    w_bits, a_bits = check_w_bits(w_bits), check_a_bits(a_bits)
    _check_static(x_int, w_int, w_bits, a_bits, 2**w_bits - 1, f"r_max = 2^w_bits - 1, w_bits={w_bits}")
    return x_int.new_empty((x_int.shape[0], w_int.shape[0]), dtype=torch.int32)


__all__ = ["asm_gemm_emulate", "asm_gemm", "max_k", "ACC_BOUND"]
