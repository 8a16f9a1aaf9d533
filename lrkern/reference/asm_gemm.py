"""References of the two ASM GEMMs (spec asm.md 3.1, 3.4, section 4 items 3-4), in int64 PyTorch.

``gemm_int64``: acc[m, n] = sum_k x[m, k] * w[n, k], computed in int64 and returned as int32 after a range check.
It is the reference of ``lrkern::asm_gemm`` (the fast path) and the oracle of every test.

``asm_gemm_emulate``: the shift-add datapath step by step. For each input x[m, k] a pre-computer bank holds x * a
for every a in the alphabet, built with shifts and adds only (3x = (x<<1)+x, 5x = (x<<2)+x, 7x = (x<<3)-x,
9x = (x<<3)+x, 11x = (x<<3)+3x, 13x = (x<<3)+5x, 15x = (x<<4)-x). Each weight magnitude |w| is split into quartets
q_i (|w| = sum_i q_i 16^i), each quartet into (alphabet index, shift s) with q_i = alphabet[index] << s (or q_i = 0).
The product is sum_i bank[index_i] << (s_i + 4i), the sign is applied, and the products are accumulated. A quartet that
the alphabet cannot represent raises ValueError naming the weight.
"""
from __future__ import annotations

import torch

from lrkern.asm.alphabet import check_w_bits, code_table, parse_alphabet

INT32_MAX = 2**31 - 1


def _to_int32(acc: torch.Tensor) -> torch.Tensor:
    if acc.numel() and int(acc.abs().max()) > INT32_MAX:
        raise OverflowError(f"accumulator out of the int32 range (max |acc| = {int(acc.abs().max())})")
    return acc.to(torch.int32)


def gemm_int64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = x [M, K] @ w [N, K]^T in int64 (exact), range-checked before the conversion to int32."""
    x64, w64 = x.to(torch.int64), w.to(torch.int64)
    if x64.device.type == "cuda":  # no int64 matmul kernel on CUDA: exact in fp64 under the op's bound (< 2^30)
        acc = (x64.double() @ w64.double().T).round().to(torch.int64)
    else:
        acc = x64 @ w64.T
    return _to_int32(acc)


def asm_gemm(x: torch.Tensor, w: torch.Tensor, w_bits: int, a_bits: int) -> torch.Tensor:
    """Reference of ``lrkern::asm_gemm``: the int64 GEMM."""
    return gemm_int64(x, w)


def bank(x: torch.Tensor, alphabet) -> dict[int, torch.Tensor]:
    """{a: x * a} for every a in the alphabet, built by shift-add exactly as the pre-computer does (x int64)."""
    alpha = parse_alphabet(alphabet)
    x = x.to(torch.int64)
    x3 = (x << 1) + x
    x5 = (x << 2) + x
    table = {1: x, 3: x3, 5: x5, 7: (x << 3) - x, 9: (x << 3) + x, 11: (x << 3) + x3, 13: (x << 3) + x5,
             15: (x << 4) - x}
    return {a: table[a] for a in alpha}


def decompose(w: torch.Tensor, alphabet, w_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, shift, nonzero), each int64 [*w.shape, Q]: quartet i of |w| is alphabet[index] << shift, or 0 where
    nonzero is 0 (index and shift are 0 there). ValueError naming the first weight whose quartet is not representable
    (or whose magnitude exceeds 2^w_bits - 1)."""
    alpha = parse_alphabet(alphabet)
    w_bits = check_w_bits(w_bits)
    q_count = w_bits // 4
    m = w.to(torch.int64).abs()
    over = m > 2**w_bits - 1
    if bool(over.any()):
        flat = int(over.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"w_int: |w| = {int(m.reshape(-1)[flat])} at flat index {flat} exceeds 2^w_bits - 1 = "
                         f"{2**w_bits - 1} (w_bits={w_bits})")
    quartets = torch.stack([(m >> (4 * i)) & 15 for i in range(q_count)], dim=-1)
    codes = code_table(alpha).to(torch.int64).to(w.device)[quartets]
    bad = codes < 0
    if bool(bad.any()):
        flat_q = int(bad.reshape(-1).nonzero()[0, 0])
        flat, i = divmod(flat_q, q_count)
        raise ValueError(f"w_int: weight {int(w.reshape(-1)[flat])} at flat index {flat} has quartet {i} = "
                         f"{int(quartets.reshape(-1)[flat_q])}, which alphabet {list(alpha)} cannot represent")
    nonzero = (codes >> 7) & 1
    index = (codes >> 4) & 7
    shift = codes & 15
    return index, shift, nonzero


def asm_gemm_emulate(x: torch.Tensor, w: torch.Tensor, alphabet, w_bits: int, a_bits: int,
                     chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Reference of ``lrkern::asm_gemm_emulate``: int32 [M, N] through bank, select, shift, add, sign, accumulate.

    x [M, K] non-negative integers, w [N, K] signed integers. Outputs are processed in chunks of N so that the
    [M, n, K] intermediate holds at most ``chunk_elems`` elements.
    """
    alpha = parse_alphabet(alphabet)
    w_bits = check_w_bits(w_bits)
    q_count = w_bits // 4
    m_rows, k = x.shape
    n_rows = w.shape[0]
    index, shift, nonzero = decompose(w, alpha, w_bits)  # [N, K, Q]
    b = bank(x, alpha)
    bank_t = torch.stack([b[a] for a in alpha], dim=-1)  # [M, K, |A|]: the bank of input x[m, k]
    negative = w.to(torch.int64) < 0  # [N, K]
    acc = torch.zeros(m_rows, n_rows, dtype=torch.int64, device=x.device)
    kk = torch.arange(k, device=x.device)
    step = max(1, chunk_elems // max(1, m_rows * k))
    for n0 in range(0, n_rows, step):
        n1 = min(n_rows, n0 + step)
        prod = torch.zeros(m_rows, n1 - n0, k, dtype=torch.int64, device=x.device)
        for i in range(q_count):
            sel = bank_t[:, kk[None, :], index[n0:n1, :, i]]  # [M, n, K]: the select (mux) from the bank
            term = sel << (shift[n0:n1, :, i] + 4 * i)  # shift by s + 4i
            prod += term * nonzero[n0:n1, :, i]  # a zero quartet adds nothing
        prod = torch.where(negative[n0:n1], -prod, prod)  # the sign
        acc[:, n0:n1] = prod.sum(dim=-1)  # accumulate
    return _to_int32(acc)


__all__ = ["gemm_int64", "asm_gemm", "asm_gemm_emulate", "bank", "decompose"]
