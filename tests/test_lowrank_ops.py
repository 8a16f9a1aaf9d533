"""The low-rank projection ops against their references, on every backend: lance_project, mode_gram_accumulate, the
weight-gradient rebuilds (exact at full rank, equal to "reconstruct X~ then autograd" at low rank), the
lance_linear / lance_conv2d layers, opcheck, and argument errors."""
import pytest
import torch
import torch.nn.functional as F

import lrkern
from lrkern.reference import lowrank as R
from lrkern.lance import SavedBytesMeter
from tests.helpers import DTYPE_IDS, DTYPES, TOLERANCE, err_ratio

# Full-rank and reconstruct comparisons: fp32 sums in another order, over at most a few hundred terms.
GRAD_TOL = 1e-5


def orth(n: int, r: int, device="cpu") -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0].to(torch.float32).to(device)


def factors_for(shape, ranks, device="cpu"):
    """ranks[k] None -> mode not projected."""
    return [None if r is None else orth(n, r, device) for n, r in zip(shape, ranks)]


PROJECT_CASES = [  # (shape, ranks)
    ((5, 12), (None, 3)),
    ((5, 12), (2, 4)),
    ((3, 7, 10), (None, 2, 3)),
    ((3, 7, 10), (2, 7, 1)),
    ((1, 1, 9), (None, None, 4)),
    ((4, 6, 5, 7), (None, 3, 2, 4)),
    ((4, 6, 5, 7), (3, 2, None, 3)),
    ((2, 3, 9, 1), (None, 2, 5, None)),
    ((3, 4, 5, 6), (None, None, None, None)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(PROJECT_CASES)), ids=lambda i: "x{}-r{}".format(*PROJECT_CASES[i]))
def test_project_matches_tensordot_chain(backend, device, case, dtype):
    shape, ranks = PROJECT_CASES[case]
    x = torch.randn(shape, device=device).to(dtype)
    fs = factors_for(shape, ranks, device)
    out = lrkern.lance_project(x, fs)
    ref = R.lance_project(x, fs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any()
    # fp16/bf16 x: the Triton kernel rounds the right factor to x's dtype for the tensor-core dot.
    tol = TOLERANCE[torch.float32] * 10 if dtype == torch.float32 else TOLERANCE[dtype]
    assert err_ratio(out, ref) <= tol


def test_project_non_contiguous_input(backend, device):
    x = torch.randn(6, 5, 4, 3, device=device).permute(3, 1, 0, 2)  # [3, 5, 6, 4], strided
    fs = factors_for(x.shape, (None, 2, 3, 2), device)
    assert err_ratio(lrkern.lance_project(x, fs), R.lance_project(x, fs)) <= 2e-6


@pytest.mark.parametrize("shape,dim", [((7, 5), 0), ((7, 5), 1), ((3, 6, 5), 0), ((3, 6, 5), 1), ((3, 6, 5), 2),
                                       ((2, 3, 4, 5), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3)])
def test_mode_gram_accumulates(backend, device, shape, dim):
    x = torch.randn(shape, device=device)
    n = shape[dim]
    out = torch.eye(n, device=device)  # accumulation adds to whatever is there
    lrkern.mode_gram_accumulate(x, out, dim, 0.5)
    lrkern.mode_gram_accumulate(x, out, dim, 0.5)
    xf = R.unfold(x.double(), dim)
    ref = torch.eye(n, dtype=torch.float64, device=device) + xf @ xf.T
    assert err_ratio(out, ref) <= 2e-6
    assert torch.equal(out, out.T) or err_ratio(out, out.T) <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mode_gram_low_precision_input(backend, device, dtype):
    x = torch.randn(4, 6, 5, device=device).to(dtype)
    out = torch.zeros(6, 6, device=device)
    lrkern.mode_gram_accumulate(x, out, 1, 1.0)
    xf = R.unfold(x.double(), 1)
    assert err_ratio(out, xf @ xf.T) <= 2e-6  # products of fp16/bf16 values are exact in fp32


# --------------------------------------------------------------------------------------------- weight gradients
def _full(shape, device):
    return [orth(n, n, device) for n in shape]


@pytest.mark.parametrize("shape", [(6, 10), (3, 7, 10)], ids=["2d", "3d"])
def test_linear_full_rank_is_exact(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    lin = torch.nn.Linear(shape[-1], 5).to(device)
    y, _ = lrkern.ops.lance_linear(x, lin.weight, lin.bias, _full(shape, device))
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, lin.weight, lin.bias), dy)
    ref = torch.autograd.grad(F.linear(x, lin.weight, lin.bias), (x, lin.weight, lin.bias), dy)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    for out, r in zip((gx, gw, gb), ref):
        assert err_ratio(out, r) <= GRAD_TOL


