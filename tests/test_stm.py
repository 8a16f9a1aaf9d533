"""lrkern::stm_multistep (Spiking Temporal Modulator): the hand-derived reference backward against autograd through an
independent float64 time loop (every gradient, every flag), every backend against the reference (bit-exact fp32
spikes / h / v_last, gradients by error ratio), near-threshold gradients, the STM module at init against the LIF
module, opcheck, gradcheck on the sub-threshold regime, and errors."""
import math

import pytest
import torch

import lrkern
from lrkern.reference import stm as R
from lrkern.spiking import LIF
from lrkern.spiking.stm import STM
from tests.helpers import DTYPE_IDS, DTYPES, TOLERANCE, SurrogateSpike, err_ratio

# The `backend` fixture also runs lrkern's CUDA C backend (CuPy) here, where a GPU and CuPy are present.
CUDA_C_OPS = True

RHO = math.exp(-0.25)
OPTS = [  # (v_reset (None = soft), decay_input, detach_reset, surrogate)
    (0.0, True, False, "sigmoid"), (0.0, True, True, "atan"), (None, True, False, "atan"),
    (None, False, True, "sigmoid"), (-0.2, False, False, "sigmoid"), (None, True, True, "sigmoid"),
]
OPT_IDS = ["hard", "hard-detach-atan", "soft-atan", "soft-nodecay-detach", "hard-vr-nodecay", "soft-detach"]
GRAD_NAMES = ("u", "v0", "gain", "tau", "theta0", "beta")


def _autograd_loop(u, v0, gain, tau, theta0, beta, rho, v_reset, decay_input, detach_reset, kind, alpha):
    """The STM as a plain autograd time loop over u [T, B, C, S]: spec 3.2 written out, nothing shared with the
    reference but the surrogate's formula. The trace keeps the spikes' surrogate gradient; detach_reset only cuts the
    reset's."""
    vr = 0.0 if v_reset is None else v_reset
    tc, th0 = tau.view(1, -1, 1), theta0.view(1, -1, 1)
    v, a, spikes = v0, torch.zeros_like(v0), []
    for t in range(u.shape[0]):
        x = u[t] if gain is None else gain.unsqueeze(-1) * u[t]
        h = v + (x - (v - vr)) / tc if decay_input else v - (v - vr) / tc + x
        theta = th0 if beta is None else th0 + beta.view(1, -1, 1) * a
        s = SurrogateSpike.apply(h - theta, kind, alpha)
        sr = s.detach() if detach_reset else s
        v = h - theta * sr if v_reset is None else h * (1 - sr) + v_reset * sr
        a = rho * a + s
        spikes.append(s)
    return torch.stack(spikes), v


def _params(b, c, dtype=torch.float32, device="cpu", dynamic=True, with_gain=True):
    gain = (0.6 + torch.rand(b, c, dtype=dtype)).to(device) if with_gain else None
    tau = (1.5 + torch.rand(c, dtype=dtype)).to(device)
    theta0 = (0.8 + 0.4 * torch.rand(c, dtype=dtype)).to(device)
    beta = (0.2 + 0.5 * torch.rand(c, dtype=dtype)).to(device) if dynamic else None
    return gain, tau, theta0, beta


