import pytest
import torch

import lrkern
from lrkern.reference import dequant as ref_dequant
from lrkern.reference import quant_pack as ref_quant_pack
from tests.helpers import DTYPE_IDS, DTYPES, assert_close

# (x shape, group_size, axis): per-token groups (KV head dims 64/96/128, groups not a power of two, one row, odd row
# counts) and per-channel groups of rows (group 1, odd groups, token blocks of 128 as the KV cache uses).
CASES = [
    ((1, 8), 8, -1),
    ((7, 64), 32, -1),
    ((3, 5, 96), 96, -1),
    ((2, 256), 128, -1),
    ((4, 3, 128), 64, -1),
    ((48, 12), 16, -2),
    ((2, 6, 8), 3, -2),
    ((3, 4), 1, -2),
    ((1, 2, 128, 24), 128, -2),
]
CASE_IDS = [f"x{'x'.join(map(str, s))}-g{g}-ax{a}" for s, g, a in CASES]
BITS = [2, 4, 8]


def _x(shape, dtype, device):
    # Offsets and spread vary per row so groups differ in range.
    x = torch.randn(shape, device=device) * torch.rand(shape[:-1] + (1,), device=device).mul(4) + 1.5
    return x.to(dtype)


def _check_same_quant(got, want):
    codes, scale, zero = got
    codes_ref, scale_ref, zero_ref = want
    assert codes.dtype == torch.uint8 and codes.shape == codes_ref.shape
    assert torch.equal(scale.cpu(), scale_ref.cpu()), "scale differs from the reference"
    assert torch.equal(zero.cpu(), zero_ref.cpu()), "zero differs from the reference"
    mismatch = (codes.cpu() != codes_ref.cpu()).sum().item()
    assert mismatch == 0, f"{mismatch} code bytes differ from the reference"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,group_size,axis", CASES, ids=CASE_IDS)
def test_codes_bit_exact_and_dequant(backend, device, shape, group_size, axis, dtype, bits):
    x = _x(shape, dtype, device)
    got = lrkern.quant_pack(x, bits, group_size, axis)
    want = ref_quant_pack(x, bits, group_size, axis)
    _check_same_quant(got, want)
    # Dequant of the same codes: kernel error measured apart from quantization error.
    assert_close(lrkern.dequant(*got, bits, group_size, axis), ref_dequant(*want, bits, group_size, axis))


def test_packing_layout_by_hand(backend, device):
    # One group of 8 with min 0 and max 3 at 2 bits: scale 1, zero 0, codes equal the values.
    x = torch.tensor([[0.0, 1, 2, 3, 3, 2, 1, 0]], device=device)
    codes, scale, zero = lrkern.quant_pack(x, 2, 8, -1)
    # First element in the lowest bits: 0 | 1<<2 | 2<<4 | 3<<6 = 228 and 3 | 2<<2 | 1<<4 | 0<<6 = 27.
    assert codes.cpu().tolist() == [[228, 27]]
    assert scale.item() == 1.0 and zero.item() == 0.0
    codes4, _, _ = lrkern.quant_pack(x * 5, 4, 8, -1)  # scale 1 at 4 bits (range 15)
    assert codes4.cpu().tolist() == [[0 | 5 << 4, 10 | 15 << 4, 15 | 10 << 4, 5 | 0 << 4]]


