"""``lrkern.asm.ao.ASMFakeQuantize`` as a torch.ao QConfig weight fake-quantizer (spec asm.md section 6)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfig, prepare_qat

import lrkern  # noqa: F401  (registers the ops)
from lrkern.asm import max_scale
from lrkern.asm.ao import ASMFakeQuantize


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _prepared(alphabet, w_bits=4):
    net = _net().train()
    # Identity activations: the test isolates the weight path (a real flow would use default_fake_quant).
    net.qconfig = QConfig(activation=nn.Identity,
                          weight=ASMFakeQuantize.with_args(alphabet=alphabet, w_bits=w_bits))
    return net, prepare_qat(copy.deepcopy(net), inplace=False)


@pytest.mark.parametrize("alphabet,w_bits", [("13", 4), ("1357", 4), ("1357", 8)])
def test_prepare_qat_trains_weights_on_the_alphabet_grid(alphabet, w_bits):
    net, qat = _prepared(alphabet, w_bits)
    conv, lin = qat[0], qat[3]
    assert isinstance(conv, torch.ao.nn.qat.Conv2d) and isinstance(conv.weight_fake_quant, ASMFakeQuantize)
    x = torch.rand(4, 3, 6, 6, requires_grad=True)
    y = qat(x)
    # The same network by hand: weights through asm_fake_quant with the max scale.
    w_hat = [torch.ops.lrkern.asm_fake_quant(m.weight, max_scale(m.weight, alphabet, w_bits), 0,
                                             list(conv.weight_fake_quant.alphabet), w_bits) for m in (conv, lin)]
    h = F.conv2d(x, w_hat[0], conv.bias, padding=1)
    ref = F.linear(torch.flatten(F.relu(h), 1), w_hat[1], lin.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # Every projected weight is on the grid: w_hat / s is one of the representable integers.
    s = conv.weight_fake_quant.scale
    ints = w_hat[0] / s.view(-1, 1, 1, 1)
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    grid = set(lrkern.asm.representable_magnitudes(alphabet, w_bits).tolist())
    assert set(ints.round().abs().int().unique().tolist()) <= grid
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 and x.grad is not None


def test_full_odd_set_equals_torch_uniform_fake_quant():
    w = torch.randn(16, 3, 3, 3)
    fq = ASMFakeQuantize(alphabet="odd", w_bits=4)
    s = w.abs().amax((1, 2, 3)) / 15
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(16, dtype=torch.int32), 0, -15, 15)
    assert torch.equal(fq(w), ref)
    assert torch.equal(fq.calculate_qparams()[0], s)


def test_observer_and_fake_quant_switches_and_state_dict():
    fq = ASMFakeQuantize(alphabet="13")
    w = torch.randn(4, 6)
    out = fq(w)
    scale = fq.scale.clone()
    fq.disable_observer()
    out2 = fq(w * 2)  # frozen scale: the doubled weight saturates at r_max
    assert torch.equal(fq.scale, scale)
    assert torch.equal(out2.abs().amax(1), scale * 12)
    fq.disable_fake_quant()
    assert torch.equal(fq(w), w)
    other = ASMFakeQuantize(alphabet="13")
    other.load_state_dict(fq.state_dict())  # the switches travel too: observer and fake quantization off
    assert torch.equal(other(w), w)
    other.enable_fake_quant()
    assert torch.equal(other.scale, scale) and torch.equal(other(w), out)
    with pytest.raises(RuntimeError, match="channels"):
        other(torch.randn(5, 6))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="alphabet"):
        ASMFakeQuantize(alphabet=(1, 2))
    with pytest.raises(ValueError, match="w_bits"):
        ASMFakeQuantize(w_bits=6)
    with pytest.raises(TypeError, match="w"):
        ASMFakeQuantize()(torch.ones(2, 2, dtype=torch.int32))
