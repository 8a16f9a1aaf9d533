"""ASM alphabet sets and the projection ops (spec asm.md 3.2, 3.3, 3.5, 7 item 2): the 3.2 table by enumerating the
representability rule, the properties of P_A (idempotent, monotone, nearest, ties to the smaller magnitude, saturation,
no double rounding, joint never worse than quartet-wise), every backend bit-identical to the reference on w_int and
w_hat, the STE/LSQ gradients (reference formula, torch.ao's learnable fake quantizer on the uniform set, finite
differences where the function is smooth), decompose round trips and errors, opcheck, torch.compile, validation."""
import math

import pytest
import torch

import lrkern  # noqa: F401  (registers the ops)
from lrkern.asm.alphabet import (ALPHABETS, asm_compose, check_a_bits, check_w_bits, midpoints, parse_alphabet,
                                 r_max, representable_magnitudes, representable_quartets)
from lrkern.reference import asm_quant as R

SETS = ["1", "13", "1357", "odd"]
OPS = torch.ops.lrkern

# Spec 3.2, transcribed: set -> (representable quartets, count, not representable, max, 8-bit count, 8-bit max, bits).
TABLE = {
    "1": ([0, 1, 2, 4, 8], 5, [3, 5, 6, 7] + list(range(9, 16)), 8, 25, 136, 3),
    "13": ([0, 1, 2, 3, 4, 6, 8, 12], 8, [5, 7, 9, 10, 11, 13, 14, 15], 12, 64, 204, 3),
    "1357": (list(range(9)) + [10, 12, 14], 12, [9, 11, 13, 15], 14, 144, 238, 4),
    "odd": (list(range(16)), 16, [], 15, 256, 255, 4),
}


def _odd_part(q: int) -> int:
    while q % 2 == 0:
        q //= 2
    return q


# ---------------------------------------------------------------------------------------------------------------
# Alphabets and the 3.2 table


@pytest.mark.parametrize("name", SETS)
def test_table_3_2_by_enumeration(name):
    quarts, count, missing, mx, count8, max8, bits = TABLE[name]
    alpha = ALPHABETS[name]
    enum = [q for q in range(16) if q == 0 or _odd_part(q) in alpha]  # the rule of 3.1, independently
    assert enum == quarts and len(enum) == count
    assert [q for q in range(16) if q not in enum] == missing
    assert max(enum) == mx == r_max(name, 4)
    assert list(representable_quartets(name)) == enum
    r8 = sorted({16 * h + lo for h in enum for lo in enum})
    assert len(r8) == count8 and max(r8) == max8 == r_max(name, 8)
    assert representable_magnitudes(name, 8).tolist() == r8
    assert representable_magnitudes(name, 4).tolist() == enum
    assert math.ceil(math.log2(count)) == bits
    r = representable_magnitudes(name, 8).to(torch.float64)
    assert torch.equal(midpoints(name, 8), (r[1:] + r[:-1]) / 2)


def test_table_3_2_holes():
    r = set(representable_magnitudes("1357", 8).tolist())
    assert not r & set(range(143, 160)) and {142, 160} <= r
    r = set(representable_magnitudes("1", 8).tolist())
    assert not r & set(range(73, 128)) and {72, 128} <= r
    assert representable_magnitudes("odd", 8).tolist() == list(range(256))  # uniform symmetric quantization


def test_parse_alphabet_and_bits():
    assert parse_alphabet("13") == (1, 3)
    assert parse_alphabet([7, 1, 5, 3]) == (1, 3, 5, 7)
    assert parse_alphabet(torch.tensor([3, 1])) == (1, 3)
    for bad in ["x", [3], [1, 2], [1, 17], [1, 1], [], [1.0], 5]:
        with pytest.raises(ValueError, match="alphabet"):
            parse_alphabet(bad)
    assert check_w_bits(4) == 4 and check_a_bits(8) == 8
    for bad in [2, 16, 4.0, True, "4"]:
        with pytest.raises(ValueError, match="w_bits"):
            check_w_bits(bad)
        with pytest.raises(ValueError, match="a_bits"):
            check_a_bits(bad)


# ---------------------------------------------------------------------------------------------------------------
# P_A properties (reference)