@pytest.mark.parametrize("dynamic", [True, False], ids=["beta", "static"])
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_reference_backward_equals_autograd_through_the_loop(opt, dynamic):
    v_reset, decay_input, detach_reset, sur = opt
    kind, alpha = lrkern.ops.lif.SURROGATES[sur], 3.0
    T, B, C, S = 6, 2, 3, 20
    u = torch.randn(T, B, C, S, dtype=torch.float64) * 1.5 + 0.5
    v0 = torch.randn(B, C, S, dtype=torch.float64) * 0.3
    gain, tau, theta0, beta = _params(B, C, torch.float64, dynamic=dynamic, with_gain=dynamic)
    leaves = [t.requires_grad_(True) for t in (u, v0, gain, tau, theta0, beta) if t is not None]
    s, v_last = _autograd_loop(u, v0, gain, tau, theta0, beta, RHO, v_reset, decay_input, detach_reset, kind, alpha)
    gs, gv = torch.randn_like(s), torch.randn_like(v_last)
    want = torch.autograd.grad((s * gs).sum() + (v_last * gv).sum(), leaves)

    def f32(t):
        return None if t is None else t.detach().float()

    soft = v_reset is None
    rs, rh, _ = R.stm_forward(f32(u), f32(v0), f32(gain), f32(tau), f32(theta0), f32(beta), RHO, v_reset or 0.0,
                              soft, decay_input)
    assert torch.equal(rs, s.float()) and 0.1 < rs.mean().item() < 0.6  # same spikes, and both states occur
    gu, gv0, gp = R.stm_backward(f32(gs), f32(gv), f32(u), f32(v0), rh, rs, f32(gain), f32(tau), f32(theta0),
                                 f32(beta), RHO, v_reset or 0.0, soft, decay_input, detach_reset, kind, alpha)
    got = [gu, gv0] + ([gp[0], gp[1].sum(0), gp[2].sum(0), gp[3].sum(0)] if dynamic else [gp[1].sum(0), gp[2].sum(0)])
    names = GRAD_NAMES if dynamic else ("u", "v0", "tau", "theta0")
    for name, g, w in zip(names, got, want):
        # The reference computes in fp32; a wrong term in the derivation would show as an O(1) ratio.
        assert err_ratio(g, w) < 1e-5, name
    if not dynamic:
        assert not gp[3].any()  # no beta: a zero row (the gain row is the gradient at the implicit gain of 1)


def _op_args(u, v0, gain, tau, theta0, beta, opt):
    v_reset, decay_input, detach_reset, sur = opt
    return (u, v0, gain, tau, theta0, beta, RHO, v_reset, sur, 4.0 if sur == "sigmoid" else 2.0, detach_reset,
            decay_input)


