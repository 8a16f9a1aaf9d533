"""Triton LIF launchers (``lrkern.kernels.lif``) against ``lrkern.reference.lif``, at small awkward shapes.

Forward: s, h, v_last and v_seq bit-identical to the reference in every dtype (the kernel follows the reference's
fp32 operations one by one; h is the reference's own rounding of the fp32 h). Backward: fed the reference's h and s,
grad_x and grad_v0 within the suite's error ratio (the surrogate's exp is the only operation that differs).

The reference always runs on CPU: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal, which is
exactly what the spec rules out, so a CUDA reference would not be the spec's arithmetic. tau = 1.7 makes that
difference visible (in fp32, x / 1.7 and x * (1 / 1.7) differ for about 38% of normal x).

Launch geometry reached at the default constants: N = 1 (a one-element block, N specialised to a constant), N = 5
(one masked program), N = 130 and N = 1000 (128-wide programs, the last one masked); ``test_forward_full_block``
reaches the 1024-wide block at 4 warps.
"""
import pytest
import torch

from lrkern.reference import lif as ref
from tests.helpers import DTYPE_IDS, DTYPES, assert_close

TAU, V_TH, V_RESET = 1.7, 1.0, -0.2
ALPHA = {ref.SIGMOID: 4.0, ref.ATAN: 2.0}  # SpikingJelly's defaults

SHAPES = [(1, 1), (3, 5), (8, 130), (1, 1000), (8, 1000)]
SHAPE_IDS = [f"T{t}-N{n}" for t, n in SHAPES]
RESET_IDS = ["hard", "soft"]
DECAY_IDS = ["nodecay", "decay"]


def _inputs(t, n, dtype, device):
    """x around the threshold (about a third of the steps fire) and a nonzero v0, drawn on CPU for every device."""
    x = (torch.randn(t, n) * 1.5 + 0.8).to(dtype)
    v0 = torch.randn(n) * 0.5
    return x.to(device), v0.to(device)


def _cpu(ts):
    return [a.cpu() for a in ts]


def _check_forward(x, v0, tau, soft_reset, decay_input, store_v_seq, v_th=V_TH, v_reset=V_RESET):
    from lrkern.kernels.lif import lif_forward

    args = (tau, v_th, v_reset, soft_reset, decay_input, store_v_seq)
    out = lif_forward(x, v0, *args)
    want = ref.lif_forward(x.cpu(), v0.cpu(), *args)
    for name, o, w in zip(("s", "h", "v_last", "v_seq"), _cpu(out), want):
        got, exp = (o.dtype, tuple(o.shape)), (w.dtype, tuple(w.shape))
        assert got == exp, f"{name}: {got} != {exp}"
        assert torch.equal(o, w), f"{name}: {(o != w).sum().item()} of {w.numel()} elements differ"
    assert all(o.is_contiguous() for o in out)
    return want