def _p(u: torch.Tensor, name, w_bits: int) -> torch.Tensor:
    """P_A on magnitudes u (fp32, any shape) through the reference with scale 1."""
    flat = u.reshape(-1, 1).to(torch.float32)
    return R.asm_project(flat, torch.ones(1), 1, name, w_bits).reshape(u.shape).to(torch.int64)


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("name", SETS)
def test_projection_properties(name, w_bits):
    r = representable_magnitudes(name, w_bits)
    rm = int(r[-1])
    # Idempotent: representable values map to themselves, and P(P(u)) = P(u).
    assert torch.equal(_p(r.to(torch.float32), name, w_bits), r)
    u = torch.rand(4000) * (rm + 20)
    pu = _p(u, name, w_bits)
    assert torch.equal(_p(pu.to(torch.float32), name, w_bits), pu)
    # Monotone.
    us, _ = torch.sort(u)
    assert (_p(us, name, w_bits).diff() >= 0).all()
    # Nearest (against a brute-force argmin over R; the ascending argmin takes the smaller one on a tie).
    dist = (u[:, None].double() - r[None, :].double()).abs()
    assert torch.equal(pu, r[dist.argmin(1)])
    # Ties go to the smaller magnitude: exactly on a midpoint t_j -> r_j, just above -> r_{j+1}.
    t = midpoints(name, w_bits).to(torch.float32)
    assert torch.equal(_p(t, name, w_bits), r[:-1])
    assert torch.equal(_p(torch.nextafter(t, torch.tensor(1e9)), name, w_bits), r[1:])
    # Saturation (and inf) at r_max.
    sat = torch.tensor([rm + 0.4, rm + 0.6, rm + 1000.0, 1e30, float("inf")])
    assert (_p(sat, name, w_bits) == rm).all()
    assert int(_p(torch.tensor([0.0]), name, w_bits)) == 0


def test_spec_examples():
    # Double rounding: u = 10.2 under {1,3} goes to 12, while round(10.2) = 10 ties between 8 and 12 and goes to 8.
    assert int(_p(torch.tensor([10.2]), "13", 4)) == 12
    assert int(_p(torch.tensor([float(round(10.2))]), "13", 4)) == 8
    # Integer variant under {1,3,5,7}: 9, 11, 13, 15 -> 8, 10, 12, 14.
    assert _p(torch.tensor([9.0, 11.0, 13.0, 15.0]), "1357", 4).tolist() == [8, 10, 12, 14]
    # Joint 8-bit projection: 31 -> 32 under {1,3}, 144 -> 142 under {1,3,5,7}.
    assert int(_p(torch.tensor([31.0]), "13", 8)) == 32
    assert int(_p(torch.tensor([144.0]), "1357", 8)) == 142
    # Signs: w_int = sign(w) * P(|w| / s); -0 and NaN give 0.
    w = torch.tensor([[-10.2, 10.2, -0.0, float("nan"), -100.0]])
    assert R.asm_project(w, torch.ones(1), 0, "13", 4).tolist() == [[-12, 12, 0, 0, -12]]


def _quartetwise(m: int, quarts) -> int:
    def near(v):
        return min(quarts, key=lambda q: (abs(v - q), q))

    return 16 * near(m >> 4) + near(m & 15)


@pytest.mark.parametrize("name", SETS)
def test_joint_projection_never_worse_than_quartetwise(name):
    quarts = representable_quartets(name)
    rm = r_max(name, 8)
    m = torch.arange(rm + 1)
    joint = _p(m.to(torch.float32), name, 8)
    qw = torch.tensor([_quartetwise(int(v), quarts) for v in m])
    assert ((m - joint).abs() <= (m - qw).abs()).all()
    differ = int((joint != qw).sum())
    if name == "13":
        assert differ == 78 and rm + 1 == 205  # spec 3.3
        assert int(joint[31]) == 32 and int(qw[31]) == 28
    if name == "1357":
        assert int(joint[144]) == 142 and int(qw[144]) == 128
    if name == "odd":
        assert differ == 0


# ---------------------------------------------------------------------------------------------------------------
# Backends against the reference

LAYOUTS = [((5, 12), 0), ((3, 4, 5), 1), ((9, 6), -1), ((7,), 0)]  # P == 1, general, inner == 1, 1-D


