"""Triton low-rank launchers (``lrkern.kernels.lowrank``) against plain torch in float64, at small awkward shapes.

fp16/bf16 x: the projection rounds b to x's dtype inside the kernel (so the tensor cores take both operands), so its
reference rounds b the same way; what remains is the kernel's own fp32 accumulation, measured apart from that
rounding (the DESIGN's "same quantized codes" rule). Products of two fp16/bf16 values are exact in fp32, so on CPU
the error is fp32-level; the bound is still the table's for x's dtype, because GPU tensor cores add those products
with truncating, not IEEE, fp32 sums. The Gram rounds nothing, so its reference is x upcast, under the same bound.
"""
import pytest
import torch

from tests.helpers import DTYPE_IDS, DTYPES, TOLERANCE, assert_close, err_ratio


def _project_ref(x, a, b):
    bq = b.to(x.dtype) if x.dtype != torch.float32 else b  # the kernel's rounding of b (see the module docstring)
    return torch.einsum("mr,smn,nk->srk", a.double(), x.double(), bq.double())


def _unfold(x, dim):
    return x.double().movedim(dim, 0).reshape(x.shape[dim], -1)


# (S, M1, M2, R1, R2): one matrix, M1/M2 off the 64-block (5, 37, 130: partial tiles, several row tiles and M1
# splits), ranks 1, 3, 17, 40 (all padded to the 16 a dot needs).
PROJECT_CASES = [(1, 5, 37, 1, 3), (3, 37, 130, 17, 40), (3, 130, 5, 40, 17), (1, 130, 130, 3, 1)]
PROJECT_IDS = [f"S{s}-M{m1}x{m2}-R{r1}x{r2}" for s, m1, m2, r1, r2 in PROJECT_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("s,m1,m2,r1,r2", PROJECT_CASES, ids=PROJECT_IDS)
def test_two_sided_project(kdevice, s, m1, m2, r1, r2, dtype):
    from lrkern.kernels.lowrank import two_sided_project

    x = torch.randn(s, m1, m2, device=kdevice).to(dtype)
    a, b = torch.randn(m1, r1, device=kdevice), torch.randn(m2, r2, device=kdevice)
    out = two_sided_project(x, a, b)
    assert out.is_contiguous()
    assert_close(out, _project_ref(x, a, b).float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_two_sided_project_strided_x_and_split_paths(kdevice, monkeypatch, dtype):
    import lrkern.kernels.lowrank as kl

    # Permuted view: x's last dim has the largest stride, its first the smallest (no unit stride along M2).
    x = torch.randn(37, 3, 130, device=kdevice).to(dtype).permute(1, 2, 0)
    a, b = torch.randn(130, 40, device=kdevice), torch.randn(37, 17, device=kdevice)
    want = _project_ref(x, a, b).float()
    assert_close(kl.two_sided_project(x, a, b), want, dtype)
    # Rank blocks of 16 (40 -> 3 blocks, 17 -> 2), 16-row tiles, and few programs wanted: each M1 split walks
    # several row tiles, the last one fewer.
    monkeypatch.setattr(kl, "MAX_BLOCK_R", 16)
    monkeypatch.setattr(kl, "BLOCK_M1", 16)
    monkeypatch.setattr(kl, "_MIN_PROGRAMS", 8)
    assert_close(kl.two_sided_project(x, a, b), want, dtype)


def test_two_sided_project_rank_limit(kdevice):
    from lrkern.kernels.lowrank import MAX_RANK, two_sided_project

    x = torch.randn(1, 4, 4, device=kdevice)
    with pytest.raises(ValueError, match="a has R1 = 257"):
        two_sided_project(x, torch.randn(4, MAX_RANK + 1, device=kdevice), torch.randn(4, 2, device=kdevice))
    with pytest.raises(ValueError, match="b has R2 = 257"):
        two_sided_project(x, torch.randn(4, 2, device=kdevice), torch.randn(4, MAX_RANK + 1, device=kdevice))


def _gram_check(x, dim, alpha=0.7):
    from lrkern.kernels.lowrank import mode_gram_accumulate

    n = x.shape[dim]
    u = _unfold(x, dim)
    # A symmetric running sum already in out: the kernel must add to it, in both triangles.
    out0 = torch.randn(n, n, device=x.device, dtype=torch.float64)
    out0 = out0 + out0.T
    out = out0.float()
    mode_gram_accumulate(x, out, dim, alpha)
    assert_close(out, (out0 + alpha * (u @ u.T)).float(), x.dtype)
    # Mirrored blocks written: symmetric up to the rounding of the split-K atomic sums.
    assert err_ratio(out, out.T) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_mode_gram_4d(kdevice, monkeypatch, dim, dtype):
    import lrkern.kernels.lowrank as kl

    # 16-wide tiles: mode 3 (n = 37) has 3 x 3 tiles (6 lower-triangle programs, mirrored blocks), and every mode
    # splits its contraction over several programs that atomically add into out.
    monkeypatch.setattr(kl, "GRAM_BLOCK_N", 16)
    monkeypatch.setattr(kl, "GRAM_BLOCK_T", 16)
    _gram_check(torch.randn(3, 5, 7, 37, device=kdevice).to(dtype), dim)


# (shape, dim): 2-D and 3-D at the default tiles; n = 1, n = 130 (3 x 3 tiles of 64), odd contraction lengths.
GRAM_CASES = [((37, 20), 0), ((37, 20), 1), ((1, 33), 0), ((130, 3), 0), ((4, 37, 9), 0), ((4, 37, 9), 1),
              ((4, 37, 9), 2), ((4, 37, 9), -1)]
GRAM_IDS = [f"x{'x'.join(map(str, s))}-d{d}" for s, d in GRAM_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,dim", GRAM_CASES, ids=GRAM_IDS)
def test_mode_gram_2d_3d(kdevice, shape, dim, dtype):
    _gram_check(torch.randn(shape, device=kdevice).to(dtype), dim)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_mode_gram_strided_x(kdevice, dim):
    # Permuted 4-D view: for dims 1 and 2 the dims around `dim` cannot merge (contiguous-copy path), for 0 and 3
    # one side is a strided view.
    _gram_check(torch.randn(5, 3, 7, 6, device=kdevice).permute(2, 0, 3, 1), dim)
    if dim < 2:  # a transposed 2-D matrix is a strided view for both dims
        _gram_check(torch.randn(20, 37, device=kdevice).T, dim)


def test_mode_gram_accumulates(kdevice):
    from lrkern.kernels.lowrank import mode_gram_accumulate

    x = torch.randn(3, 37, 11, device=kdevice)
    out = torch.zeros(37, 37, device=kdevice)
    mode_gram_accumulate(x, out, 1, 0.5)
    mode_gram_accumulate(x, out, 1, 0.5)  # two halves make one Gram
    u = _unfold(x, 1)
    assert_close(out, (u @ u.T).float())
