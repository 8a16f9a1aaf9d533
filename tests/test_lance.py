"""lrkern.lance: calibration, rank selection, compression, saving/loading, the memory meter, continual learning
(updates orthogonal to the protected basis) and the GPM baseline, plus the errors for bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrkern.lance as lance
from lrkern.lance.continual import extend_basis, residual_factor
from lrkern.lance.gpm import GPM
from lrkern.lance.subspaces import energy_rank
from tests.helpers import err_ratio


class Net(nn.Module):
    """conv (BN) -> conv -> Linear on [B, L, F] tokens -> head: every layer kind the compression handles."""

    def __init__(self, width=8, hidden=12):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.tok = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))  # [B, W, 4, 4]
        t = F.relu(self.tok(h.flatten(2).transpose(1, 2)))  # [B, 16, hidden]
        return self.head(t.mean(1))


def _data(n=6, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Low-rank-ish inputs so eps < 1 actually truncates.
    basis = torch.randn(3, 2, generator=g)
    out = []
    for _ in range(n):
        coeff = torch.randn(b, 2, 8, 8, generator=g)
        x = torch.einsum("ck,bkhw->bchw", basis, coeff) + 0.05 * torch.randn(b, 3, 8, 8, generator=g)
        out.append((x, torch.randint(0, 4, (b,), generator=g)))
    return out


LAYERS = ["conv1", "conv2", "tok"]


def _close(got, ref, tol=1e-5) -> bool:
    """Error ratio, except for gradients that are zero up to rounding (conv1's bias feeds a BatchNorm)."""
    if ref.norm() < 1e-6:
        return (got - ref).abs().max() < 1e-6
    return err_ratio(got, ref) <= tol


def _grads(model, batch):
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_energy_rank():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative energy 0.4, 0.7, 0.9, 1.0
    assert energy_rank(lam, 0.7) == 2  # the smallest r whose energy reaches eps
    assert energy_rank(lam, 0.71) == 3
    assert energy_rank(lam, 0.3) == 1
    assert energy_rank(lam, 1.0) == 4
    assert energy_rank(lam, 0.95, max_rank=2) == 2
    assert energy_rank(torch.zeros(3), 0.5) == 1


@pytest.mark.parametrize("modes", ["no_batch", "all"])
def test_calibrate_factors_are_orthonormal_and_reach_eps(modes):
    model, data = Net(), _data()
    subs = lance.calibrate(model, data, layers=LAYERS, eps=0.8, batches=4, modes=modes)
    assert subs.batches == 4 and subs.modes == modes and set(subs.layers) == set(LAYERS)
    for name, s in subs.layers.items():
        assert (s.factors[0] is None) == (modes == "no_batch")
        for u, lam in zip(s.factors, s.eigvals):
            if u is None:
                continue
            eye = torch.eye(u.shape[1])
            assert torch.allclose(u.T @ u, eye, atol=1e-5)
            r = u.shape[1]
            energy = lam[:r].sum() / lam.sum()
            assert energy >= 0.8 - 1e-9 and (r == 1 or lam[:r - 1].sum() / lam.sum() < 0.8)
    assert any(u is not None for s in subs.layers.values() for u in s.factors), "nothing was truncated"


def test_calibration_leaves_the_model_unchanged():
    model, data = Net(), _data()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=3)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_full_rank_compression_gives_exact_gradients():
    model, data = Net(), _data()
    ref = _grads(model, data[0])
    subs = lance.calibrate(model, data, layers=LAYERS, eps=1.0, batches=2, modes="all")
    lance.compress(model, subs)
    assert set(lance.compressed_layers(model)) == set(LAYERS)
    got = _grads(model, data[0])
    for n in ref:
        assert _close(got[n], ref[n]), n


def test_compressed_gradient_is_that_of_the_projected_input():
    """A compressed conv's dW is the plain dW of its input X projected onto the factors (spec: X~)."""
    model, data = Net(), _data()
    subs = lance.calibrate(model, data, layers=["conv2"], eps=0.7, batches=4)
    lance.compress(model, subs)
    captured = {}
    model.conv2.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach()))
    x, y = data[1]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    dw = model.conv2.weight.grad.clone()
    fs = [getattr(model.conv2, f"U{k}") for k in range(4)]
    from lrkern.reference.lowrank import lance_project, reconstruct

    x_tilde = reconstruct(lance_project(captured["x"], fs), fs)
    # The output gradient reaching conv2 is exact (nothing downstream is compressed).
    dy = _conv2_out_grad(model, x, y)
    ref = torch.nn.grad.conv2d_weight(x_tilde, model.conv2.weight.shape, dy, 2, 1)
    assert err_ratio(dw, ref) <= 1e-5
    assert err_ratio(dw, torch.nn.grad.conv2d_weight(captured["x"], model.conv2.weight.shape, dy, 2, 1)) > 1e-3