def _weights(shape, axis, name, w_bits, dtype, gen):
    """Random weights with edge values: zeros, -0, negatives, exact midpoints, > r_max, huge, inf, NaN; scales
    powers of two (so midpoint inputs are exact) and one tiny scale."""
    c = shape[axis]
    scale = torch.exp2(torch.randint(-4, 2, (c,), generator=gen).to(torch.float32))
    scale[0] = 1e-30  # everything but zero saturates
    rm = r_max(name, w_bits)
    w = torch.randn(shape, generator=gen) * rm / 2
    mid = midpoints(name, w_bits).to(torch.float32)
    flat = w.movedim(axis, -1).reshape(-1, c)  # a copy: edit, then move back
    n = flat.shape[0]
    for col in range(c):
        pick = mid[torch.randint(0, mid.numel(), (n,), generator=gen)]
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        take = torch.rand(n, generator=gen) < 0.4
        flat[:, col] = torch.where(take, sign * pick * scale[col], flat[:, col])
    flat = flat.reshape(-1)
    specials = torch.tensor([0.0, -0.0, float(rm) * 3, -1e6, float("inf"), float("-inf"), float("nan"), 1e-3])
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    w = flat.reshape(*[s for i, s in enumerate(shape) if i != axis % len(shape)], c).movedim(-1, axis)
    return w.contiguous().to(dtype), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("name", SETS)
def test_backends_bit_identical(backend, device, name, w_bits, dtype):
    gen = torch.Generator().manual_seed(10 * SETS.index(name) + w_bits)
    alpha = list(ALPHABETS[name])
    for shape, axis in LAYOUTS:
        w, scale = _weights(shape, axis, name, w_bits, dtype, gen)
        w, scale = w.to(device), scale.to(device)
        ref = R.asm_project(w, scale, axis, alpha, w_bits)
        w_int = OPS.asm_project(w, scale, axis, alpha, w_bits)
        assert w_int.dtype == torch.int16 and torch.equal(w_int, ref), (shape, axis)
        w_hat = OPS.asm_fake_quant(w, scale, axis, alpha, w_bits)
        assert w_hat.dtype == dtype and torch.equal(w_hat, R.asm_fake_quant(w, scale, axis, alpha, w_bits))
        # Backward: grad_w exactly, grad_scale by tolerance (another fixed summation order), deterministic.
        finite = torch.isfinite(w)
        g = (torch.randn(shape, generator=gen) * finite.cpu()).to(dtype).to(device)
        ws = torch.where(finite, w, torch.zeros((), dtype=dtype, device=device))
        gw, gs = OPS.asm_fake_quant_backward(g, ws, scale, axis, alpha, w_bits)
        rgw, rgs = R.asm_fake_quant_backward(g, ws, scale, axis, alpha, w_bits)
        assert torch.equal(gw, rgw)
        assert torch.allclose(gs, rgs, rtol=1e-5, atol=1e-5 * rgs.abs().max().item()), (gs, rgs)
        gw2, gs2 = OPS.asm_fake_quant_backward(g, ws, scale, axis, alpha, w_bits)
        assert torch.equal(gw2, gw) and torch.equal(gs2, gs)
        # Decompose of the projected weights round-trips.
        codes = OPS.asm_decompose(w_int, alpha, w_bits)
        assert torch.equal(codes, R.asm_decompose(w_int, alpha, w_bits))
        assert torch.equal(asm_compose(codes, w_int, alpha), w_int)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_backends_ties_and_every_midpoint(backend, device, w_bits):
    for name in SETS:
        r = representable_magnitudes(name, w_bits)
        t = midpoints(name, w_bits).to(torch.float32)
        above = torch.nextafter(t, torch.tensor(1e9))
        u = torch.cat([t, above, -t, r.float(), torch.tensor([r[-1] + 0.5, r[-1] + 7.0])]).to(device)
        w_int = OPS.asm_project(u.view(-1, 1), torch.ones(1, device=device), 1, list(ALPHABETS[name]), w_bits)
        want = torch.cat([r[:-1], r[1:], -r[:-1], r, r[-1:], r[-1:]]).to(torch.int16)
        assert torch.equal(w_int.view(-1).cpu(), want)


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def _lsq_fp64(g, w, scale, axis, name, w_bits):
    """Independent fp64 statement of 3.5 (nearest by argmin over R)."""
    r = representable_magnitudes(name, w_bits).double()
    rm = float(r[-1])
    shape = [1] * w.dim()
    shape[axis] = -1
    s = scale.double().view(shape)
    u = w.double().abs() / s
    p = r[(u.reshape(-1, 1) - r.view(1, -1)).abs().argmin(1)].view(u.shape)
    inside = u <= rm
    gw = torch.where(inside, g.double(), 0.0)
    term = torch.where(inside, p - u, rm) * torch.sign(w.double())
    k = w.numel() / w.shape[axis]
    dims = [d for d in range(w.dim()) if d != axis % w.dim()]
    gs = (g.double() * term).sum(dims) / math.sqrt(k * rm)
    return gw, gs


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("name", SETS)
def test_fake_quant_autograd(backend, device, name, w_bits):
    alpha = list(ALPHABETS[name])
    rm = r_max(name, w_bits)
    scale = (torch.rand(6) * 0.5 + 0.1).to(device)
    w = (torch.randn(6, 10) * 0.3 * rm * scale.cpu().view(-1, 1)).to(device)  # some beyond r_max
    w.requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    y = OPS.asm_fake_quant(w, s, 0, alpha, w_bits)
    g = torch.randn_like(y)
    gw, gs = torch.autograd.grad((y * g).sum(), (w, s))
    rgw, rgs = R.asm_fake_quant_backward(g, w.detach(), scale, 0, alpha, w_bits)
    assert torch.equal(gw, rgw)
    assert torch.allclose(gs, rgs, rtol=1e-5, atol=1e-6)
    fgw, fgs = _lsq_fp64(g.cpu(), w.detach().cpu(), scale.cpu(), 0, name, w_bits)
    assert torch.equal(gw.cpu().double(), fgw)
    assert torch.allclose(gs.cpu().double(), fgs, rtol=1e-4, atol=1e-5)


