"""lrkern::lif_multistep: the hand-derived reference backward against autograd through a plain time loop, every
backend against the reference (bit-exact fp32 spikes, gradients by error ratio), the module's SpikingJelly defaults,
opcheck, gradcheck on the sub-threshold (linear) regime, and errors."""
import math

import pytest
import torch

import lrkern
from lrkern.reference import lif as R
from lrkern.spiking import LIF
from tests.helpers import DTYPE_IDS, DTYPES, TOLERANCE, SurrogateSpike, err_ratio

# The `backend` fixture also runs lrkern's CUDA C backend (CuPy) here, where a GPU and CuPy are present.
CUDA_C_OPS = True

OPTS = [  # (v_reset (None = soft), decay_input, detach_reset, surrogate)
    (0.0, True, False, "sigmoid"), (0.0, True, True, "atan"), (None, True, False, "atan"),
    (None, False, True, "sigmoid"), (-0.2, False, False, "sigmoid"),
]
OPT_IDS = ["hard", "hard-detach-atan", "soft-atan", "soft-nodecay-detach", "hard-vr-nodecay"]


def _autograd_loop(x, v0, tau, vth, v_reset, decay_input, detach_reset, kind, alpha):
    vr = 0.0 if v_reset is None else v_reset
    v, spikes, vs = v0, [], []
    for t in range(x.shape[0]):
        h = v + (x[t] - (v - vr)) / tau if decay_input else v - (v - vr) / tau + x[t]
        s = SurrogateSpike.apply(h - vth, kind, alpha)
        sr = s.detach() if detach_reset else s
        v = h - vth * sr if v_reset is None else h * (1 - sr) + v_reset * sr
        spikes.append(s)
        vs.append(v)
    return torch.stack(spikes), v, torch.stack(vs)


@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_reference_backward_equals_autograd_through_the_loop(opt):
    v_reset, decay_input, detach_reset, sur = opt
    kind, alpha = lrkern.ops.lif.SURROGATES[sur], 3.0
    x = (torch.randn(6, 50, dtype=torch.float64) * 1.5).requires_grad_(True)
    v0 = (torch.randn(50, dtype=torch.float64) * 0.3).requires_grad_(True)
    s, v_last, v_seq = _autograd_loop(x, v0, 2.0, 1.0, v_reset, decay_input, detach_reset, kind, alpha)
    gs, gv, gseq = torch.randn_like(s), torch.randn_like(v_last), torch.randn_like(v_seq)
    ref_gx, ref_gv0 = torch.autograd.grad((s * gs).sum() + (v_last * gv).sum() + (v_seq * gseq).sum(), (x, v0))
    soft = v_reset is None
    _, h, _, _ = R.lif_forward(x.detach(), v0.detach(), 2.0, 1.0, v_reset or 0.0, soft, decay_input, False)
    gx, gv0 = R.lif_backward(gs, gv, gseq, h, s.detach(), 2.0, 1.0, v_reset or 0.0, soft, decay_input,
                             detach_reset, kind, alpha)
    # The reference computes in fp32; a wrong term in the derivation would show as an O(1) ratio.
    assert err_ratio(gx, ref_gx) < 1e-6 and err_ratio(gv0, ref_gv0) < 1e-6


def _args(x, v_reset, decay_input, detach_reset, sur, v0=None, store=True):
    return (x, v0, 2.0, 1.0, v_reset, sur, 4.0 if sur == "sigmoid" else 2.0, detach_reset, decay_input, store)


