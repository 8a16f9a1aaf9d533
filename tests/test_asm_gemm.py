"""lrkern::asm_gemm_emulate and lrkern::asm_gemm: bit-exact (torch.equal) against the int64 reference GEMM on every
backend, for every alphabet set, w_bits 4/8, a_bits 4/8, odd shapes and K not a multiple of any block, the extreme
values, K at the overflow bound (and one past it raising); the reference datapath's building blocks; a cross-check
of the fast path's offset/plane algebra with torch._int_mm; the shared epilogue; opcheck; errors naming the argument.
"""
import pytest
import torch

from lrkern.asm.alphabet import ALPHABETS, r_max, representable_magnitudes
from lrkern.asm.epilogue import asm_epilogue
from lrkern.ops.asm_gemm import max_k
from lrkern.reference import asm_gemm as R

SETS = list(ALPHABETS)  # "1", "13", "1357", "odd"
# (M, K, N): single elements, odd sizes, K past the C++ slice (256) and the interpreter's Triton K tile (256 / 64),
# M past the C++ row tile (8), N = 1.
SHAPES = [(1, 1, 1), (1, 5, 3), (5, 13, 7), (9, 67, 1), (17, 300, 9)]


def _weights(alphabet, w_bits, n, k, device="cpu", gen=None):
    """Random representable w_int [N, K] int16 (zeros included, both signs)."""
    r = representable_magnitudes(alphabet, w_bits)
    mag = r[torch.randint(0, len(r), (n, k), generator=gen)]
    sign = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
    return (mag * sign).to(torch.int16).to(device)


def _acts(a_bits, m, k, dtype=torch.uint8, device="cpu"):
    return torch.randint(0, 2**a_bits, (m, k)).to(dtype).to(device)


def _both(x, w, alphabet, w_bits, a_bits):
    emu = torch.ops.lrkern.asm_gemm_emulate(x, w, list(ALPHABETS[alphabet]), w_bits, a_bits)
    fast = torch.ops.lrkern.asm_gemm(x, w, w_bits, a_bits)
    return emu, fast


def _assert_exact(out, ref):
    assert out.dtype == torch.int32 and out.shape == ref.shape
    assert torch.equal(out.cpu(), ref.cpu()), f"max |diff| = {(out.cpu().long() - ref.cpu().long()).abs().max()}"


# --------------------------------------------------------------------------------------------- reference datapath
def test_bank_is_built_by_shift_add_and_equals_x_times_a():
    x = torch.arange(256, dtype=torch.int64)
    bank = R.bank(x, ALPHABETS["odd"])
    assert sorted(bank) == [1, 3, 5, 7, 9, 11, 13, 15]
    for a, v in bank.items():
        assert torch.equal(v, x * a), a
    assert sorted(R.bank(x, [1, 11])) == [1, 11]


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("alphabet", SETS)
def test_decompose_recomposes_every_representable_magnitude(alphabet, w_bits):
    alpha = ALPHABETS[alphabet]
    r = representable_magnitudes(alphabet, w_bits)
    w = torch.cat([r, -r])
    index, shift, nonzero = R.decompose(w, alpha, w_bits)
    table = torch.tensor(alpha)
    quartets = (table[index] << shift) * nonzero
    mag = sum(quartets[:, i] << (4 * i) for i in range(w_bits // 4))
    assert torch.equal(mag, w.abs())


def test_reference_emulation_raises_naming_the_weight():
    w = torch.tensor([[1, 2, 5]], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"w_int: weight 5 at flat index 2 has quartet 0 = 5"):
        R.asm_gemm_emulate(torch.ones(1, 3, dtype=torch.uint8), w, [1, 3], 4, 4)
    w = torch.tensor([[16 * 9 + 1]], dtype=torch.int16)  # high quartet 9 under {1,3,5,7}
    with pytest.raises(ValueError, match=r"quartet 1 = 9"):
        R.asm_gemm_emulate(torch.ones(1, 1, dtype=torch.uint8), w, [1, 3, 5, 7], 8, 8)


# --------------------------------------------------------------------------------------------- every backend exact
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("alphabet", SETS)
def test_emulate_equals_fast_equals_int64_reference(backend, device, alphabet, w_bits, a_bits, shape):
    m, k, n = shape
    x = _acts(a_bits, m, k, device=device)
    w = _weights(alphabet, w_bits, n, k, device=device)
    ref = R.gemm_int64(x.cpu(), w.cpu())
    emu, fast = _both(x, w, alphabet, w_bits, a_bits)
    _assert_exact(emu, ref)
    _assert_exact(fast, ref)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64],
                         ids=["u8", "i8", "i16", "i32", "i64"])