def test_lsq_matches_torch_learnable_fake_quant_on_the_uniform_set():
    """Full odd set, w_bits 4 = uniform symmetric [-15, 15]: torch's learnable per-channel fake quantizer with
    grad_factor 1/sqrt(K * 15) gives the same STE and LSQ gradients (inputs avoid ties, and u in (15, 15.5] where
    torch's range test uses the rounded value)."""
    gen = torch.Generator().manual_seed(3)
    c, k = 5, 40
    scale = torch.rand(c, generator=gen) * 0.2 + 0.05
    frac = torch.rand(c, k, generator=gen) * 0.3 + 0.1
    base = torch.randint(-20, 20, (c, k), generator=gen).to(torch.float32)
    u = base + torch.where(base >= 0, frac, -frac)
    u = torch.where(u.abs() > 15, u.sign() * (u.abs() + 1.0), u)
    w = (u * scale.view(-1, 1)).requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    g = torch.randn(c, k, generator=gen)
    y = OPS.asm_fake_quant(w, s, 0, list(ALPHABETS["odd"]), 4)
    gw, gs = torch.autograd.grad((y * g).sum(), (w, s))
    w2, s2 = w.detach().clone().requires_grad_(True), scale.clone().requires_grad_(True)
    y2 = torch._fake_quantize_learnable_per_channel_affine(w2, s2, torch.zeros(c), 0, -15, 15, 1.0 / math.sqrt(k * 15))
    gw2, gs2 = torch.autograd.grad((y2 * g).sum(), (w2, s2))
    assert torch.allclose(y, y2, rtol=0, atol=1e-6)
    assert torch.equal(gw, gw2)
    assert torch.allclose(gs, gs2, rtol=1e-4, atol=1e-5)