CONV_CASES = [(1, 0, 1), (1, 1, 1), (2, 0, 1), (2, 1, 1), (1, 2, 2)]  # (stride, padding, dilation)


@pytest.mark.parametrize("stride,padding,dilation", CONV_CASES, ids=lambda v: str(v))
def test_conv_full_rank_is_exact(backend, device, stride, padding, dilation):
    x = torch.randn(3, 4, 9, 8, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(4, 5, 3, stride=stride, padding=padding, dilation=dilation).to(device)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2)
    y, core = lrkern.ops.lance_conv2d(x, conv.weight, conv.bias, _full(x.shape, device), *args, False)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), dy)
    ref_y = conv(x)
    ref = torch.autograd.grad(ref_y, (x, conv.weight, conv.bias), dy)
    assert torch.equal(y, ref_y)
    for out, r in zip(grads, ref):
        assert err_ratio(out, r) <= GRAD_TOL


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_im2col_full_rank_is_exact(backend, device, stride, padding):
    x = torch.randn(2, 3, 7, 6, device=device)
    conv = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=padding).to(device)
    shape = lrkern.ops.lance_layers.im2col_shape(x.shape, conv.weight.shape, [stride] * 2, [padding] * 2, [1, 1])
    y, core = lrkern.ops.lance_conv2d(x, conv.weight, conv.bias, _full(shape, device), [stride] * 2, [padding] * 2,
                                      [1, 1], True)
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, conv.weight, dy)
    (ref,) = torch.autograd.grad(conv(x), conv.weight, dy)
    assert list(core.shape) == shape
    assert err_ratio(gw, ref) <= GRAD_TOL


@pytest.mark.parametrize("shape,ranks", [((6, 10), (3, 4)), ((5, 7, 10), (None, 3, 4)), ((5, 7, 10), (2, 3, 4)),
                                         ((5, 7, 10), (2, None, 6))], ids=["2d", "3d-nobatch", "3d-all", "3d-noL"])
def test_linear_wgrad_equals_reconstruct_reference(backend, device, shape, ranks):
    x = torch.randn(shape, device=device)
    fs = factors_for(shape, ranks, device)
    core = R.lance_project(x, fs)
    dy = torch.randn(*shape[:-1], 5, device=device)
    out = lrkern.ops.lance_linear_wgrad(core, fs, dy)
    ref = R.lance_linear_wgrad(core, fs, dy)
    assert out.shape == (5, shape[-1])
    assert err_ratio(out, ref) <= GRAD_TOL


@pytest.mark.parametrize("ranks", [(None, 2, 3, 4), (2, 3, 4, 3), (3, None, None, 2)], ids=str)
@pytest.mark.parametrize("stride,padding,dilation", CONV_CASES, ids=lambda v: str(v))
def test_conv_wgrad_equals_reconstruct_reference(backend, device, ranks, stride, padding, dilation):
    x = torch.randn(4, 6, 9, 8, device=device)
    fs = factors_for(x.shape, ranks, device)
    core = R.lance_project(x, fs)
    w_shape = [5, 6, 3, 3]
    ho = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (8 + 2 * padding - dilation * 2 - 1) // stride + 1
    dy = torch.randn(4, 5, ho, wo, device=device)
    args = (w_shape, [stride] * 2, [padding] * 2, [dilation] * 2)
    out = lrkern.ops.lance_conv2d_wgrad(core, fs, dy, *args)
    assert err_ratio(out, R.lance_conv2d_wgrad(core, fs, dy, *args)) <= GRAD_TOL


def test_layer_gradient_is_that_of_the_reconstructed_input(backend, device):
    """End to end through autograd: dW of lance_linear == dW of F.linear on X~ (the spec's reference)."""
    x = torch.randn(4, 6, 9, device=device)
    fs = factors_for(x.shape, (2, 3, 4), device)
    lin = torch.nn.Linear(9, 3).to(device)
    y, _ = lrkern.ops.lance_linear(x, lin.weight, lin.bias, fs)
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, lin.weight, dy)
    x_tilde = R.reconstruct(R.lance_project(x, fs), fs)
    (ref,) = torch.autograd.grad(F.linear(x_tilde, lin.weight, lin.bias), lin.weight, dy)
    assert err_ratio(gw, ref) <= GRAD_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_layer_low_precision(backend, device, dtype):
    x = torch.randn(3, 5, 8, device=device).to(dtype).requires_grad_(True)
    lin = torch.nn.Linear(8, 4).to(device, dtype)
    fs = factors_for(x.shape, (None, 2, 3), device)
    y, core = lrkern.ops.lance_linear(x, lin.weight, lin.bias, fs)
    y.backward(torch.ones_like(y))
    assert y.dtype == dtype and core.dtype == torch.float32 and lin.weight.grad.dtype == dtype
    ref = R.lance_linear_wgrad(R.lance_project(x.detach(), fs), fs, torch.ones_like(y))
    assert err_ratio(lin.weight.grad, ref) <= TOLERANCE[dtype]