def test_activation_and_weight_dtypes(backend, device, dtype):
    a_bits = 4 if dtype == torch.int8 else 8  # int8 holds 0..127 only
    x = _acts(a_bits, 6, 41, dtype=dtype, device=device)
    w = _weights("1357", 8, 5, 41, device=device)
    ref = R.gemm_int64(x.cpu(), w.cpu())
    for wd in (torch.int16, torch.int32):
        emu, fast = _both(x, w.to(wd), "1357", 8, a_bits)
        _assert_exact(emu, ref)
        _assert_exact(fast, ref)


@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("alphabet", SETS)
def test_extreme_values(backend, device, alphabet, w_bits, a_bits):
    """Max activations against +-r_max weights, zero rows and columns, and the sign pattern at the extremes."""
    m, k, n = 7, 300, 6
    rm, amax = r_max(alphabet, w_bits), 2**a_bits - 1
    x = torch.full((m, k), amax, dtype=torch.uint8)
    x[1] = 0  # a zero activation row
    x[2, ::2] = 0
    w = torch.full((n, k), rm, dtype=torch.int16)
    w[1] = -rm
    w[2] = 0  # a zero weight row
    w[3, 1::2] = -rm
    w[4, ::3] = 0
    w[5] = _weights(alphabet, w_bits, 1, k)[0]
    x, w = x.to(device), w.to(device)
    ref = R.gemm_int64(x.cpu(), w.cpu())
    assert int(ref[0, 0]) == k * rm * amax and int(ref[0, 1]) == -k * rm * amax
    emu, fast = _both(x, w, alphabet, w_bits, a_bits)
    _assert_exact(emu, ref)
    _assert_exact(fast, ref)


@pytest.mark.parametrize("op", ["asm_gemm", "asm_gemm_emulate"])
def test_k_at_the_overflow_bound_and_one_past(backend, device, op):
    """W8A8 at the largest K the bound allows (fast path: r_max = 255, K = 16512; emulation under {1,3,5,7}:
    r_max = 238, K = 17692), with every product at its extreme; one more K raises naming K (eager and fake)."""
    a_bits, w_bits = 8, 8
    alphabet = list(ALPHABETS["1357"])
    rm = 255 if op == "asm_gemm" else r_max(alphabet, w_bits)
    k = max_k(rm, a_bits)
    assert k * rm * 255 < 2**30 <= (k + 1) * rm * 255
    if op == "asm_gemm":
        assert k == 16512  # spec 3.4: W8A8 K <= 16,512

    def call(x, w):
        if op == "asm_gemm":
            return torch.ops.lrkern.asm_gemm(x, w, w_bits, a_bits)
        return torch.ops.lrkern.asm_gemm_emulate(x, w, alphabet, w_bits, a_bits)

    x = torch.full((2, k), 255, dtype=torch.uint8, device=device)
    x[1, ::2] = 0
    w = torch.full((3, k), rm, dtype=torch.int16, device=device)
    w[1] = -rm
    w[2, ::2] = -rm
    out = call(x, w)
    ref = R.gemm_int64(x.cpu(), w.cpu())
    assert int(ref[0, 0]) == k * rm * 255
    _assert_exact(out, ref)
    x1 = torch.zeros((2, k + 1), dtype=torch.uint8, device=device)
    w1 = torch.zeros((3, k + 1), dtype=torch.int16, device=device)
    with pytest.raises(ValueError, match=rf"K={k + 1} is too large"):
        call(x1, w1)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xf = torch.empty((2, k + 1), dtype=torch.uint8, device=device)
        wf = torch.empty((3, k + 1), dtype=torch.int16, device=device)
        with pytest.raises(ValueError, match=rf"K={k + 1} is too large"):
            call(xf, wf)