def test_round_half_to_even(backend, device):
    # min 0, max 3 -> scale exactly 1; values on .5 boundaries round to the even code.
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.5]], device=device)
    codes, _, _ = lrkern.quant_pack(x, 2, 8, -1)
    q = lrkern.reference.quant.unpack(codes.cpu(), 2)
    assert q.tolist() == [[0, 0, 2, 2, 3, 1, 2, 0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_constant_and_underflowing_groups(backend, device, dtype, axis):
    x = torch.full((8, 8), 0.75, device=device, dtype=dtype)
    # Range of one fp16 subnormal ulp: (2^-24)/3 underflows to a zero fp16 scale, so these groups get code 0 too.
    x[4:] = (torch.arange(8, device=device) % 2).to(dtype) * 2.0**-24
    codes, scale, zero = lrkern.quant_pack(x, 2, 4, axis)
    want = ref_quant_pack(x, 2, 4, axis)
    _check_same_quant((codes, scale, zero), want)
    assert (codes[:4] == 0).all(), "a constant group must get code 0"
    assert_close(lrkern.dequant(codes, scale, zero, 2, 4, axis)[:4], x[:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_subnormal_inputs(backend, device, dtype):
    # Groups entirely in the subnormal range of their dtype (fp32/bf16 below 1.2e-38, fp16 below 6.1e-5).
    tiny = 1e-39 if dtype != torch.float16 else 1e-6
    x = (torch.randn(6, 32, device=device) * tiny).to(dtype)
    assert (x != 0).any()
    for axis in (-1, -2):
        _check_same_quant(lrkern.quant_pack(x, 4, 2 if axis == -2 else 16, axis),
                          ref_quant_pack(x, 4, 2 if axis == -2 else 16, axis))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_within_half_a_step(backend, device, dtype, bits):
    x = _x((6, 128), dtype, device)
    codes, scale, zero = lrkern.quant_pack(x, bits, 32, -1)
    x_hat = lrkern.dequant(codes, scale, zero, bits, 32, -1).float()
    step = scale.float().repeat_interleave(32, dim=-1)
    # scale/2 plus the rounding of scale, zero and x_hat to dtype, each at most half an ulp of |x| or |x_hat|.
    slack = (x.float().abs() + x_hat.abs()) * torch.finfo(dtype).eps * 2
    assert ((x_hat - x.float()).abs() <= step / 2 + slack).all()


def test_adversarial_scores_large_magnitude(backend, device):
    # Near the fp16 limit (finite: non-finite input is unspecified) and far beyond it in fp32.
    x = (torch.randn(4, 64, device=device) * 3e4).clamp(-6.5e4, 6.5e4)
    assert torch.isfinite(x.half()).all()
    _check_same_quant(lrkern.quant_pack(x.half(), 2, 64, -1), ref_quant_pack(x.half(), 2, 64, -1))
    big = x.reshape(64, 4) * 1e30
    _check_same_quant(lrkern.quant_pack(big, 4, 32, -2), ref_quant_pack(big, 4, 32, -2))


def test_one_dimensional_input(backend, device):
    x = torch.randn(64, device=device)
    _check_same_quant(lrkern.quant_pack(x, 4, 16, -1), ref_quant_pack(x, 4, 16, -1))
    _check_same_quant(lrkern.quant_pack(x, 4, 16, 0), ref_quant_pack(x, 4, 16, -1))


def test_axis_accepts_positive_equivalent(device):
    x = torch.randn(2, 8, 16, device=device)
    for pos, neg in ((2, -1), (1, -2)):
        _check_same_quant(lrkern.quant_pack(x, 4, 8, pos), lrkern.quant_pack(x, 4, 8, neg))


def test_non_contiguous_input(backend, device):
    x = torch.randn(32, 6, device=device).T  # [6, 32], strided
    _check_same_quant(lrkern.quant_pack(x, 4, 16, -1), ref_quant_pack(x.contiguous(), 4, 16, -1))


def test_dequant_autograd_for_scale_and_zero(backend, device):
    x = _x((4, 64), torch.float32, device)
    codes, scale, zero = lrkern.quant_pack(x, 4, 16, -1)
    scale.requires_grad_(True)
    zero.requires_grad_(True)
    g = torch.randn(4, 64, device=device)
    got = torch.autograd.grad(lrkern.dequant(codes, scale, zero, 4, 16, -1), (scale, zero), g)
    s2, z2 = scale.detach().clone().requires_grad_(True), zero.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(ref_dequant(codes, s2, z2, 4, 16, -1), (s2, z2), g)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("shape,axis", [((0, 128), -1), ((4, 0), -1), ((2, 0, 8), -2)])
def test_empty(device, shape, axis):
    x = torch.randn(shape, device=device)
    codes, scale, zero = lrkern.quant_pack(x, 2, 4 if axis == -1 else 2, axis)
    ref = ref_quant_pack(x, 2, 4 if axis == -1 else 2, axis)
    assert codes.shape == ref[0].shape and scale.shape == ref[1].shape and zero.shape == ref[2].shape
    assert lrkern.dequant(codes, scale, zero, 2, 4 if axis == -1 else 2, axis).shape == x.shape


# --- bad input -----------------------------------------------------------------------------------------------------

def _q(x=None, bits=2, group_size=4, axis=-1):
    return lrkern.quant_pack(torch.randn(4, 16) if x is None else x, bits, group_size, axis)


@pytest.mark.parametrize("kwargs,err,pattern", [
    (dict(bits=3), ValueError, r"bits=3 is not supported; accepted: 2, 4, 8"),
    (dict(bits=1), ValueError, r"bits=1"),
    (dict(group_size=5), ValueError, r"group_size=5 does not divide x\.shape\[-1\]=16"),
    (dict(group_size=2), ValueError, r"group_size=2 must be a multiple of 4"),
    (dict(group_size=0), ValueError, r"group_size=0 must be >= 1"),
    (dict(group_size=3, axis=-2), ValueError, r"group_size=3 does not divide x\.shape\[-2\]=4"),
    (dict(axis=0, x=torch.randn(2, 4, 16)), ValueError, r"axis=0 is not supported"),
    (dict(axis=-2, x=torch.randn(16)), ValueError, r"axis=-2 is not supported"),
    (dict(x=torch.randn(4, 6), bits=2, group_size=2, axis=-2), ValueError, r"x\.shape\[-1\]=6 must be a multiple of 4"),
    (dict(x=torch.zeros(4, 16, dtype=torch.int32)), TypeError, r"x has dtype torch\.int32"),
    (dict(x=torch.zeros(4, 16, dtype=torch.float64)), TypeError, r"x has dtype torch\.float64"),
    # The op schema (SymInt) rejects a float before the Python body runs; its message names the argument too.
    (dict(bits=2.0), RuntimeError, r"argument 'bits'"),
])
def test_quant_pack_rejects(kwargs, err, pattern):
    with pytest.raises(err, match=pattern):
        _q(**kwargs)


def test_dequant_rejects():
    codes, scale, zero = _q()
    with pytest.raises(ValueError, match=r"scale has shape \(4, 3\) but .* need \(4, 4\)"):
        lrkern.dequant(codes, scale[:, :3], zero, 2, 4, -1)
    with pytest.raises(ValueError, match=r"zero has shape"):
        lrkern.dequant(codes, scale, zero[:2], 2, 4, -1)
    with pytest.raises(TypeError, match=r"codes has dtype torch\.int8"):
        lrkern.dequant(codes.to(torch.int8), scale, zero, 2, 4, -1)
    with pytest.raises(TypeError, match=r"zero has dtype torch\.float16 but scale has torch\.float32"):
        lrkern.dequant(codes, scale, zero.half(), 2, 4, -1)
    with pytest.raises(ValueError, match=r"bits=3"):
        lrkern.dequant(codes, scale, zero, 3, 4, -1)