def test_scale_gradient_finite_difference_where_saturated():
    """Where every weight saturates, w_hat = s * sign(w) * r_max is smooth in s and the LSQ gradient is the true
    derivative times 1/sqrt(K r_max)."""
    name, w_bits = "13", 8
    rm = r_max(name, w_bits)
    w = torch.tensor([[3.0, -5.0, 4.0, -7.0]], dtype=torch.float64).float()
    s = torch.tensor([0.01], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -0.5, 0.25]])
    (gs,) = torch.autograd.grad((OPS.asm_fake_quant(w, s, 0, [1, 3], w_bits) * g).sum(), (s,))

    def f(sv):
        return float((R.asm_fake_quant(w.double(), torch.tensor([sv]).float(), 0, [1, 3], w_bits).double()
                      * g.double()).sum())

    h = 1e-4
    fd = (f(0.01 + h) - f(0.01 - h)) / (2 * h)
    assert abs(float(gs) * math.sqrt(4 * rm) - fd) < 1e-3 * abs(fd)


def test_fake_quant_equals_torch_ao_on_the_uniform_set():
    """Full odd set, w_bits 4: asm_fake_quant == torch.fake_quantize_per_channel_affine(w, s, 0, axis, -15, 15) on
    inputs without .5 ties (torch rounds half to even, P_A ties go to the smaller magnitude)."""
    gen = torch.Generator().manual_seed(1)
    for shape, axis in [((8, 33), 0), ((4, 6, 3), 1), ((16, 5), 1)]:
        c = shape[axis]
        scale = torch.rand(c, generator=gen) * 0.1 + 0.01
        view = [1] * len(shape)
        view[axis] = -1
        u = torch.randn(shape, generator=gen) * 10
        frac = u - u.trunc()
        u = torch.where((frac.abs() - 0.5).abs() < 0.05, u + 0.2, u)  # keep away from ties
        w = u * scale.view(view)
        ours = OPS.asm_fake_quant(w, scale, axis, list(ALPHABETS["odd"]), 4)
        ao = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(c, dtype=torch.int32), axis, -15, 15)
        assert torch.equal(ours, ao)


# ---------------------------------------------------------------------------------------------------------------
# Decompose


def test_decompose_layout():
    codes = R.asm_decompose(torch.tensor([12, -12, 0, 1, 3], dtype=torch.int16), [1, 3], 4)
    assert codes.shape == (5, 1)
    assert codes.view(-1).tolist() == [0x80 | (1 << 4) | 2, 0x92, 0, 0x80, 0x90]
    codes = R.asm_decompose(torch.tensor([0x31, 0xC0], dtype=torch.int16), [1, 3], 8)
    assert codes.tolist() == [[0x80, 0x90], [0, 0x92]]  # quartet 0 (low) first
    codes = R.asm_decompose(torch.tensor([14 * 16 + 10], dtype=torch.int16), [1, 3, 5, 7], 8)
    assert codes.tolist() == [[0x80 | (2 << 4) | 1, 0x80 | (3 << 4) | 1]]