# --------------------------------------------------------------------------------------- saved bytes (spec 6)
def test_saved_bytes_are_the_core_only(backend, device):
    x = torch.randn(8, 6, 9, 7, device=device)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).to(device)
    fs = factors_for(x.shape, (None, 2, 3, 2), device)
    with SavedBytesMeter(conv, exclude=fs) as meter:
        y, _ = lrkern.ops.lance_conv2d(x, conv.weight, conv.bias, fs, [1, 1], [1, 1], [1, 1], False)
    assert meter.total == 4 * 8 * 2 * 3 * 2  # fp32 core [8, 2, 3, 2]; weight and factors are not activations
    lin = torch.nn.Linear(9, 4).to(device)
    x3 = torch.randn(8, 5, 9, device=device)
    fs3 = factors_for(x3.shape, (3, 2, 4), device)
    with SavedBytesMeter(lin, exclude=fs3) as meter:
        lrkern.ops.lance_linear(x3, lin.weight, lin.bias, fs3)
    assert meter.total == 4 * 3 * 2 * 4
    with SavedBytesMeter(lin) as meter:  # what plain backprop keeps: the input itself
        F.linear(x3, lin.weight, lin.bias)
    assert meter.total == x3.numel() * 4


# --------------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    x4 = torch.randn(3, 4, 5, 6, device=device)
    f4 = factors_for(x4.shape, (2, 3, None, 4), device)
    x3 = torch.randn(3, 5, 8, device=device)
    f3 = factors_for(x3.shape, (None, 2, 3), device)
    lin = torch.nn.Linear(8, 4).to(device)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1).to(device)
    dy4 = torch.randn(3, 5, 5, 6, device=device)
    return [
        ("mode_gram_accumulate", (x4, torch.zeros(4, 4, device=device), 1, 0.5)),
        ("lance_project", (x4, f4)),
        ("lance_project", (x3.half(), f3)),
        ("lance_linear_wgrad", (R.lance_project(x3, f3), f3, torch.randn(3, 5, 4, device=device))),
        ("lance_conv2d_wgrad", (R.lance_project(x4, f4), f4, dy4, [5, 4, 3, 3], [1, 1], [1, 1], [1, 1])),
        ("lance_linear", (x3.clone().requires_grad_(True), lin.weight, lin.bias, f3)),
        ("lance_linear", (x3, lin.weight, None, _full(x3.shape, device))),
        ("lance_conv2d", (x4.clone().requires_grad_(True), conv.weight, conv.bias, f4, [1, 1], [1, 1], [1, 1],
                          False)),
        ("lance_conv2d", (x4, conv.weight, conv.bias, [None, None, orth(36, 5, device)], [1, 1], [1, 1], [1, 1],
                          True)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(backend, device, case):
    name, args = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.lrkern, name).default, args)


# ------------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"factors has 2 entries but x has 3 modes"):
        lrkern.lance_project(x, [None, orth(4, 2)])
    with pytest.raises(ValueError, match=r"factors\[2\] must be \[n, r\] with n = x.shape\[2\] = 5"):
        lrkern.lance_project(x, [None, None, orth(6, 2)])
    with pytest.raises(TypeError, match=r"factors\[1\] has dtype torch.float64"):
        lrkern.lance_project(x, [None, orth(4, 2).double(), None])
    with pytest.raises(ValueError, match=r"x must have 2 or 3 or 4 dims"):
        lrkern.lance_project(torch.randn(2, 2, 2, 2, 2), [None] * 5)
    with pytest.raises(ValueError, match=r"out must be a contiguous fp32 \[4, 4\]"):
        lrkern.mode_gram_accumulate(x, torch.zeros(5, 5), 1, 1.0)
    with pytest.raises(ValueError, match=r"dim=3 is out of range"):
        lrkern.mode_gram_accumulate(x, torch.zeros(5, 5), 3, 1.0)
    dw = torch.nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match=r"only groups=1 convolutions can be compressed"):
        lrkern.ops.lance_conv2d(torch.randn(2, 4, 6, 6), dw.weight, dw.bias, [None] * 4, [1, 1], [0, 0], [1, 1], False)
    lin = torch.nn.Linear(5, 3)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float32 but x has torch.float16"):
        lrkern.ops.lance_linear(x.half(), lin.weight, lin.bias, [None] * 3)
