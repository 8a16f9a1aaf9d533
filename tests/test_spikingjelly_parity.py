"""lrkern's LIF against SpikingJelly's ``LIFNode`` (multi-step, its ``torch`` backend where it has a choice), and
``lrkern.spiking.from_spikingjelly``. Skipped when SpikingJelly is not installed (`pip install --no-deps
spikingjelly`: its neurons import with torch and numpy alone).

Spikes, the final membrane and the membrane sequence are compared exactly: SpikingJelly's update is the same fp32
arithmetic as lrkern's in every case below (with tau = 2 its no-decay shortcut v * (1 - 1/tau) + x equals
v - v/tau + x exactly; for other tau it would differ in the last bit). On CUDA, SpikingJelly's ``/ tau`` is a
multiply by the reciprocal (torch divides by a Python scalar that way there), so for a tau that is not a power of
two a spike exactly at threshold may differ, and those cases are compared by agreement instead. Gradients differ only
in the order of the surrogate's products and are compared by error ratio.
"""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import lrkern
from lrkern.spiking import LIF, from_spikingjelly
from tests.helpers import err_ratio

# The `backend` fixture also runs lrkern's CUDA C backend (CuPy) here, where a GPU and CuPy are present.
CUDA_C_OPS = True

neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional, surrogate  # noqa: E402

# (tau, v_threshold, v_reset (None = soft), decay_input, detach_reset, surrogate, alpha)
OPTS = [
    (2.0, 1.0, 0.0, True, False, "sigmoid", 4.0), (2.0, 1.0, 0.0, True, True, "atan", 2.0),
    (2.0, 1.0, None, True, False, "atan", 2.0), (2.0, 1.0, None, False, True, "sigmoid", 4.0),
    (3.0, 0.8, -0.2, False, False, "sigmoid", 3.0), (3.0, 1.0, 0.0, True, False, "atan", 3.0),
]
OPT_IDS = ["default", "detach-atan", "soft-atan", "soft-nodecay-detach", "hard-vr-nodecay-tau3", "atan3-tau3"]
SJ_SURROGATES = {"sigmoid": surrogate.Sigmoid, "atan": surrogate.ATan}


def sj_node(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, sur="sigmoid", alpha=4.0,
            step_mode="m", store_v_seq=False):
    """SpikingJelly's LIFNode; its plain PyTorch time loop (backend='torch') on versions that offer backends."""
    kw = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset,
              surrogate_function=SJ_SURROGATES[sur](alpha=alpha), step_mode=step_mode, store_v_seq=store_v_seq)
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        kw["backend"] = "torch"
    return neuron.LIFNode(**kw)


def _exact_spikes_expected(tau: float, device) -> bool:
    return device.type == "cpu" or math.log2(tau).is_integer()


@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_lif_matches_spikingjelly_lifnode(backend, device, opt):
    tau, vth, v_reset, decay_input, detach, sur, alpha = opt
    x = torch.randn(8, 4, 37, device=device) * 1.5
    gs, gv, gseq = torch.randn_like(x), torch.randn_like(x[0]), torch.randn_like(x)

    node = sj_node(tau, vth, v_reset, decay_input, detach, sur, alpha, store_v_seq=True)
    xs = x.clone().requires_grad_(True)
    s_ref = node(xs)
    v_ref, seq_ref = node.v, node.v_seq
    ((s_ref * gs).sum() + (v_ref * gv).sum() + (seq_ref * gseq).sum()).backward()
    functional.reset_net(node)

    lif = LIF(tau=tau, v_threshold=vth, v_reset=v_reset, surrogate=sur, alpha=alpha, detach_reset=detach,
              decay_input=decay_input, store_v_seq=True)
    xl = x.clone().requires_grad_(True)
    s = lif(xl)  # the `backend` fixture forces the backend, for the backward too
    ((s * gs).sum() + (lif.v * gv).sum() + (lif.v_seq * gseq).sum()).backward()

    assert s.shape == s_ref.shape and lif.v_seq.shape == seq_ref.shape
    assert s.any() and not s.all()
    if _exact_spikes_expected(tau, device):
        assert torch.equal(s, s_ref) and torch.equal(lif.v, v_ref) and torch.equal(lif.v_seq, seq_ref)
        assert err_ratio(xl.grad, xs.grad) <= 1e-5
    else:
        assert (s != s_ref).float().mean().item() <= 1e-3
        assert err_ratio(lif.v_seq, seq_ref) <= 1e-3


def _sj_model(device):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(16, 32), sj_node(),
        nn.Linear(32, 8), sj_node(v_reset=None, sur="atan", alpha=2.5, detach_reset=True),
    ).to(device)
    with torch.no_grad():
        model[2].weight.mul_(8.0)  # so that the second layer fires too
    return model


def test_from_spikingjelly_gives_the_same_outputs_and_gradients(backend, device):
    model = _sj_model(device)
    converted = from_spikingjelly(copy.deepcopy(model))
    assert isinstance(converted[1], LIF) and isinstance(converted[3], LIF)
    assert isinstance(converted[0], nn.Linear) and isinstance(converted[2], nn.Linear)
    second = converted[3]
    assert (second.tau, second.v_threshold, second.v_reset, second.surrogate, second.alpha, second.detach_reset,
            second.decay_input) == (2.0, 1.0, None, "atan", 2.5, True, True)
    x = torch.randn(6, 5, 16, device=device) * 2
    for _ in range(2):  # twice: SpikingJelly's state is reset in between, lrkern's LIF has none to reset
        ref = model(x)
        ref.sum().backward()
        functional.reset_net(model)
        out = converted(x)
        out.sum().backward()
        assert torch.equal(out, ref) and 0 < out.sum() < out.numel()
    for (name, p), (_, q) in zip(model.named_parameters(), converted.named_parameters()):
        assert err_ratio(q.grad, p.grad) <= 1e-5, name