def _conv2_out_grad(model, x, y):
    store = {}

    def keep(_m, _a, o):
        o.retain_grad()
        store["y"] = o

    h = model.conv2.register_forward_hook(keep)
    F.cross_entropy(model(x), y).backward()
    h.remove()
    return store["y"].grad


def test_saved_bytes_shrink_to_the_cores():
    model, data = Net(), _data()
    x = data[0]
    plain = lance.saved_bytes(model, x, LAYERS)
    subs = lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=4)
    lance.compress(model, subs)
    comp = lance.saved_bytes(model, x, LAYERS)
    for name, s in subs.layers.items():
        cores = 4 * x[0].shape[0] * torch.tensor(s.ranks[1:]).prod().item()
        assert comp.bytes[name] == cores, name
    assert plain.bytes["conv1"] == x[0].numel() * 4
    assert comp.layer_bytes() < plain.layer_bytes() / 5
    assert comp.bytes["other"] == plain.bytes["other"]  # nothing else changed


def test_save_load_roundtrip_and_other_model_is_refused(tmp_path):
    model, data = Net(), _data()
    subs = lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=3)
    path = subs.save(tmp_path / "s.safetensors")
    back = lance.Subspaces.load(path, model=model)
    assert back.ranks() == subs.ranks() and back.eps == 0.7 and back.batches == 3
    for name in LAYERS:
        for u, v in zip(subs.layers[name].factors, back.layers[name].factors):
            assert (u is None) == (v is None) and (u is None or torch.equal(u, v))
    with pytest.raises(ValueError, match=r"calibrated on another model: tok: weight \[16, 8\]"):
        lance.Subspaces.load(path, model=Net(hidden=16))
    with pytest.raises(ValueError, match=r"calibrated on another model: .*conv1: no such layer"):
        lance.compress(nn.Sequential(nn.Linear(2, 2)), subs)


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, "0.7", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match=r"eps=.* must be a number in \(0, 1\]"):
        lance.calibrate(Net(), _data(), layers=LAYERS, eps=eps, batches=1)


def test_layers_that_cannot_be_compressed():
    model = Net()
    with pytest.raises(TypeError, match=r"layer 'bn' is a BatchNorm2d; LANCE compresses nn.Linear and nn.Conv2d"):
        lance.calibrate(model, _data(), layers=["bn"], batches=1)
    with pytest.raises(ValueError, match=r"no layer named 'conv9'"):
        lance.calibrate(model, _data(), layers=["conv9"], batches=1)
    dw = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3))
    with pytest.raises(TypeError, match=r"groups=3: grouped and depthwise"):
        lance.calibrate(dw, _data(), layers=["0"], batches=1)
    with pytest.raises(ValueError, match=r"modes='some' is not supported"):
        lance.calibrate(model, _data(), layers=LAYERS, modes="some", batches=1)


def test_batch_mode_refuses_another_batch_size():
    model, data = Net(), _data(b=8)
    lance.compress(model, lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=2, modes="all"))
    model.train()
    with pytest.raises(ValueError, match=r"a batch of 5 but the subspaces were calibrated with batch 8 .*drop_last"):
        model(data[0][0][:5])
    model.eval()
    assert model(data[0][0][:5]).shape == (5, 4)  # inference needs no core: any batch size


def test_no_batch_mode_takes_any_batch_size():
    model, data = Net(), _data(b=8)
    lance.compress(model, lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=2))
    F.cross_entropy(model(data[0][0][:3]), data[0][1][:3]).backward()
    assert model.conv1.weight.grad is not None


def test_decompress_restores_plain_layers_and_keeps_training():
    model, data = Net(), _data()
    w = model.conv1.weight
    lance.compress(model, lance.calibrate(model, data, layers=LAYERS, eps=0.7, batches=2))
    assert model.conv1.weight is w  # same Parameter: optimizers keep working
    lance.decompress(model)
    assert type(model.conv1) is nn.Conv2d and model.conv1.weight is w
    assert list(model.state_dict()) == list(Net().state_dict())


def test_per_step_hosvd_full_rank_is_exact_and_low_rank_differs():
    data = _data()
    model = Net()
    ref = _grads(model, data[0])
    lance.compress_per_step(model, LAYERS, eps=1.0, modes="all")
    got = _grads(model, data[0])
    assert all(_close(got[n], ref[n]) for n in ref)
    lance.decompress(model)
    lance.compress_per_step(model, LAYERS, eps=0.5)
    got = _grads(model, data[0])
    assert err_ratio(got["conv2.weight"], ref["conv2.weight"]) > 1e-3


