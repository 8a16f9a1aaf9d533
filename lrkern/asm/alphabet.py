"""Alphabet sets for Alphabet Set Multipliers (ASM), spec asm.md section 3.1-3.3.

An alphabet set A is a set of odd integers in 1..15 containing 1. A weight magnitude m (w_bits = 4 or 8 magnitude bits,
sign stored apart) is split into Q = w_bits // 4 quartets m = sum_i q_i * 16^i; a quartet is representable iff q == 0
or q = a << s with a in A (a = odd part of q, s = its trailing zeros). For 8-bit weights both quartets are constrained:
R8 = {16h + l : h, l representable quartets}.

The projection P_A(u) = r_j with j = #{t_j < u} over the midpoints t_j = (r_j + r_{j+1}) / 2 of the sorted
representable magnitudes r (nearest value, ties to the smaller magnitude, saturating at r_max) is implemented by the
op ``lrkern::asm_project``; this module holds the integer tables and the code format of ``lrkern::asm_decompose``:
uint8 per quartet, bit 7 = nonzero flag, bits 4..6 = index into the sorted alphabet, bits 0..3 = shift s, so that
q = alphabet[idx] << s. :func:`asm_compose` is its inverse.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

ALPHABETS: dict[str, tuple[int, ...]] = {
    "1": (1,),
    "13": (1, 3),
    "1357": (1, 3, 5, 7),
    "odd": (1, 3, 5, 7, 9, 11, 13, 15),
}


def parse_alphabet(alphabet) -> tuple[int, ...]:
    """Name of :data:`ALPHABETS` or an iterable of ints -> the sorted tuple (validated).

    Raises ValueError naming ``alphabet`` unless every element is an odd int in 1..15, 1 is included and there are no
    duplicates.
    """
    if isinstance(alphabet, str):
        if alphabet not in ALPHABETS:
            raise ValueError(f"alphabet: unknown alphabet set name {alphabet!r}; expected one of {sorted(ALPHABETS)} "
                             f"or an iterable of odd ints in 1..15 containing 1")
        return ALPHABETS[alphabet]
    if isinstance(alphabet, torch.Tensor):
        alphabet = alphabet.tolist()
    try:
        items = list(alphabet)
    except TypeError:
        raise ValueError(f"alphabet: expected a set name or an iterable of ints, got {type(alphabet).__name__}") \
            from None
    vals = []
    for a in items:
        if isinstance(a, bool):
            raise ValueError(f"alphabet: elements must be ints, got {a!r} in {items!r}")
        try:
            a = operator.index(a)  # int, numpy integer, 0-dim integer tensor
        except TypeError:
            raise ValueError(f"alphabet: elements must be ints, got {a!r} in {items!r}") from None
        vals.append(int(a))
    if not vals:
        raise ValueError("alphabet: must not be empty (it must contain 1)")
    bad = [a for a in vals if a < 1 or a > 15 or a % 2 == 0]
    if bad:
        raise ValueError(f"alphabet: elements must be odd ints in 1..15, got {bad} in {vals}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"alphabet: duplicate elements in {vals}")
    if 1 not in vals:
        raise ValueError(f"alphabet: must contain 1, got {vals}")
    return tuple(sorted(vals))


def check_w_bits(w_bits) -> int:
    """4 or 8 (magnitude bits of the weight, sign excluded), else ValueError naming ``w_bits``."""
    if isinstance(w_bits, bool) or not isinstance(w_bits, int) or w_bits not in (4, 8):
        raise ValueError(f"w_bits: must be 4 or 8 (magnitude bits, sign excluded), got {w_bits!r}")
    return int(w_bits)


def check_a_bits(a_bits) -> int:
    """4 or 8 (unsigned activation bits), else ValueError naming ``a_bits``."""
    if isinstance(a_bits, bool) or not isinstance(a_bits, int) or a_bits not in (4, 8):
        raise ValueError(f"a_bits: must be 4 or 8 (unsigned activation bits), got {a_bits!r}")
    return int(a_bits)


def _odd_part(q: int) -> tuple[int, int]:
    s = 0
    while q % 2 == 0:
        q //= 2
        s += 1
    return q, s


def representable_quartets(alphabet) -> tuple[int, ...]:
    """Sorted quartet values q in 0..15 with q == 0 or q = a << s, a in the alphabet."""
    alpha = parse_alphabet(alphabet)
    out = {0}
    for a in alpha:
        s = 0
        while (a << s) <= 15:
            out.add(a << s)
            s += 1
    return tuple(sorted(out))


def representable_magnitudes(alphabet, w_bits) -> torch.Tensor:
    """int64 tensor, sorted ascending: R4 = the quartets, R8 = {16h + l : h, l representable quartets}."""
    w_bits = check_w_bits(w_bits)
    quart = representable_quartets(alphabet)
    if w_bits == 4:
        vals = list(quart)
    else:
        vals = sorted(16 * h + lo for h in quart for lo in quart)
    return torch.tensor(vals, dtype=torch.int64)


def r_max(alphabet, w_bits) -> int:
    """Largest representable magnitude (8/12/14/15 for 4-bit, 136/204/238/255 for 8-bit standard sets)."""
    return int(representable_magnitudes(alphabet, w_bits)[-1])


def midpoints(alphabet, w_bits) -> torch.Tensor:
    """float64 t_j = (r_j + r_{j+1}) / 2 (multiples of 0.5 below 256, exact in fp32 too)."""
    r = representable_magnitudes(alphabet, w_bits).to(torch.float64)
    return (r[:-1] + r[1:]) / 2


def quartet_code(q: int, alphabet) -> int:
    """Code byte of one quartet value (see the module docstring); ValueError if q is not representable."""
    alpha = parse_alphabet(alphabet)
    if q == 0:
        return 0
    if not 0 < q <= 15:
        raise ValueError(f"quartet {q} out of range 0..15")
    a, s = _odd_part(q)
    if a not in alpha:
        raise ValueError(f"quartet {q} = {a} << {s} is not representable under alphabet {alpha}")
    return 0x80 | (alpha.index(a) << 4) | s


def code_table(alphabet) -> torch.Tensor:
    """int16 [16]: code byte of each quartet value 0..15, -1 where not representable."""
    alpha = parse_alphabet(alphabet)
    tab = []
    for q in range(16):
        try:
            tab.append(quartet_code(q, alpha))
        except ValueError:
            tab.append(-1)
    return torch.tensor(tab, dtype=torch.int16)


def asm_compose(codes: torch.Tensor, sign: torch.Tensor, alphabet) -> torch.Tensor:
    """Inverse of ``lrkern::asm_decompose``: codes uint8 [..., Q] and the sign (any tensor of shape [...], e.g. w_int
    itself or torch.sign(w_int); only its sign is used) -> int16 w_int = sign * sum_i (alphabet[idx_i] << s_i) * 16^i.
    """
    alpha = parse_alphabet(alphabet)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes: expected uint8, got {codes.dtype}")
    if codes.dim() < 1 or codes.shape[-1] not in (1, 2):
        raise ValueError(f"codes: last dimension must be Q = 1 or 2 quartets, got shape {tuple(codes.shape)}")
    if tuple(sign.shape) != tuple(codes.shape[:-1]):
        raise ValueError(f"sign: shape {tuple(sign.shape)} must equal codes.shape[:-1] = {tuple(codes.shape[:-1])}")
    c = codes.to(torch.int64)
    flag = (c >> 7) & 1
    idx = (c >> 4) & 7
    s = c & 15
    if bool((idx >= len(alpha)).logical_and(flag == 1).any()):
        raise ValueError(f"codes: alphabet index out of range for alphabet {alpha}")
    table = torch.tensor(alpha + (0,) * (8 - len(alpha)), dtype=torch.int64, device=codes.device)
    q = flag * (table[idx] << s)
    weights = torch.tensor([1, 16], dtype=torch.int64, device=codes.device)[: codes.shape[-1]]
    m = (q * weights).sum(-1)
    return (torch.sign(sign).to(torch.int64) * m).to(torch.int16)


class KernelTables(NamedTuple):
    """Small lookup tables the kernels read (every table padded to a fixed size, so launches specialise on w_bits
    only): mid fp32 [256] (midpoints, +inf past the n - 1 real ones), delta int32 [256] (r_{j+1} - r_j, 0 past
    them), mag int32 [256] (r_j, r_max past them), code int32 [16] (code byte of each quartet value, -1 where not
    representable)."""
    mid: torch.Tensor
    delta: torch.Tensor
    mag: torch.Tensor
    code: torch.Tensor
    n_mid: int
    r_max: int


_TABLES: dict = {}


def kernel_tables(alphabet, w_bits, device) -> KernelTables:
    """Cached :class:`KernelTables` for (alphabet, w_bits) on ``device``."""
    alpha = parse_alphabet(alphabet)
    w_bits = check_w_bits(w_bits)
    device = torch.device(device)
    key = (alpha, w_bits, str(device))
    tab = _TABLES.get(key)
    if tab is None:
        r = representable_magnitudes(alpha, w_bits)
        n = r.numel()
        mid = torch.full((256,), float("inf"), dtype=torch.float32)
        mid[: n - 1] = midpoints(alpha, w_bits).to(torch.float32)  # multiples of 0.5 below 256: exact
        delta = torch.zeros(256, dtype=torch.int32)
        delta[: n - 1] = (r[1:] - r[:-1]).to(torch.int32)
        mag = torch.full((256,), int(r[-1]), dtype=torch.int32)
        mag[:n] = r.to(torch.int32)
        code = code_table(alpha).to(torch.int32)
        tab = KernelTables(mid.to(device), delta.to(device), mag.to(device), code.to(device), n - 1, int(r[-1]))
        _TABLES[key] = tab
    return tab


__all__ = [
    "ALPHABETS", "parse_alphabet", "check_w_bits", "check_a_bits", "representable_quartets",
    "representable_magnitudes", "r_max", "midpoints", "quartet_code", "code_table", "asm_compose",
    "KernelTables", "kernel_tables",
]