def test_from_spikingjelly_keeps_memory_when_asked():
    model = nn.Sequential(nn.Identity(), sj_node())
    converted = from_spikingjelly(copy.deepcopy(model), stateful=True)
    x = torch.full((1, 3), 1.2)  # H = 0.6 each step without a reset in between: fires on the second call
    assert model(x).sum() == 0 and converted(x).sum() == 0
    assert torch.equal(model(x), converted(x))
    functional.reset_net(model)
    functional.reset_net(converted)  # calls LIF.reset()
    assert converted[1].v is None and torch.equal(model(x), converted(x))


def test_from_spikingjelly_on_a_bare_node_and_a_shared_node():
    lif = from_spikingjelly(sj_node(tau=4.0, store_v_seq=True), backend="torch")
    assert isinstance(lif, LIF) and lif.tau == 4.0 and lif.store_v_seq and lif.backend == "torch"
    shared = sj_node()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    converted = from_spikingjelly(model)
    assert converted is model and isinstance(model[1], LIF) and model[1] is model[3]


class _MyLIF(neuron.LIFNode):
    pass


@pytest.mark.parametrize("case", ["single-step", "surrogate", "non-spiking", "plif", "subclass"])
def test_from_spikingjelly_refusals_name_the_module(case):
    inner = {
        "single-step": lambda: sj_node(step_mode="s"),
        "surrogate": lambda: neuron.LIFNode(surrogate_function=surrogate.PiecewiseQuadratic(), step_mode="m"),
        "non-spiking": lambda: neuron.LIFNode(surrogate_function=surrogate.Sigmoid(spiking=False), step_mode="m"),
        "plif": lambda: neuron.ParametricLIFNode(step_mode="m"),
        "subclass": lambda: _MyLIF(step_mode="m"),
    }[case]()
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Identity(), inner), sj_node())
    expected = {
        "single-step": r"'1\.1' \(LIFNode\): it is single-step \(step_mode='s'\).*step_mode='m'",
        "surrogate": r"'1\.1' \(LIFNode\): its surrogate .*PiecewiseQuadratic is not supported .*Sigmoid.*ATan",
        "non-spiking": r"'1\.1' \(LIFNode\): its surrogate Sigmoid has spiking=False",
        "plif": r"'1\.1' \(ParametricLIFNode\): its tau is learned",
        "subclass": r"'1\.1' \(_MyLIF\): a subclass of LIFNode",
    }[case]
    with pytest.raises(ValueError, match=r"cannot convert these SpikingJelly neurons \(nothing was changed\):\n  "
                                         + expected):
        from_spikingjelly(model)
    assert model[1][1] is inner and isinstance(model[2], neuron.LIFNode)  # nothing was swapped


def test_from_spikingjelly_lists_every_problem():
    model = nn.Sequential(sj_node(step_mode="s"), neuron.ParametricLIFNode(step_mode="m"))
    with pytest.raises(ValueError) as info:
        from_spikingjelly(model)
    assert "'0' (LIFNode): it is single-step" in str(info.value) and "'1' (ParametricLIFNode)" in str(info.value)
    with pytest.raises(ValueError, match=r"backend='cupy' is not supported"):
        from_spikingjelly(nn.Sequential(sj_node()), backend="cupy")


def test_lrkern_backends_agree_on_the_converted_model(device):
    """Every lrkern backend that runs here gives the converted model the same spikes."""
    converted = from_spikingjelly(_sj_model(device))
    x = torch.randn(6, 5, 16, device=device) * 2
    outs = {}
    for name in lrkern.available_backends(device):
        with lrkern.use_backend(name):
            outs[name] = converted(x)
    first = next(iter(outs.values()))
    assert all(torch.equal(o, first) for o in outs.values()), list(outs)


@pytest.mark.parametrize("opt", OPTS[:4], ids=OPT_IDS[:4])
def test_stm_at_init_matches_spikingjelly_lifnode(device, opt):
    """Spec 6: at its initial values (beta = 0, no gain) the STM is SpikingJelly's LIFNode, spikes and gradients."""
    from lrkern.spiking import STM

    tau, vth, v_reset, decay_input, detach, sur, alpha = opt
    u = torch.randn(8, 2, 3, 5, 4, device=device) * 1.5
    gs = torch.randn_like(u)
    node = sj_node(tau, vth, v_reset, decay_input, detach, sur, alpha)
    us = u.clone().requires_grad_(True)
    s_ref = node(us)
    (s_ref * gs).sum().backward()
    functional.reset_net(node)
    stm = STM(3, tau=tau, v_threshold=vth, v_reset=v_reset, surrogate=sur, alpha=alpha, detach_reset=detach,
              decay_input=decay_input).to(device)
    ul = u.clone().requires_grad_(True)
    s = stm(ul)
    (s * gs).sum().backward()
    assert torch.equal(s, s_ref)
    assert err_ratio(ul.grad, us.grad) < 1e-5