SHAPES = [(1, 2, 3, 7, 5), (5, 2, 3, 7, 5), (3, 1, 2, 1100), (4, 2, 1, 1)]
SHAPE_IDS = ["T1-7x5", "T5-7x5", "T3-S1100", "T4-S1"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backends_match_the_reference(backend, device, shape, opt, dtype):
    if shape[3] == 1100 and opt not in OPTS[:2]:
        pytest.skip("the wide-row shape runs two flag sets (the Triton interpreter is slow)")
    b, c = shape[1], shape[2]
    u = (torch.randn(shape) * 1.5 + 0.6).to(dtype).to(device)
    v0 = (torch.randn(shape[1:]) * 0.3).to(device)
    gain, tau, theta0, beta = _params(b, c, device=device)
    args = _op_args(u, v0, gain, tau, theta0, beta, opt)
    s, v_last, h = torch.ops.lrkern.stm_multistep(*args)
    with lrkern.use_backend("reference"):
        rs, rv, rh = torch.ops.lrkern.stm_multistep(*args)
    assert s.dtype == dtype and h.dtype == dtype and v_last.dtype == torch.float32
    assert s.shape == h.shape == u.shape and v_last.shape == u.shape[1:]
    assert torch.equal(s, rs)  # spikes come from the fp32 membrane on every backend
    if dtype == torch.float32:
        assert torch.equal(h, rh) and torch.equal(v_last, rv)
    else:
        assert err_ratio(h, rh) <= TOLERANCE[dtype] and err_ratio(v_last, rv) <= 1e-6
    if shape[0] > 1 and shape[3] > 1:
        assert 0.05 < s.float().mean().item() < 0.95
    gs, gv = torch.randn_like(s), torch.randn_like(v_last)
    v_reset, decay_input, detach_reset, sur = opt
    bwd = (gs, gv, u, v0, h, s, gain, tau, theta0, beta, RHO, v_reset, sur, args[9], detach_reset, decay_input)
    # Backward compared on the same saved H and S, so kernel error is measured, not forward rounding.
    got = lrkern.ops.stm_multistep_backward(*bwd)
    with lrkern.use_backend("reference"):
        ref = lrkern.ops.stm_multistep_backward(*bwd)
    tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    assert err_ratio(got[0], ref[0]) <= tol and err_ratio(got[1], ref[1]) <= 1e-6
    for i, name in enumerate(("gain", "tau", "theta0", "beta")):
        assert err_ratio(got[2][i], ref[2][i]) <= 1e-5, name


@pytest.mark.parametrize("opt", OPTS[:3], ids=OPT_IDS[:3])
def test_backward_without_u_or_beta(backend, device, opt):
    """u = None (no gain / tau gradient wanted) and beta = None: the rows that are not computed are zeros, the rest
    equals the full backward's."""
    u = (torch.randn(4, 2, 3, 7, 5) * 1.5 + 0.6).to(device)
    gain, tau, theta0, _ = _params(2, 3, device=device)
    args = _op_args(u, None, gain, tau, theta0, None, opt)
    s, v_last, h = torch.ops.lrkern.stm_multistep(*args)
    gs, gv = torch.randn_like(s), torch.randn_like(v_last)
    v_reset, decay_input, detach_reset, sur = opt
    full = lrkern.ops.stm_multistep_backward(gs, gv, u, None, h, s, gain, tau, theta0, None, RHO, v_reset, sur,
                                             args[9], detach_reset, decay_input)
    part = lrkern.ops.stm_multistep_backward(gs, gv, None, None, h, s, gain, tau, theta0, None, RHO, v_reset, sur,
                                             args[9], detach_reset, decay_input)
    assert torch.equal(part[0], full[0]) and torch.equal(part[1], full[1]) and torch.equal(part[2][2], full[2][2])
    assert not part[2][0].any() and not part[2][1].any() and not part[2][3].any() and not full[2][3].any()
    assert full[2][0].abs().sum() > 0 and full[2][1].abs().sum() > 0


def test_autograd_through_the_op(backend, device):
    """register_autograd: every gradient (parameters summed over b) against autograd through the float64 loop."""
    T, B, C = 5, 2, 3
    u = torch.randn(T, B, C, 4, 3) * 1.5 + 0.5
    v0 = torch.randn(B, C, 4, 3) * 0.3
    gain, tau, theta0, beta = _params(B, C)
    leaves = [t.clone().to(device).requires_grad_(True) for t in (u, v0, gain, tau, theta0, beta)]
    s, v_last, _ = torch.ops.lrkern.stm_multistep(*_op_args(*leaves, OPTS[0]))
    w = torch.arange(s[0].numel(), device=device).reshape(s.shape[1:]) % 7 - 3.0
    ((s * w).sum() + v_last.sum()).backward()
    ref = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    flat = [ref[0].flatten(3), ref[1].flatten(2)] + ref[2:]
    rs, rv = _autograd_loop(*flat, RHO, 0.0, True, False, 0, 4.0)
    ((rs * w.cpu().double().flatten(2)).sum() + rv.sum()).backward()
    for name, got, want in zip(GRAD_NAMES, leaves, ref):
        assert err_ratio(got.grad, want.grad) <= 1e-5, name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_near_threshold_inputs_give_nonzero_gradients(backend, device, dtype):
    """Regression test for SpikingJelly's zero-gradient bug: with every membrane close to its threshold, every
    gradient is nonzero on every backend (and matches the reference)."""
    T, B, C, S = 3, 2, 3, 35
    gain, tau, theta0, beta = _params(B, C, device=device)
    # v0 = 0, hard reset to 0, decay_input: H[0] = g u / tau; aim it at theta0 +- 0.05.
    target = theta0.view(1, C, 1) + 0.1 * (torch.rand(B, C, S, device=device) - 0.5)
    u0 = target * tau.view(1, C, 1) / gain.unsqueeze(-1)
    u = (u0.unsqueeze(0) * torch.tensor([1.0, 0.4, 0.6], device=device).view(T, 1, 1, 1)).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (u, gain, tau, theta0, beta)]
    uu, gg, tt, th, bb = leaves
    s, v_last, _ = torch.ops.lrkern.stm_multistep(uu, None, gg, tt, th, bb, RHO, 0.0, "sigmoid", 4.0, False, True)
    (s.float().sum() + v_last.sum()).backward()
    for name, leaf in zip(("u", "gain", "tau", "theta0", "beta"), leaves):
        assert torch.isfinite(leaf.grad.float()).all() and leaf.grad.abs().sum() > 0, name
    assert (uu.grad[0] != 0).float().mean() > 0.99  # every neuron of the first step


