import math

import pytest
import torch

import lrkern
from lrkern.reference import hadamard as ref_hadamard
from lrkern.reference import hadamard_matrix
from tests.helpers import DTYPE_IDS, DTYPES, TOLERANCE, assert_close, err_ratio

# (leading shape, n): one row, odd row counts, n = 2, KV head dims and a long transform.
SHAPES = [((1,), 2), ((7,), 4), ((3, 5), 64), ((2, 3), 128), ((33,), 256), ((4,), 1024)]
SHAPE_IDS = [f"L{'x'.join(map(str, lead))}-n{n}" for lead, n in SHAPES]


def _x(lead, n, dtype, device):
    return torch.randn(*lead, n, device=device).to(dtype)


def _truth(x):
    """x @ H_n in fp64 from explicit matrices. For large n, H_n = H_a kron H_b (n = a*b), so with x viewed as
    X [a, b] the transform is H_a @ X @ H_b and no dense n x n matrix is built."""
    n = x.shape[-1]
    x64 = x.to(torch.float64)
    if n <= 1024:
        return x64 @ hadamard_matrix(n, torch.float64, x.device)
    a = 1 << (n.bit_length() - 1) // 2
    b = n // a
    xm = x64.reshape(*x.shape[:-1], a, b)
    y = hadamard_matrix(a, torch.float64, x.device) @ xm @ hadamard_matrix(b, torch.float64, x.device)
    return y.reshape(x.shape)


def test_hadamard_matrix_is_orthonormal_and_symmetric():
    for n in (2, 8, 64):
        h = hadamard_matrix(n, torch.float64)
        assert torch.equal(h, h.T)
        assert torch.allclose(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.all(h.abs() == 1 / math.sqrt(n))
    # Sylvester order: H_4 rows are the Walsh functions in natural (not sequency) order.
    signs = torch.sign(hadamard_matrix(4, torch.float64))
    expected = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    assert torch.equal(signs, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,n", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(backend, device, lead, n, dtype):
    x = _x(lead, n, dtype, device)
    out = lrkern.hadamard(x)
    assert out.device == x.device
    assert_close(out, ref_hadamard(x))


@pytest.mark.parametrize("n", [2, 16, 128, 1024])
def test_reference_matches_explicit_matrix(n):
    x = torch.randn(5, n)
    assert err_ratio(ref_hadamard(x), _truth(x)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_at_most_twice_torch_matmul(backend, device, dtype):
    # flash-attention's rule: the kernel's error against the fp64 truth is at most ~2x the error of PyTorch's own
    # computation (x @ H) in the same dtype.
    x = _x((64,), 128, dtype, device)
    truth = _truth(x)
    torch_err = err_ratio(x @ hadamard_matrix(128, dtype, device), truth)
    assert err_ratio(lrkern.hadamard(x), truth) <= 2 * torch_err + 1e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_involution(backend, device, dtype):
    x = _x((9,), 512, dtype, device)
    # Two roundings to dtype: allow twice the single-op bound.
    assert err_ratio(lrkern.hadamard(lrkern.hadamard(x)), x) <= 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("n", [8192, 32768])
def test_largest_sizes(backend, device, n):
    x = torch.randn(2, n, device=device)
    assert_close(lrkern.hadamard(x), ref_hadamard(x))
    assert err_ratio(lrkern.hadamard(x), _truth(x)) < TOLERANCE[torch.float32]


def test_non_contiguous_input(backend, device):
    x = torch.randn(64, 6, device=device).T  # [6, 64], strided
    assert not x.is_contiguous()
    assert_close(lrkern.hadamard(x), ref_hadamard(x.contiguous()))


def test_autograd_is_the_transform(backend, device):
    x = torch.randn(3, 64, device=device, requires_grad=True)
    g = torch.randn(3, 64, device=device)
    (grad,) = torch.autograd.grad(lrkern.hadamard(x), x, g)
    # d(x @ H)/dx applied to g is g @ H^T = g @ H.
    assert_close(grad, (g.double() @ hadamard_matrix(64, torch.float64, device)).float())


def test_empty(device):
    for shape in [(0, 8), (2, 0, 16)]:
        x = torch.randn(shape, device=device)
        out = lrkern.hadamard(x)
        assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("n", [1, 3, 96, 65536])
def test_rejects_bad_length(n):
    with pytest.raises(ValueError, match=rf"x\.shape\[-1\]={n} must be a power of two"):
        lrkern.hadamard(torch.randn(2, n))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8])
def test_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match=r"x has dtype"):
        lrkern.hadamard(torch.zeros(2, 8, dtype=dtype))


def test_rejects_scalar():
    with pytest.raises(ValueError, match=r"x must have at least 1 dim"):
        lrkern.hadamard(torch.tensor(1.0))