SHAPES = [(1, 7), (5, 1), (4, 130), (7, 3, 33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-N{}".format(s[0], math.prod(s[1:])))
def test_backends_match_the_reference(backend, device, shape, opt, dtype):
    v_reset, decay_input, detach_reset, sur = opt
    x = (torch.randn(shape, device=device) * 1.5).to(dtype).requires_grad_(True)
    v0 = torch.randn(shape[1:], device=device) * 0.3
    args = _args(x, v_reset, decay_input, detach_reset, sur, v0=v0.requires_grad_(True))
    s, v_last, v_seq, h = torch.ops.lrkern.lif_multistep(*args)
    with lrkern.use_backend("reference"):
        rs, rv, rseq, rh = torch.ops.lrkern.lif_multistep(*args)
    assert s.dtype == dtype and h.dtype == dtype and v_last.dtype == torch.float32
    assert torch.equal(s, rs)  # spikes come from the fp32 membrane on every backend
    if dtype == torch.float32:
        assert torch.equal(h, rh) and torch.equal(v_last, rv) and torch.equal(v_seq, rseq)
    else:
        assert err_ratio(h, rh) <= TOLERANCE[dtype] and err_ratio(v_last, rv) <= 1e-6
    gs, gv, gseq = torch.randn_like(s), torch.randn_like(v_last), torch.randn_like(v_seq)
    # Backward compared on the same saved H and S, so kernel error is measured, not forward rounding.
    got = lrkern.ops.lif_multistep_backward(gs, gv, gseq, h, s, 2.0, 1.0, v_reset, sur, args[6], detach_reset,
                                            decay_input)
    with lrkern.use_backend("reference"):
        ref = lrkern.ops.lif_multistep_backward(gs, gv, gseq, h, s, 2.0, 1.0, v_reset, sur, args[6], detach_reset,
                                                decay_input)
    tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    assert err_ratio(got[0], ref[0]) <= tol and err_ratio(got[1], ref[1]) <= 1e-6


def test_autograd_through_the_op(backend, device):
    x = (torch.randn(5, 40, device=device) * 1.5).requires_grad_(True)
    s, v_last, _, _ = torch.ops.lrkern.lif_multistep(*_args(x, 0.0, True, False, "sigmoid", store=False))
    ((s * torch.arange(40, device=device)).sum() + v_last.sum()).backward()
    xr = x.detach().double().requires_grad_(True)
    rs, rv, _ = _autograd_loop(xr, torch.zeros(40, dtype=torch.float64, device=device), 2.0, 1.0, 0.0, True, False,
                               0, 4.0)
    ((rs * torch.arange(40, device=device)).sum() + rv.sum()).backward()
    assert err_ratio(x.grad, xr.grad) <= 1e-6


def test_module_defaults_are_spikingjelly_lifnode():
    lif = LIF()
    assert (lif.tau, lif.v_threshold, lif.v_reset, lif.surrogate, lif.alpha) == (2.0, 1.0, 0.0, "sigmoid", 4.0)
    assert lif.decay_input and not lif.detach_reset
    x = torch.tensor([[1.5], [0.2], [2.5]])  # H = 0.75 (no spike), 0.475, 1.4875 (spike)
    assert lif(x).flatten().tolist() == [0.0, 0.0, 1.0]
    assert lif.v.item() == 0.0  # hard reset
    stateful = LIF(stateful=True, v_reset=None)
    stateful(torch.full((1, 2), 1.6))  # H = 0.8
    assert torch.allclose(stateful.v, torch.full((2,), 0.8))
    assert stateful(torch.full((1, 2), 1.6)).flatten().tolist() == [1.0, 1.0]  # 0.8 + (1.6 - 0.8) / 2 = 1.2


@pytest.mark.parametrize("case", range(4))
def test_opcheck(backend, device, case):
    x = torch.randn(4, 6, device=device)
    cases = [
        ("lif_multistep", _args(x.clone().requires_grad_(True), 0.0, True, False, "sigmoid")),
        ("lif_multistep", _args(x.half(), None, False, True, "atan", v0=torch.randn(6, device=device),
                                store=False)),
        ("lif_multistep_backward", (x, torch.randn(6, device=device), torch.empty(0, device=device), x,
                                    (x > 0).float(), 2.0, 1.0, 0.0, "sigmoid", 4.0, False, True)),
        ("lif_multistep_backward", (x, torch.randn(6, device=device), torch.randn(4, 6, device=device), x,
                                    (x > 0).float(), 2.0, 1.0, None, "atan", 2.0, True, False)),
    ]
    name, args = cases[case]
    torch.library.opcheck(getattr(torch.ops.lrkern, name).default, args)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")  # the op is fp32; tolerances allow it
def test_gradcheck_sub_threshold_regime(backend, device):
    """Below threshold with detach_reset the neuron is linear (no spike, and the reset's surrogate term is dropped),
    so finite differences check the membrane path exactly."""
    x = (torch.rand(3, 4, device=device) * 0.3).requires_grad_(True)
    v0 = (torch.rand(4, device=device) * 0.1).requires_grad_(True)

    def f(x, v0):
        _, v_last, v_seq, _ = torch.ops.lrkern.lif_multistep(x, v0, 2.0, 1.0, 0.0, "sigmoid", 4.0, True, True, True)
        return v_last, v_seq

    assert torch.autograd.gradcheck(f, (x, v0), eps=1e-2, atol=1e-4, rtol=1e-3)


def test_errors_name_the_argument():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"tau=-1.0 must be > 0"):
        torch.ops.lrkern.lif_multistep(x, None, -1.0, 1.0, 0.0, "sigmoid", 4.0, False, True, False)
    with pytest.raises(ValueError, match=r"surrogate='relu' is not supported"):
        LIF(surrogate="relu")
    with pytest.raises(ValueError, match=r"v0 must have x.shape\[1:\] = \(4,\)"):
        torch.ops.lrkern.lif_multistep(x, torch.zeros(5), 2.0, 1.0, 0.0, "sigmoid", 4.0, False, True, False)
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        torch.ops.lrkern.lif_multistep(x.long(), None, 2.0, 1.0, 0.0, "sigmoid", 4.0, False, True, False)