@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_stm_at_init_is_lif(backend, device, opt):
    """beta = 0 and no gain: the STM is the LIF neuron; bit-identical spikes and final membrane, same gradient."""
    v_reset, decay_input, detach_reset, sur = opt
    kw = dict(tau=2.0, v_threshold=1.0, v_reset=v_reset, surrogate=sur, detach_reset=detach_reset,
              decay_input=decay_input)
    stm, lif = STM(3, **kw).to(device), LIF(**kw)
    u = (torch.randn(6, 2, 3, 7, 5, device=device) * 1.5 + 0.5).requires_grad_(True)
    ul = u.detach().clone().requires_grad_(True)
    s, sl = stm(u), lif(ul)
    assert torch.equal(s, sl) and torch.equal(stm.v, lif.v) and 0.1 < s.mean().item() < 0.6
    g = torch.randn_like(s)
    (s * g).sum().backward()
    (sl * g).sum().backward()
    assert err_ratio(u.grad, ul.grad) <= 1e-6
    assert stm.tau.grad is not None and stm.theta0.grad is not None and stm.beta.grad is not None


def test_module():
    stm = STM(4)
    assert stm.rho == RHO and stm.alpha == 4.0 and stm.v_reset == 0.0 and stm.decay_input and not stm.detach_reset
    assert [n for n, _ in stm.named_parameters()] == ["tau", "theta0", "beta"]
    assert torch.equal(stm.tau, torch.full((4,), 2.0)) and torch.equal(stm.theta0, torch.ones(4))
    assert torch.equal(stm.beta, torch.zeros(4))
    fixed = STM(4, dynamic_threshold=False, learn_tau=False, surrogate="atan")
    assert fixed.beta is None and fixed.alpha == 2.0
    assert [n for n, _ in fixed.named_parameters()] == ["theta0"] and "tau" in dict(fixed.named_buffers())
    u = torch.randn(3, 2, 4, 5) + 1.0
    s = fixed(u, gain=torch.rand(2, 4) + 0.5)
    assert s.shape == u.shape and s.dtype == u.dtype
    # A half-precision model keeps fp32 neuron parameters in the op; u in fp16 works.
    half = STM(4).half()
    assert half(u.half()).dtype == torch.float16


def test_dynamic_threshold_raises_the_threshold():
    """The trace: a neuron driven by a constant input fires less with beta > 0."""
    stm = STM(2)
    with torch.no_grad():
        stm.beta.copy_(torch.tensor([0.0, 1.0]))
    u = torch.full((20, 1, 2, 1), 3.0)
    s = stm(u)
    assert s[:, 0, 0].sum() > s[:, 0, 1].sum() > 0


@pytest.mark.parametrize("case", range(4))
def test_opcheck(backend, device, case):
    T, B, C = 3, 2, 3
    u = torch.randn(T, B, C, 2, 3, device=device) + 0.5
    gain, tau, theta0, beta = _params(B, C, device=device)
    v0 = torch.randn(B, C, 2, 3, device=device) * 0.3
    s, _, h = torch.ops.lrkern.stm_multistep(u, None, gain, tau, theta0, beta, RHO, 0.0, "sigmoid", 4.0, False, True)
    gv = torch.randn(B, C, 2, 3, device=device)

    def req(*ts):
        return [t.clone().requires_grad_(True) for t in ts]

    cases = [
        ("stm_multistep", (*req(u), None, *req(gain, tau, theta0, beta), RHO, 0.0, "sigmoid", 4.0, False, True)),
        ("stm_multistep", (u.half(), v0, None, tau, theta0, None, 0.5, None, "atan", 2.0, True, False)),
        ("stm_multistep_backward", (torch.randn_like(s), gv, u, v0, h, s, gain, tau, theta0, beta, RHO, 0.0,
                                    "sigmoid", 4.0, False, True)),
        ("stm_multistep_backward", (torch.randn_like(s), gv, None, None, h, s, None, tau, theta0, None, RHO, None,
                                    "atan", 2.0, True, False)),
    ]
    name, args = cases[case]
    torch.library.opcheck(getattr(torch.ops.lrkern, name).default, args)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")  # the op is fp32; tolerances allow it