def test_w4a4_bound_allows_long_k():
    assert max_k(15, 4) == (2**30 - 1) // 225  # about 4.7 million (spec 3.4)
    assert max_k(15, 4) > 4_700_000


def test_empty_shapes(backend, device):
    for m, k, n in [(0, 4, 3), (2, 0, 3), (2, 4, 0)]:
        x = torch.zeros((m, k), dtype=torch.uint8, device=device)
        w = torch.zeros((n, k), dtype=torch.int16, device=device)
        for out in _both(x, w, "13", 4, 4):
            assert out.dtype == torch.int32 and out.shape == (m, n) and not out.any()


# --------------------------------------------------------------------------------------- fast-path algebra, oracle
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_fast_path_algebra_against_torch_int_mm(device, w_bits, a_bits):
    """The offset and plane decomposition of the fast path, evaluated with torch._int_mm (int8 x int8 -> int32),
    equals the op. Shapes meet _int_mm's CUDA limits (M > 16, K and N multiples of 8)."""
    m, k, n = 32, 64, 24
    x = _acts(a_bits, m, k, device=device)
    w = _weights("odd", w_bits, n, k, device=device)
    x8 = (x.to(torch.int32) - (128 if a_bits == 8 else 0)).to(torch.int8)
    mag, neg = w.to(torch.int32).abs(), w < 0
    if w_bits == 8:
        hi = torch.where(neg, -(mag >> 4), mag >> 4).to(torch.int8)
        lo = torch.where(neg, -(mag & 15), mag & 15).to(torch.int8)
        acc = 16 * torch._int_mm(x8, hi.t().contiguous()) + torch._int_mm(x8, lo.t().contiguous())
    else:
        acc = torch._int_mm(x8, w.to(torch.int8).t().contiguous())
    if a_bits == 8:
        acc = acc + 128 * w.to(torch.int32).sum(1, dtype=torch.int32)[None, :]
    _assert_exact(acc, R.gemm_int64(x.cpu(), w.cpu()))
    _assert_exact(torch.ops.lrkern.asm_gemm(x, w, w_bits, a_bits), acc)


# -------------------------------------------------------------------------------------------------------- epilogue
def test_epilogue_order_and_scalar_forms(device):
    acc = torch.randint(-(2**26), 2**26, (5, 4), dtype=torch.int32, device=device)  # past 2^24: conversion rounds
    s_w = torch.rand(4, device=device) * 0.01
    bias = torch.randn(4, device=device)
    s_x = 0.0123
    y = asm_epilogue(acc, s_x, s_w, bias)
    want = (torch.tensor(s_x, dtype=torch.float32, device=device) * s_w) * acc.float() + bias
    assert y.dtype == torch.float32 and torch.equal(y, want)
    assert torch.equal(asm_epilogue(acc, torch.tensor(s_x), s_w, bias), y)  # 0-dim tensor gives the same floats
    no_bias = (torch.tensor(s_x, dtype=torch.float32, device=device) * s_w) * acc.float()
    assert torch.equal(asm_epilogue(acc, s_x, s_w), no_bias)
    with pytest.raises(TypeError, match="acc must be an int32"):
        asm_epilogue(acc.float(), s_x, s_w)
    with pytest.raises(ValueError, match="s_w must be an fp32 tensor of shape"):
        asm_epilogue(acc, s_x, s_w[:3])


