"""ASM method layer (spec asm.md 3.4, 3.5, 4 item 5, 5): activation quantizer, ASMLinear / ASMConv2d in train / exact /
emulate modes, convert, BN folding, the energy model, and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrkern  # noqa: F401  (registers the ops)
import lrkern.asm as asm
from lrkern.asm.energy import EnergyTable, fp32_energy, layer_counts
from lrkern.asm.modules import ASMConv2d, ASMLinear, conv2d_int, linear_int
from lrkern.asm.quant_act import ActQuantizer


def _calibrated(layer, x):
    """One training-mode forward calibrates the activation scale; then eval."""
    layer.train()
    layer(x)
    layer.act.freeze()
    return layer.eval()


def _modes(layer, x):
    out = {}
    for mode in ("train", "exact", "emulate"):
        layer.mode = mode
        with torch.no_grad():
            out[mode] = layer(x)
    layer.mode = "train"
    return out


# ------------------------------------------------------------------------------------------------ activation quantizer

def test_act_quantizer_ema_freeze_and_quantize():
    q = ActQuantizer(4)
    q.train()
    x1 = torch.rand(64) * 3.0
    q(x1)
    s1 = float(x1.max()) / 15
    assert float(q.scale) == pytest.approx(s1, rel=1e-6)
    x2 = torch.rand(64) * 6.0
    q(x2)
    s2 = 0.9 * s1 + 0.1 * float(x2.max()) / 15
    assert float(q.scale) == pytest.approx(s2, rel=1e-5)
    q.freeze()
    q(torch.rand(64) * 100)
    assert float(q.scale) == pytest.approx(s2, rel=1e-5)
    # The integer path sees exactly the integers behind the fake quantization (round half to even, clamp to 0..15).
    x = torch.tensor([-1.0, 0.0, 0.5, 1.5, 2.5, 100.0]) * q.scale.detach()
    x_int, s = q.quantize(x)
    assert x_int.dtype == torch.uint8
    assert x_int.tolist() == [0, 0, 0, 2, 2, 15]
    q.eval()
    assert torch.equal(q(x), x_int.float() * s)


def test_act_quantizer_needs_calibration_and_calibrating_context():
    q = ActQuantizer(8).eval()
    with pytest.raises(RuntimeError, match="calibrat"):
        q(torch.rand(4))
    with asm.calibrating(q):
        q(torch.rand(4) * 2.55)
    assert bool(q.initialized) and not q.calibrating


def test_act_ste_and_lsq_gradients():
    q = ActQuantizer(4, scale="lsq")
    q.train()
    q(torch.full((1, 8), 1.5))  # init: s = 0.1
    s = float(q.scale.detach())
    x = torch.tensor([[-0.3, 0.0, 0.04, 0.26, 1.0, 1.5, 1.6, 3.0]], requires_grad=True)
    y = q(x)
    g = torch.arange(1.0, 9.0).view(1, 8)
    y.backward(g)
    v = x.detach() / s
    inside = (v >= 0) & (v <= 15)
    assert torch.equal(x.grad, g * inside)
    d = torch.where(v < 0, 0.0, torch.where(v > 15, 15.0, torch.round(v) - v))
    expected = float((g * d).sum()) / math.sqrt(8 * 15)
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------ layer modes

@pytest.mark.parametrize("alphabet,w_bits,a_bits", [("1", 4, 4), ("13", 4, 4), ("1357", 8, 4), ("odd", 4, 8),
                                                    ("13", 8, 8)])
def test_linear_modes_consistent(alphabet, w_bits, a_bits):
    lin = nn.Linear(21, 7)
    layer = _calibrated(ASMLinear(lin, alphabet, w_bits, a_bits), torch.rand(5, 3, 21))
    x = torch.rand(2, 3, 21) * 1.2
    out = _modes(layer, x)
    assert out["exact"].shape == (2, 3, 7)
    assert torch.equal(out["exact"], out["emulate"])
    torch.testing.assert_close(out["train"], out["exact"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(c_in=3, c_out=4, k=3, stride=1, padding=1, dilation=1, groups=1, bias=False),
    dict(c_in=6, c_out=8, k=3, stride=2, padding=1, dilation=1, groups=2, bias=True),
    dict(c_in=4, c_out=4, k=3, stride=1, padding=2, dilation=2, groups=4, bias=True),
    dict(c_in=5, c_out=3, k=(1, 2), stride=(2, 1), padding=0, dilation=1, groups=1, bias=True),
])
def test_conv_modes_consistent_no_float_conv(cfg, monkeypatch):
    conv = nn.Conv2d(cfg["c_in"], cfg["c_out"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                     dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"])
    layer = _calibrated(ASMConv2d(conv, "1357", 4, 4), torch.rand(2, cfg["c_in"], 7, 9))
    x = torch.rand(2, cfg["c_in"], 7, 9) * 1.1
    with torch.no_grad():
        y_train = layer(x)
        ref_shape = conv(x).shape

    def no_float_conv(*a, **k):
        raise AssertionError("a float convolution ran on the integer path")
    monkeypatch.setattr(F, "conv2d", no_float_conv)
    outs = {}
    for mode in ("exact", "emulate"):
        layer.mode = mode
        outs[mode] = layer(x)
    assert outs["exact"].shape == y_train.shape == ref_shape
    assert torch.equal(outs["exact"], outs["emulate"])
    torch.testing.assert_close(y_train, outs["exact"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [((3, 3), 1, 1, 1), ((3, 2), (2, 1), (0, 2), (1, 2))])
def test_im2col_int_matches_unfold(kernel, stride, padding, dilation):
    x = torch.randint(0, 16, (2, 3, 7, 8), dtype=torch.uint8)
    patches = asm.modules.im2col_int(x, kernel, stride, padding, dilation)  # [B, Ho, Wo, kh, kw, C]
    b, ho, wo, kh, kw, c = patches.shape
    cols = patches.permute(0, 1, 2, 5, 3, 4).reshape(b, ho * wo, c * kh * kw)  # unfold's (c, i, j) order
    ref = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    assert cols.dtype == torch.uint8 and torch.equal(cols.float(), ref)


def test_exact_uses_trained_integers():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = _calibrated(ASMConv2d(conv, "13", 4, 4), torch.rand(1, 3, 5, 5))
    w_int = layer.weight_int()
    assert w_int.dtype == torch.int16
    allowed = {0, 1, 2, 3, 4, 6, 8, 12}
    assert set(w_int.abs().unique().tolist()) <= allowed
    x = torch.rand(1, 3, 5, 5)
    x_int, s_x = layer.act.quantize(x)
    acc = F.conv2d(x_int.double(), w_int.double(), padding=1)  # float64 reference of the int GEMM (small, exact)
    expected = (s_x * layer.weight_scale()).view(1, -1, 1, 1) * acc.float()
    layer.mode = "exact"
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_ste_gradients_flow_to_weights_and_scales():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = ASMConv2d(conv, "13", 4, 4, scale="lsq", act_scale="lsq")
    assert layer.weight is conv.weight and layer.bias is conv.bias
    layer.train()
    x = torch.rand(2, 3, 6, 6)
    layer(x)  # initialises the activation scale
    with torch.no_grad():
        layer.w_scale.mul_(0.5)  # some weights now lie above r_max * s: their gradient must be zero
    x = (torch.rand(2, 3, 6, 6) * 3).requires_grad_()
    layer(x).square().sum().backward()
    for name, p in [("weight", layer.weight), ("w_scale", layer.w_scale), ("act.scale", layer.act.scale),
                    ("bias", layer.bias)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    u = layer.weight.detach().abs() / layer.w_scale.detach().view(-1, 1, 1, 1)
    clipped = u > layer.r_max
    assert clipped.any()
    assert torch.all(layer.weight.grad[clipped] == 0)
    assert torch.all(layer.weight.grad[~clipped] != 0)
    above = x.detach() > 15 * layer.act.scale.detach()
    assert above.any() and torch.all(x.grad[above] == 0)


def test_max_scale_zero_channel():
    w = torch.randn(3, 5)
    w[1] = 0
    s = asm.max_scale(w, "1357", 4)
    assert s[1] == 1.0
    torch.testing.assert_close(s[0], w[0].abs().max() / 14)


# --------------------------------------------------------------------------------------------------- convert / model

def _calibrate(model, x):
    model.eval()
    with torch.no_grad(), asm.calibrating(model):
        model(x)
    return model


def test_convert_leaves_first_and_last_float_and_shares_parameters():
    torch.manual_seed(1)
    net = asm.ResNetCNN()
    keys = set(net.state_dict())
    params = {n: p for n, p in net.named_parameters()}
    asm.convert(net, "13")
    assert type(net.stem) is nn.Conv2d and type(net.fc) is nn.Linear
    layers = dict(asm.asm_layers(net))
    assert len(layers) == 8  # 2 + 3 + 3 convolutions of the three stages (two with a 1x1 shortcut)
    assert all(isinstance(m, ASMConv2d) for m in layers.values())
    for n, p in net.named_parameters():
        if n in params:
            assert p is params[n]
    assert keys <= set(net.state_dict())
    with pytest.raises(ValueError, match="already"):
        asm.convert(net, "13")

    full = asm.convert(asm.ResNetCNN(), "1", all_layers=True)
    assert isinstance(full.stem, ASMConv2d) and isinstance(full.fc, ASMLinear)
    mixed = asm.convert(asm.ResNetCNN(), "13", layer_alphabets={"stages.0.0.conv1": "1357"})
    assert mixed.stages[0][0].conv1.alphabet == [1, 3, 5, 7] and mixed.stages[0][0].conv2.alphabet == [1, 3]


def test_network_modes_and_pixel_first_layer():
    torch.manual_seed(2)
    mean, std = 0.2860, 0.3530
    pixels = torch.randint(0, 256, (3, 1, 12, 12)).float()
    x = (pixels / 255 - mean) / std
    net = asm.convert(asm.ResNetCNN(), "1357", all_layers=True, input_norm=(mean, std))
    assert net.stem.act.pixel is not None and net.stem.a_bits == 8
    _calibrate(net, x)
    out = {}
    for mode in ("train", "exact", "emulate"):
        asm.set_mode(net, mode)
        with torch.no_grad():
            out[mode] = net(x)
    assert torch.equal(out["exact"], out["emulate"])
    torch.testing.assert_close(out["train"], out["exact"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        asm.set_mode(net, "fast")


def test_fold_bn_keeps_integers_and_outputs():
    torch.manual_seed(3)
    net = asm.convert(asm.ResNetCNN(), "13")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 1, 12, 12)
    _calibrate(net, x)
    asm.set_mode(net, "exact")
    with torch.no_grad():
        ref = net(x)
    conv = net.stages[1][0].conv1
    w_int = conv.weight_int()
    folded = asm.fold_bn_pairs(__import__("copy").deepcopy(net), net.bn_pairs()).eval()
    fconv = folded.stages[1][0].conv1
    assert fconv.folded and torch.equal(fconv.weight_int(), w_int)
    assert isinstance(folded.stages[1][0].bn1, nn.Identity)
    with torch.no_grad():
        y_exact = folded(x)
        asm.set_mode(folded, "emulate")
        y_emul = folded(x)
    assert torch.equal(y_exact, y_emul)
    torch.testing.assert_close(y_exact, ref, rtol=1e-4, atol=1e-4)


def test_fold_bn_linear_with_batchnorm1d():
    torch.manual_seed(6)
    lin = nn.Linear(12, 8)
    bn = nn.BatchNorm1d(8).eval()
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.rand(5, 12)
    layer = _calibrated(ASMLinear(lin, "13", 4, 4), x)
    layer.mode = "exact"
    with torch.no_grad():
        ref = bn(layer(x))
    folded = asm.fold_bn(layer, bn)
    assert folded.folded and folded.mode == "exact" and torch.equal(folded.weight_int(), layer.weight_int())
    with torch.no_grad():
        y = folded(x)
        folded.mode = "emulate"
        assert torch.equal(folded(x), y)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(asm.fold_bn(lin, bn)(x), bn(lin(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="BatchNorm1d"):
        asm.fold_bn(layer, nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="features"):
        asm.fold_bn(layer, nn.BatchNorm1d(7))
    with pytest.raises(ValueError, match="already"):
        asm.fold_bn(folded, bn)


def test_reestimate_bn_averages_batch_statistics_of_the_quantized_model():
    from lrkern.asm.train import reestimate_bn
    torch.manual_seed(4)
    net = asm.convert(asm.ResNetCNN(), "1357")
    batches = [(torch.randn(6, 1, 12, 12), None) for _ in range(3)]
    _calibrate(net, batches[0][0])
    asm.freeze_act_scales(net)
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for m in bns.values():  # stale statistics that must not survive
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
        m.num_batches_tracked.fill_(50)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    scales = [float(q.scale) for q in net.modules() if isinstance(q, ActQuantizer)]
    seen = {n: [] for n in bns}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach()))
             for n, m in bns.items()]
    net.train()
    assert reestimate_bn(net, iter(batches), 5) == 3
    for h in hooks:
        h.remove()
    assert net.training and all(m.momentum == 0.1 for m in bns.values())
    for n, m in bns.items():
        # momentum=None: the plain average of the batch means and of the unbiased batch variances.
        mean = torch.stack([x.mean((0, 2, 3)) for x in seen[n]]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen[n]]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert [float(q.scale) for q in net.modules() if isinstance(q, ActQuantizer)] == scales
    with pytest.raises(ValueError, match="num_batches"):
        reestimate_bn(net, iter(batches), 0)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn(net, iter([]), 2)


# ------------------------------------------------------------------------------------------------------------ energy

def _tiny_linear(rows, alphabet, w_bits):
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(rows, dtype=torch.float32))
    model = nn.Sequential(lin)
    return asm.convert(model, alphabet, w_bits, 4, all_layers=True)


def test_energy_hand_counts_4bit():
    model = _tiny_linear([[12, 3, 0, -1], [2, -6, 12, 0]], "13", 4)
    assert model[0].weight_int().tolist() == [[12, 3, 0, -1], [2, -6, 12, 0]]
    r = asm.energy(model, (1, 4))
    row = r["layers"][0]
    assert (row["M"], row["K"], row["N"]) == (1, 4, 2)
    assert row["nonzero_weights"] == 6 and row["conv_mults"] == 6 and row["acc_adds"] == 6
    assert row["bank_adds"] == 4 * 1 * 1  # M*K inputs, one bank each, |A| - 1 = 1 add
    assert row["selects"] == 6 and row["shifts"] == 6 and row["quartet_adds"] == 0
    e_add = lambda n: 0.03 * n / 8  # noqa: E731
    conv = 6 * 0.2 * 16 / 64 + 6 * e_add(4 + 4 + 2)
    asm_pj = 4 * e_add(8) + 6 * 0.25 * e_add(8) * 1 + 6 * 0.5 * e_add(8) + 6 * e_add(10)
    assert r["conventional_pj"] == pytest.approx(conv)
    assert r["asm_pj"] == pytest.approx(asm_pj)
    assert r["ratio"] == pytest.approx(asm_pj / conv)
    assert r["brackets"]["zero"]["asm_pj"] == pytest.approx(4 * e_add(8) + 6 * e_add(10))
    assert r["brackets"]["add"]["asm_pj"] == pytest.approx(4 * e_add(8) + 12 * e_add(8) + 6 * e_add(10))
    # Memory: 8 weights of 3-bit codes + sign ({1,3}: 8 quartets) vs 5 bits, 4 activations of 4 bits, 10 pJ / 64 bit.
    rm = asm.energy(model, (1, 4), memory=True)
    assert rm["memory_asm_pj"] == pytest.approx((8 * 4 + 4 * 4) * 10 / 64)
    assert rm["memory_conventional_pj"] == pytest.approx((8 * 5 + 4 * 4) * 10 / 64)
    # Without zero skipping every weight costs a MAC.
    r0 = asm.energy(model, (1, 4), zero_skip=False)["layers"][0]
    assert r0["conv_mults"] == 8 and r0["selects"] == 8 and r0["acc_adds"] == 8


def test_energy_hand_counts_8bit_quartets_and_batch():
    # {1,3}, 8 bits: 204 = (12, 12), 35 = (2, 3), 17 = (1, 1), 3 = (0, 3), 48 = (3, 0).
    model = _tiny_linear([[204, 35, 0, -17], [3, -48, 204, 0]], "13", 8)
    assert model[0].weight_int().tolist() == [[204, 35, 0, -17], [3, -48, 204, 0]]
    r = asm.energy(model, (3, 4))  # per inference: divided by the batch
    row = r["layers"][0]
    assert row["nonzero_quartets"] == 10
    assert row["selects"] == 10 and row["shifts"] == 10 and row["quartet_adds"] == 4 and row["acc_adds"] == 6
    r0 = asm.energy(model, (1, 4), zero_skip=False)["layers"][0]
    assert r0["selects"] == 16 and r0["quartet_adds"] == 8


def test_energy_grouped_conv_bank_share():
    c = layer_counts(m_rows=10, k=9, n=8, groups=2, w_int=torch.ones(8, 9, dtype=torch.int16), alphabet="1357",
                     w_bits=4, a_bits=4)
    assert c["bank_adds"] == 2 * 10 * 9 * 1 * 3
    c4 = layer_counts(10, 9, 8, 2, torch.ones(8, 9, dtype=torch.int16), "1357", 4, 4, bank_share=1)
    assert c4["bank_adds"] == 2 * 10 * 9 * 4 * 3


def test_bank_adds_never_increase_when_alphabets_are_removed():
    torch.manual_seed(4)
    net = asm.ResNetCNN()
    previous = None
    for alphabet in ("odd", "1357", "13", "1"):
        r = asm.energy(net, (1, 1, 28, 28), alphabet=alphabet)
        bank = sum(row.get("bank_adds", 0) for row in r["layers"])
        assert previous is None or bank <= previous
        previous = bank
        if alphabet == "1":
            assert bank == 0
            assert sum(row.get("selects", 0) for row in r["layers"]) == 0
    # Unconstrained layers cost the same in both designs.
    first = r["layers"][0]
    assert first["kind"] == "unconstrained" and first["asm_pj"] == first["conventional_pj"]
    assert fp32_energy(net, (1, 1, 28, 28))["compute_pj"] > r["conventional_pj"]


def test_energy_table_json(tmp_path):
    p = tmp_path / "table.json"
    p.write_text('{"add_pj_8bit": 0.05, "sram_pj_per_64bit": 100}')
    t = EnergyTable.from_json(p)
    assert t.add_pj_8bit == 0.05 and t.mul_pj_8x8 == 0.2 and t.e_add(16) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="add_pj_8bit"):
        EnergyTable(add_pj_8bit=-1)
    with pytest.raises(ValueError, match="unknown"):
        EnergyTable.from_json({"bogus": 1})


# ------------------------------------------------------------------------------------------------------------ errors

def test_bad_arguments_name_the_argument():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="alphabet"):
        asm.convert(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)), "12")
    with pytest.raises(ValueError, match="alphabet"):
        ASMLinear(lin, (1, 2))
    with pytest.raises(ValueError, match="w_bits"):
        ASMLinear(lin, "13", w_bits=5)
    with pytest.raises(ValueError, match="a_bits"):
        ASMLinear(lin, "13", a_bits=2)
    with pytest.raises(ValueError, match="scale"):
        ASMLinear(lin, "13", scale="minmax")
    with pytest.raises(ValueError, match="mode"):
        ASMLinear(lin, "13", mode="fast")
    w_int = torch.ones(3, 4, dtype=torch.int16)
    s_w = torch.ones(3)
    s_x = torch.tensor(0.1)
    with pytest.raises(TypeError, match="x_int"):
        linear_int(torch.rand(2, 4), w_int, s_x, s_w)
    with pytest.raises(TypeError, match="x_int"):
        conv2d_int(torch.rand(1, 4, 3, 3), torch.ones(2, 4, 1, 1, dtype=torch.int16), s_x, torch.ones(2))
    with pytest.raises((TypeError, ValueError), match="x_int"):
        torch.ops.lrkern.asm_gemm(torch.rand(2, 4), w_int, 4, 4)
    with pytest.raises(ValueError, match="alphabet"):
        asm.energy(asm.ResNetCNN(), (1, 1, 28, 28))
    with pytest.raises(TypeError, match="x"):
        ASMLinear(lin, "13")(torch.ones(2, 4, dtype=torch.int32))


def test_qat_freezes_activation_scales_on_schedule_and_reestimates_bn():
    import copy

    from lrkern.asm.train import Recipe, calibrate, qat
    from lrkern.vision_data import batches
    torch.manual_seed(5)
    fp = asm.ResNetCNN().eval()
    train = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))

    def scales(model):
        return [float(q.scale) for q in model.modules() if isinstance(q, ActQuantizer)]

    # The scales the calibration gives (qat calibrates on the first batches of the same seeded loader).
    ref = asm.convert(copy.deepcopy(fp), "1357")
    calibrate(ref, batches(*train, 32, shuffle=True, seed=1000), 1)
    early, info = qat(fp, "1357", train, 0, Recipe(qat_epochs=1, batch=32, calib_batches=1, bn_batches=2,
                                                   act_freeze_epochs=0), verbose=False)
    assert scales(early) == scales(ref)
    late, _ = qat(fp, "1357", train, 0, Recipe(qat_epochs=1, batch=32, calib_batches=1, bn_batches=0),
                  verbose=False)
    assert scales(late) != scales(ref)  # the EMA kept moving through the epoch
    assert all(bool(q.frozen) for q in late.modules() if isinstance(q, ActQuantizer))
    # The re-estimation replaced the training-time statistics, which info keeps for the ablation.
    before = info["bn_stats_before_reestimate"]
    assert info["bn_batches"] == 2 and before
    state = early.state_dict()
    assert not torch.equal(state["stages.2.0.bn2.running_mean"], before["stages.2.0.bn2.running_mean"])
    assert int(state["stages.2.0.bn2.num_batches_tracked"]) == 2
    with pytest.raises(ValueError, match="act_freeze_epochs"):
        Recipe(act_freeze_epochs=-1)
    with pytest.raises(ValueError, match="calib_batches"):
        Recipe(act_freeze_epochs=0, calib_batches=0)


def test_set_alphabet_and_progressive_qat():
    from lrkern.asm.train import Recipe, qat
    torch.manual_seed(7)
    lin = nn.Linear(6, 4)
    net = asm.convert(nn.Sequential(nn.Linear(6, 6), lin, nn.Linear(4, 3)), "odd", scale="lsq")
    layer = net[1]
    s_odd = layer.w_scale.detach().clone()
    asm.set_alphabet(net, "13")
    assert layer.alphabet == [1, 3] and layer.r_max == 12
    torch.testing.assert_close(layer.w_scale.detach(), s_odd * 15 / 12)  # the largest grid value stays put
    with pytest.raises(ValueError, match="alphabet"):
        asm.set_alphabet(net, "12")

    fp = asm.ResNetCNN().eval()
    train = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    recipe = Recipe(qat_epochs=0.5, batch=32, calib_batches=1, bn_batches=1)
    model, info = qat(fp, "13", train, 0, recipe, progressive=[("odd", 0.5), ("1357", 1)], verbose=False)
    assert info["steps"] == 1 + 2 + 1
    for _, m in asm.asm_layers(model):
        assert m.alphabet == [1, 3]
        grid = set(asm.representable_magnitudes("13", 4).tolist())
        assert set(m.weight_int().abs().unique().tolist()) <= grid
    assert all(bool(q.frozen) for q in model.modules() if isinstance(q, ActQuantizer))
    with pytest.raises(ValueError, match="positive epochs"):
        qat(fp, "13", train, 0, recipe, progressive=[("odd", 0)], verbose=False)