def test_gradcheck_sub_threshold_regime(backend, device):
    """Below threshold with detach_reset the neuron is smooth (no spike, no reset surrogate term; the threshold gets
    no gradient through v_last), so finite differences check u, v0, gain and tau exactly, theta0 and beta as zeros.
    The op is fp32 only: fp32 inputs, with finite-difference tolerances to match."""
    T, B, C = 3, 2, 3
    u = (torch.rand(T, B, C, 2, device=device) * 0.3).requires_grad_(True)
    v0 = (torch.rand(B, C, 2, device=device) * 0.1).requires_grad_(True)
    gain, tau, theta0, beta = (p.requires_grad_(True) for p in _params(B, C, device=device))

    def f(u, v0, gain, tau, theta0, beta):
        _, v_last, _ = torch.ops.lrkern.stm_multistep(u, v0, gain, tau, theta0, beta, RHO, 0.0, "sigmoid", 4.0, True,
                                                      True)
        return v_last

    assert torch.autograd.gradcheck(f, (u, v0, gain, tau, theta0, beta), eps=1e-2, atol=1e-4, rtol=1e-3)


def test_errors_name_the_argument():
    u = torch.randn(3, 2, 4, 5)
    gain, tau, theta0, beta = _params(2, 4)

    def call(**kw):
        args = dict(u=u, v0=None, gain=gain, tau=tau, theta0=theta0, beta=beta, rho=RHO, v_reset=0.0,
                    surrogate="sigmoid", alpha=4.0, detach_reset=False, decay_input=True)
        args.update(kw)
        return torch.ops.lrkern.stm_multistep(*args.values())

    with pytest.raises(ValueError, match=r"tau must have shape \[C\] = \(4,\), got \(3,\)"):
        call(tau=tau[:3])
    with pytest.raises(ValueError, match=r"theta0 must have shape \[C\]"):
        call(theta0=theta0[None])
    with pytest.raises(TypeError, match=r"beta has dtype torch.float16"):
        call(beta=beta.half())
    with pytest.raises(ValueError, match=r"gain must have shape \[B, C\] = \(2, 4\), got \(4,\)"):
        call(gain=gain[0])
    with pytest.raises(ValueError, match=r"v0 must have u.shape\[1:\] = \(2, 4, 5\)"):
        call(v0=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"u must have at least 3 dim"):
        call(u=u[:, 0, 0])
    with pytest.raises(TypeError, match=r"u has dtype torch.int64"):
        call(u=u.long())
    with pytest.raises(ValueError, match=r"rho=1.0 must be in \[0, 1\)"):
        call(rho=1.0)
    with pytest.raises(ValueError, match=r"rho must be a finite number"):
        call(rho=float("nan"))
    with pytest.raises(ValueError, match=r"tau must be > 0 in every channel; tau\[2\] = -0.5"):
        call(tau=torch.tensor([2.0, 2.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match=r"surrogate='relu' is not supported"):
        call(surrogate="relu")
    with pytest.raises(ValueError, match=r"alpha=0.0 must be > 0"):
        call(alpha=0.0)
    with pytest.raises(ValueError, match=r"u must be \[T, B, C=3, \*spatial\]"):
        STM(3)(u)
    with pytest.raises(ValueError, match=r"tau=0.0 must be > 0"):
        STM(3, tau=0.0)
    with pytest.raises(ValueError, match=r"surrogate='relu' is not supported"):
        STM(3, surrogate="relu")
    stm = STM(4)
    with torch.no_grad():
        stm.tau[1] = -1.0
    with pytest.raises(ValueError, match=r"tau\[1\] = -1.0"):
        stm(u)