# --------------------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    x8 = _acts(8, 5, 37, device=device)
    x4 = _acts(4, 3, 20, dtype=torch.int16, device=device)
    return [
        ("asm_gemm", (x8, _weights("odd", 8, 6, 37, device=device), 8, 8)),
        ("asm_gemm", (x4, _weights("13", 4, 2, 20, device=device), 4, 4)),
        ("asm_gemm_emulate", (x8, _weights("1357", 8, 6, 37, device=device), [1, 3, 5, 7], 8, 8)),
        ("asm_gemm_emulate", (x4, _weights("1", 4, 2, 20, device=device), [1], 4, 4)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(backend, device, case):
    name, args = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.lrkern, name).default, args)


# ---------------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    w = _weights("13", 4, 2, 8)
    gemm, emu = torch.ops.lrkern.asm_gemm, torch.ops.lrkern.asm_gemm_emulate
    with pytest.raises(TypeError, match=r"x_int has dtype torch.float32; expected an integer dtype"):
        gemm(x.float(), w, 4, 4)
    with pytest.raises(TypeError, match=r"x_int has dtype torch.float16"):
        emu(x.half(), w, [1, 3], 4, 4)
    with pytest.raises(TypeError, match=r"w_int has dtype torch.float32"):
        gemm(x, w.float(), 4, 4)
    with pytest.raises(ValueError, match=r"x_int must be 2-D"):
        gemm(x[0], w, 4, 4)
    with pytest.raises(ValueError, match=r"must share K"):
        gemm(x, w[:, :5], 4, 4)
    xb = x.clone()
    xb[1, 2] = 16
    with pytest.raises(ValueError, match=r"x_int must hold unsigned activations in \[0, 2\^a_bits - 1\] = \[0, 15\] "
                                         r"\(a_bits=4\); got 16 at flat index 10"):
        gemm(xb, w, 4, 4)
    with pytest.raises(ValueError, match=r"x_int .* got -1 at flat index 0"):
        emu(torch.full((1, 8), -1, dtype=torch.int16), w, [1, 3], 4, 8)
    wb = w.clone()
    wb[1, 3] = -16
    with pytest.raises(ValueError, match=r"w_int must satisfy \|w_int\| <= 2\^w_bits - 1 = 15 \(w_bits=4\); got -16 "
                                         r"at flat index 11"):
        gemm(x, wb, 4, 4)
    wb = w.clone()
    wb[0, 5] = 5
    with pytest.raises(ValueError, match=r"w_int holds 5 at flat index 5, whose quartet 0 = 5 alphabet \[1, 3\]"):
        emu(x, wb, [1, 3], 4, 4)
    assert torch.equal(gemm(x, wb, 4, 4), R.gemm_int64(x, wb))  # the fast path takes any in-range integer
    with pytest.raises(ValueError, match=r"w_bits: must be 4 or 8"):
        gemm(x, w, 6, 4)
    with pytest.raises(ValueError, match=r"a_bits: must be 4 or 8"):
        emu(x, w, [1, 3], 4, 2)
    with pytest.raises(ValueError, match=r"alphabet: must contain 1"):
        emu(x, w, [3, 5], 4, 4)
    with pytest.raises(ValueError, match=r"alphabet: elements must be odd"):
        emu(x, w, [1, 2], 4, 4)
    k = max_k(238, 8) + 1  # {1,3,5,7}, W8A8: r_max = 238
    with pytest.raises(ValueError, match=rf"K={k} is too large .* = {k} \* 238 \* 255 = .* the largest K here is "
                                         rf"{k - 1}"):
        emu(torch.zeros((1, k), dtype=torch.uint8), torch.zeros((1, k), dtype=torch.int16), [1, 3, 5, 7], 8, 8)