@pytest.mark.parametrize("decay_input", [False, True], ids=DECAY_IDS)
@pytest.mark.parametrize("soft_reset", [False, True], ids=RESET_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t,n", SHAPES, ids=SHAPE_IDS)
def test_forward_bit_identical(kdevice, t, n, dtype, soft_reset, decay_input):
    x, v0 = _inputs(t, n, dtype, kdevice)
    for store_v_seq in (False, True):
        s, _, _, v_seq = _check_forward(x, v0, TAU, soft_reset, decay_input, store_v_seq)
        assert v_seq.numel() == (t * n if store_v_seq else 0)
    if n >= 130:  # the comparison is not vacuous: both spiking and silent steps occur
        assert 0.1 < s.float().mean().item() < 0.9


def test_forward_full_block(kdevice, monkeypatch):
    import lrkern.kernels.lif as kl

    # One program: the 1024-wide default block, 24 lanes masked.
    monkeypatch.setattr(kl, "_MIN_PROGRAMS", 1)
    assert kl._block(1000) == 1024 and kl._num_warps(1024) == 4
    x, v0 = _inputs(8, 1000, torch.bfloat16, kdevice)
    _check_forward(x, v0, TAU, False, True, True)


@pytest.mark.parametrize("soft_reset", [False, True], ids=RESET_IDS)
@pytest.mark.parametrize("decay_input", [False, True], ids=DECAY_IDS)
def test_forward_fires_at_threshold(kdevice, soft_reset, decay_input):
    # tau = 2, v0 = 0, v_reset = 0: h = x / 2 (decay_input) or x exactly, so x = k * v_th lands h exactly on the
    # threshold (non-strict firing spikes), and the next float below it does not.
    v_th = 0.75
    on = (2.0 if decay_input else 1.0) * v_th
    below = torch.nextafter(torch.tensor(on), torch.tensor(0.0)).item()
    x = torch.tensor([[on, below, 0.0, 4.0, -1.0]]).to(kdevice)
    s, h, _, _ = _check_forward(x, torch.zeros(5, device=kdevice), 2.0, soft_reset, decay_input, True, v_th, 0.0)
    assert h[0, 0].item() == v_th
    assert s[0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_empty_time_axis(kdevice):
    from lrkern.kernels.lif import lif_backward, lif_forward

    x, v0 = _inputs(0, 5, torch.float32, kdevice)
    s, h, v_last, v_seq = lif_forward(x, v0, TAU, V_TH, V_RESET, False, True, True)
    assert s.shape == h.shape == v_seq.shape == (0, 5) and torch.equal(v_last, v0)
    g = torch.randn(5, device=kdevice)
    empty = torch.empty(0, device=kdevice)
    grad_x, grad_v0 = lif_backward(s, g, empty, h, s, TAU, V_TH, V_RESET, False, True, False, ref.SIGMOID, 4.0)
    assert grad_x.shape == (0, 5) and torch.equal(grad_v0, g)


def _check_backward(t, n, dtype, device, soft_reset, decay_input, detach_reset, kind, with_seq):
    from lrkern.kernels.lif import lif_backward

    x, v0 = _inputs(t, n, dtype, "cpu")
    # The forward is bit-identical (tested above), so both backends get the reference's h and s.
    s, h, _, _ = ref.lif_forward(x, v0, TAU, V_TH, V_RESET, soft_reset, decay_input, False)
    grad_s = torch.randn(t, n).to(dtype)
    grad_v_last = torch.randn(n)
    grad_v_seq = torch.randn(t, n) if with_seq else torch.empty(0)
    args = (TAU, V_TH, V_RESET, soft_reset, decay_input, detach_reset, kind, ALPHA[kind])
    want_x, want_v0 = ref.lif_backward(grad_s, grad_v_last, grad_v_seq, h, s, *args)
    dev = [a.to(device) for a in (grad_s, grad_v_last, grad_v_seq, h, s)]
    grad_x, grad_v0 = lif_backward(*dev, *args)
    assert grad_x.is_contiguous() and grad_v0.dtype == torch.float32
    assert_close(grad_x.cpu(), want_x, dtype)
    assert_close(grad_v0.cpu(), want_v0, torch.float32)


@pytest.mark.parametrize("kind", [ref.SIGMOID, ref.ATAN], ids=["sigmoid", "atan"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("decay_input", [False, True], ids=DECAY_IDS)
@pytest.mark.parametrize("soft_reset", [False, True], ids=RESET_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_flags(kdevice, dtype, soft_reset, decay_input, detach_reset, kind):
    """Every flag combination at T = 3, N = 130 (two programs, the second masked), with and without grad_v_seq."""
    for with_seq in (False, True):
        _check_backward(3, 130, dtype, kdevice, soft_reset, decay_input, detach_reset, kind, with_seq)


# Two opposite flag sets per shape: (soft_reset, decay_input, detach_reset, surrogate).
SHAPE_FLAGS = [(False, True, False, ref.SIGMOID), (True, False, True, ref.ATAN)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t,n", SHAPES, ids=SHAPE_IDS)
def test_backward_shapes(kdevice, t, n, dtype):
    for soft_reset, decay_input, detach_reset, kind in SHAPE_FLAGS:
        for with_seq in (False, True):
            _check_backward(t, n, dtype, kdevice, soft_reset, decay_input, detach_reset, kind, with_seq)


def test_backward_rejects_unknown_surrogate(kdevice):
    from lrkern.kernels.lif import lif_backward

    z = torch.zeros(1, 1, device=kdevice)
    with pytest.raises(ValueError, match="surrogate_kind"):
        lif_backward(z, torch.zeros(1, device=kdevice), torch.empty(0, device=kdevice), z, z, TAU, V_TH, V_RESET,
                     False, True, False, 2, 1.0)

