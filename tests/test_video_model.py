"""lrkern.spiking.video (the compressed-domain model), lrkern.spiking.energy (operation counts) and
lrkern.spiking.train on small random tensors."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lrkern.spiking import LIF
from lrkern.spiking.energy import EnergyTable, OpCounter
from lrkern.spiking.train import batches, evaluate, train
from lrkern.spiking.video import CompressedVideoNet, VideoNetConfig, _gop_average

SMALL = dict(frame=(32, 48), gops=2, dim=32, heads=2, mv_channels=8, res_channels=8, num_classes=3)


def _inputs(B=2, K=2, H=32, W=48, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    fr = torch.randint(0, 256, (B, K, 3, H, W), dtype=torch.uint8, generator=g)
    mv = torch.randn(B, T, 2, H // 16, W // 16, generator=g)
    res = torch.randint(-40, 40, (B, T, 1, H // 2, W // 2), dtype=torch.int8, generator=g)
    gi = torch.arange(T) // (T // K)
    return fr, mv, res, gi


@pytest.mark.parametrize("variant,p_neuron", [("full", "stm"), ("full", "lif"), ("full", "relu"),
                                              ("iframe_only", "stm"), ("pframe_only", "stm")])
def test_every_variant_runs_forward_and_backward(variant, p_neuron):
    torch.manual_seed(0)
    net = CompressedVideoNet(VideoNetConfig(variant=variant, p_neuron=p_neuron, **SMALL))
    y = net(*_inputs())
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    y.square().sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads if g is not None)
    assert net.head.weight.grad.abs().sum() > 0
    if net.p_enc is not None:  # the P path is trained end to end (through the surrogate when spiking)
        assert net.p_enc.mv_stem[0].weight.grad.abs().sum() > 0


def test_iframe_only_ignores_motion_and_full_does_not():
    torch.manual_seed(0)
    fr, mv, res, gi = _inputs()
    for variant, depends in (("iframe_only", False), ("full", True)):
        net = CompressedVideoNet(VideoNetConfig(variant=variant, p_neuron="relu", **SMALL)).eval()
        a, b = net(fr, mv, res, gi), net(fr, mv * 3 + 1, res, gi)
        assert (not torch.equal(a, b)) == depends, variant


def test_gain_starts_at_one_so_the_stm_starts_as_lif():
    net = CompressedVideoNet(VideoNetConfig(**SMALL))
    assert net.gain is not None and net.gain.weight.abs().sum() == 0 and net.gain.bias.abs().sum() == 0
    assert not net.p_enc.stm.beta.detach().any()


def test_gop_average_rows():
    gi = torch.tensor([0, 0, 0, 1, 1, 2])
    avg = _gop_average(gi, 2, 6, 3, torch.float32, "cpu")
    assert avg.shape == (2, 3, 6)
    torch.testing.assert_close(avg.sum(-1), torch.ones(2, 3))
    assert avg[0, 1, 3] == 0.5 and avg[0, 0, 3] == 0
    with pytest.raises(ValueError, match="gop_index"):
        _gop_average(torch.tensor([0, 3]), 1, 2, 3, torch.float32, "cpu")


def test_bad_inputs_name_the_argument():
    net = CompressedVideoNet(VideoNetConfig(**SMALL))
    fr, mv, res, gi = _inputs()
    with pytest.raises(ValueError, match="iframes"):
        net(fr[:, :1], mv, res, gi)
    with pytest.raises(ValueError, match="mv"):
        net(fr, mv[..., :1], res, gi)
    with pytest.raises(ValueError, match="residual"):
        net(fr, mv, res[:, :-1], gi)
    for bad in (dict(variant="rgb"), dict(p_neuron="gelu"), dict(frame=(40, 48)), dict(dim=30, heads=4)):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            VideoNetConfig(**{**SMALL, **bad})


class _SpikeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.lif, self.fc2 = nn.Linear(6, 10), LIF(), nn.Linear(10, 4)

    def forward(self, x):  # x [B, T, 6]; the LIF runs time-major
        s = self.lif(self.fc1(x).transpose(0, 1)).transpose(0, 1)
        return self.fc2(s)


def test_op_counter_counts_macs_and_sops_from_the_measured_rate():
    torch.manual_seed(0)
    net = _SpikeNet()
    x = torch.randn(3, 5, 6) * 3
    with OpCounter(net) as c:
        net(x)
    spikes = net.lif(net.fc1(x).transpose(0, 1))
    rate = float(spikes.detach().mean())
    assert 0 < rate < 1
    r = c.report(EnergyTable(mac_pj=2.0, ac_pj=0.5))
    fc1, fc2 = (next(row for row in r["layers"] if row["layer"] == n) for n in ("fc1", "fc2"))
    assert fc1["kind"] == "mac" and fc1["ops_per_clip"] == 5 * 10 * 6  # per clip: T * out * in
    assert fc2["kind"] == "sop" and fc2["input_rate"] == pytest.approx(rate)
    assert fc2["ops_per_clip"] == pytest.approx(5 * 4 * 10 * rate)
    want = (300 * 2.0 + 5 * 4 * 10 * rate * 0.5) * 1e-12
    assert r["joules_per_clip"] == pytest.approx(want)
    assert r["dense_equivalent_joules_per_clip"] == pytest.approx((300 + 200) * 2.0 * 1e-12)


def test_op_counter_all_zero_spikes_are_still_spikes_and_real_zeros_are_macs():
    net = _SpikeNet()
    with torch.no_grad():
        net.fc1.weight.zero_()
        net.fc1.bias.fill_(-5.0)  # no neuron fires
    with OpCounter(net) as c:
        net(torch.randn(2, 4, 6))
    rows = {row["layer"]: row for row in c.report()["layers"]}
    assert rows["fc2"]["kind"] == "sop" and rows["fc2"]["ops_per_clip"] == 0
    with OpCounter(nn.Sequential(nn.Linear(6, 3))) as c:
        c.model(torch.zeros(2, 6))
    assert c.report()["layers"][0]["kind"] == "mac"


def test_op_counter_counts_attention_and_conv():
    net = CompressedVideoNet(VideoNetConfig(variant="iframe_only", **SMALL)).eval()
    fr, mv, res, gi = _inputs()
    with OpCounter(net) as c, torch.no_grad():
        net(fr, mv, res, gi)
    rows = {row["layer"]: row for row in c.report()["layers"]}
    L, D = net.cfg.tokens, net.cfg.dim
    assert rows["blocks.0.attn"]["ops_per_clip"] == 2 * L * L * D
    conv = net.i_enc.net[0]  # 3 -> 32, stride 2, 3x3, on 32x48 -> 16x24, K = 2 frames per clip
    assert rows["i_enc.net.0"]["ops_per_clip"] == 2 * 32 * 16 * 24 * 3 * 9 and conv.out_channels == 32
    with pytest.raises(ValueError, match="mac_pj"):
        EnergyTable(mac_pj=-1)


def _toy_split(n, seed):
    """Clips whose label is the sign pattern of a global motion: learnable only from the motion vectors."""
    fr, mv, res, gi = _inputs(B=n, seed=seed)
    labels = torch.arange(n) % 3
    mv = mv * 0.1
    mv[:, :, 0] += (labels.float() - 1)[:, None, None, None]
    fr[:] = fr[:1]  # identical I-frames: no appearance cue
    return SimpleNamespace(iframes=fr, mv=mv, residual=res, gop_index=gi, labels=labels, classes=["a", "b", "c"])


def test_training_learns_motion_classes_and_restores_the_best_epoch():
    torch.manual_seed(0)
    data = _toy_split(48, 1)
    net = CompressedVideoNet(VideoNetConfig(variant="full", **SMALL))
    # 15 short epochs: eval-mode BN needs enough steps for its running statistics to settle.
    res = train(net, data, data, epochs=15, lr=3e-3, batch_size=16, log=None)
    assert res.best_val == max(h["val_acc"] for h in res.history)
    assert evaluate(net, data) == pytest.approx(res.best_val)
    assert res.best_val >= 90.0
    assert len(list(batches(data, 20, False))) == 3


def test_cli_demo_and_train_on_a_video_folder(tmp_path, capsys):
    """End to end on real encoded clips: the demo builds a tiny synthetic set (real MPEG-4 through PyAV), trains and
    reports; ``train`` then reads the set's own video folders as a user dataset and saves a checkpoint."""
    from lrkern.cli import main

    root = tmp_path / "synth"
    assert main(["video", "demo", "--per-class", "2,1,1", "--epochs", "1", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "iframe_only" in out and "full" in out and "videos/s" in out and "mJ/video" in out
    ckpt = tmp_path / "full.pt"
    assert main(["video", "train", "--data", str(root), "--epochs", "1", "--out", str(ckpt)]) == 0
    saved = torch.load(ckpt, weights_only=False)
    assert saved["classes"] == sorted(saved["classes"]) and len(saved["classes"]) == 8
    net = CompressedVideoNet(saved["config"])
    net.load_state_dict(saved["state_dict"])
    with pytest.raises(SystemExit, match="expected"):
        main(["video", "train", "--data", str(tmp_path / "missing")])