# ------------------------------------------------------------------------------------------- continual learning
def test_extend_basis_and_residual_factor_are_orthogonal():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 10, generator=g) @ torch.diag(torch.tensor([10.0, 8, 6, 1, 1, 1, .5, .5, .1, .1]))
    p = extend_basis(None, a.T @ a, 0.9)
    assert torch.allclose(p.T @ p, torch.eye(p.shape[1]), atol=1e-5) and 1 <= p.shape[1] < 10
    b = torch.randn(200, 10, generator=g)
    u = residual_factor(b.T @ b, p, 0.9)
    assert (p.T @ u).abs().max() < 1e-5
    p2 = extend_basis(p, b.T @ b, 0.95)
    assert p2.shape[1] > p.shape[1] and torch.allclose(p2.T @ p2, torch.eye(p2.shape[1]), atol=1e-5)
    assert torch.linalg.matrix_norm(p - p2 @ (p2.T @ p)) < 1e-4  # the old directions stay protected


def _sgd_task(model, _t, loader, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for x, y in list(loader)[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _layer_inputs(model, names, x):
    store = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: store.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return store


@pytest.mark.parametrize("method", ["lance", "gpm"])
def test_later_tasks_update_orthogonally_to_the_protected_basis(method):
    model = Net()
    layers = ["conv2", "tok"]
    task_a, task_b = _data(seed=1), _data(seed=2)
    cl = lance.ContinualLance(model, layers, eps=0.9, eps_cl=0.9, calib_batches=3, protect_batches=3) \
        if method == "lance" else GPM(model, layers, eps_cl=0.9, protect_batches=3)
    cl.before_task(task_a)
    _sgd_task(model, 0, task_a)
    cl.after_task(task_a)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
    cl.before_task(task_b)
    if method == "lance":
        assert set(lance.compressed_layers(model)) == set(layers)
    _sgd_task(model, 1, task_b)
    for n in layers:
        dw = (model.get_submodule(n).weight.detach() - before[n]).reshape(before[n].shape[0], -1)
        p = cl.bases[n]
        assert dw.norm() > 0, n
        assert (dw @ p).norm() / dw.norm() < 1e-4, n  # every update row is orthogonal to span(P)
    cl.after_task(task_b)
    assert not lance.compressed_layers(model)


def test_continual_learning_runs_every_task_in_order():
    model = Net()
    seen = []
    cl = lance.continual_learning(model, [_data(seed=s) for s in range(3)],
                                  lambda m, t, loader: seen.append(t) or _sgd_task(m, t, loader), layers=["tok"],
                                  calib_batches=2, protect_batches=2)
    assert seen == [0, 1, 2] and cl.task == 3
    ranks = [h["basis_ranks"]["tok"] for h in cl.history]
    assert ranks == sorted(ranks)
    assert cl.basis_bytes() == 4 * model.tok.weight.shape[1] * ranks[-1]


# ------------------------------------------------------------------------------------------ the experiment run
def test_finetune_run_on_mnist_measures_what_it_reports():
    """The experiments' run on real data (a few steps): BP keeps the conv inputs, LANCE only the cores."""
    from lrkern.lance.finetune import FinetuneSettings, finetune
    from lrkern.lance.models import SmallCNN
    from lrkern.vision_data import mnist_test, split

    images, labels = mnist_test()
    (x, y), (xe, ye) = split(images, labels, 512, seed=0)
    base = SmallCNN()
    settings = FinetuneSettings(epochs=1, calib_batches=4)
    bp = finetune("cnn", base, 2, "bp", None, None, (x, y), (xe[:500], ye[:500]), settings)
    lc = finetune("cnn", base, 2, "lance", 0.7, "no_batch", (x, y), (xe[:500], ye[:500]), settings)
    assert bp["activation_bytes"] == 4 * 128 * (32 * 14 * 14 + 64 * 7 * 7)  # conv2 and conv3 inputs, fp32
    cores = sum(4 * 128 * torch.tensor(r[1:]).prod().item() for r in lc["ranks"].values())
    assert lc["activation_bytes"] == cores and bp["activation_bytes"] / cores >= 50
    assert all(c == pytest.approx(1.0) for c in bp["cos"].values()) and all(c < 1 for c in lc["cos"].values())
    assert 0 <= lc["accuracy"] <= 100 and lc["step_ms"] > 0


def test_meter_counts_a_shared_input_once_in_distinct_bytes():
    class Mlp(nn.Module):  # gate and up read the same tensor, as in a gated MLP
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    m, x = Mlp(), torch.randn(3, 5, 6)
    with lance.SavedBytesMeter(m, ["gate", "up", "down"]) as meter:
        m(x).sum()
    assert meter.bytes["gate"] == meter.bytes["up"] == x.numel() * 4
    assert meter.layer_bytes() == 2 * x.numel() * 4 + 3 * 5 * 8 * 4
    assert meter.distinct_layer_bytes == x.numel() * 4 + 3 * 5 * 8 * 4