@pytest.mark.parametrize("w_bits", [4, 8])
def test_decompose_round_trip_and_errors(backend, device, w_bits):
    for name in SETS:
        alpha = list(ALPHABETS[name])
        r = representable_magnitudes(name, w_bits)
        w_int = torch.cat([r, -r]).to(torch.int16).view(2, -1).to(device)
        codes = OPS.asm_decompose(w_int, alpha, w_bits)
        assert codes.shape == (*w_int.shape, w_bits // 4) and codes.dtype == torch.uint8
        assert torch.equal(asm_compose(codes, w_int, alpha), w_int)
        assert torch.equal(asm_compose(codes, torch.sign(w_int), alpha), w_int)
        bad = sorted(set(range(-(1 << w_bits) - 2, (1 << w_bits) + 2)) - set(r.tolist()) - set((-r).tolist()))
        for value in bad[:: max(1, len(bad) // 6)] + [-32768, 32767]:
            w_bad = torch.zeros(3, 5, dtype=torch.int16)
            w_bad.view(-1)[7] = value
            w_bad.view(-1)[11] = value
            with pytest.raises(ValueError, match=rf"w_int: the weight at flat index 7 \(value {value}\)"):
                OPS.asm_decompose(w_bad.to(device), alpha, w_bits)


# ---------------------------------------------------------------------------------------------------------------
# opcheck, compile, validation


def _opcheck_cases(device):
    w = torch.randn(4, 6, device=device)
    s = torch.rand(4, device=device) + 0.1
    w_int = R.asm_project(w, s, 0, [1, 3], 8)
    return [
        ("asm_project", (w, s, 0, [1, 3], 4)),
        ("asm_project", (w.to(torch.bfloat16).T.contiguous(), s, 1, [1, 3, 5, 7], 8)),
        ("asm_fake_quant", (w.clone().requires_grad_(True), s.clone().requires_grad_(True), 0, [1], 4)),
        ("asm_fake_quant", (w.half().view(2, 2, 6).requires_grad_(True), torch.rand(2, device=device) + 0.1, 1,
                            [1, 3], 8)),
        ("asm_fake_quant_backward", (torch.randn(4, 6, device=device), w, s, 0, [1, 3], 4)),
        ("asm_decompose", (w_int, [1, 3], 8)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(backend, device, case):
    name, args = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_compile_traces_forward_and_backward():
    torch._dynamo.reset()
    w = torch.randn(4, 8, requires_grad=True)
    s = (torch.rand(4) + 0.1).requires_grad_(True)

    def f(w, s):
        return (OPS.asm_fake_quant(w, s, 0, [1, 3], 4) ** 2).sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(w, s)
    gw, gs = torch.autograd.grad(out, (w, s))
    ew, es = torch.autograd.grad(f(w, s), (w, s))
    assert torch.equal(gw, ew) and torch.allclose(gs, es)


def test_validation_errors():
    w = torch.randn(4, 6)
    s = torch.rand(4) + 0.1
    for op in (OPS.asm_project, OPS.asm_fake_quant):
        with pytest.raises(ValueError, match="alphabet"):
            op(w, s, 0, [1, 2], 4)
        with pytest.raises(ValueError, match="alphabet"):
            op(w, s, 0, [3, 5], 4)
        with pytest.raises(ValueError, match="w_bits"):
            op(w, s, 0, [1, 3], 6)
        with pytest.raises(ValueError, match="scale"):
            op(w, torch.rand(6) + 0.1, 0, [1, 3], 4)
        with pytest.raises(ValueError, match="scale"):
            op(w, s.view(2, 2), 0, [1, 3], 4)
        with pytest.raises(TypeError, match="scale"):
            op(w, s.double(), 0, [1, 3], 4)
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            s_bad = s.clone()
            s_bad[2] = bad
            with pytest.raises(ValueError, match="scale"):
                op(w, s_bad, 0, [1, 3], 4)
        with pytest.raises(ValueError, match="axis"):
            op(w, s, 2, [1, 3], 4)
        with pytest.raises(ValueError, match="axis"):
            op(w, s, -3, [1, 3], 4)
        with pytest.raises(TypeError, match="^w has dtype"):
            op(w.to(torch.int32), s, 0, [1, 3], 4)
        with pytest.raises(TypeError, match="^w has dtype"):
            op(w.double(), s, 0, [1, 3], 4)
    assert OPS.asm_project(w, torch.rand(6) + 0.1, -1, [1, 3], 4).shape == w.shape  # negative axis
    with pytest.raises(TypeError, match="w_int"):
        OPS.asm_decompose(w, [1, 3], 4)
    with pytest.raises(TypeError, match="w_int"):
        OPS.asm_decompose(w.to(torch.int32), [1, 3], 4)
    with pytest.raises(ValueError, match="w_bits"):
        OPS.asm_decompose(w.to(torch.int16), [1, 3], 2)
    with pytest.raises(ValueError, match="alphabet"):
        OPS.asm_decompose(w.to(torch.int16), [1, 3, 3], 4)


def test_empty_tensors(backend, device):
    w = torch.randn(3, 0, device=device)
    s = torch.ones(3, device=device)
    assert OPS.asm_project(w, s, 0, [1, 3], 4).shape == (3, 0)
    assert OPS.asm_fake_quant(w, s, 0, [1, 3], 4).shape == (3, 0)
    gw, gs = OPS.asm_fake_quant_backward(w, w, s, 0, [1, 3], 4)
    assert gw.shape == (3, 0) and torch.equal(gs, torch.zeros(3, device=device))
    assert OPS.asm_decompose(torch.zeros(0, dtype=torch.int16, device=device), [1, 3], 8).shape == (0, 2)
