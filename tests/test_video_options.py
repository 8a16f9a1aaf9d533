"""Options of the compressed-domain video model (spec ``spiking_video.md`` 3.2 and its ablations):

- ``VideoNetConfig(reset_per_gop=True)``: the P path's neurons restart at every GOP. Checked against a loop that calls
  the model's own neuron modules once per (clip, GOP) from the reset state, bit for bit, also with GOP boundaries that
  differ between the clips of a batch; the default (False) is checked to be the unchanged model.
- ``accumulate="coviar"``: MVs and residuals accumulated back to the I-frame (``lrkern.data.compressed``), checked
  against an independent per-pixel chain trace on hand-made fields, on real MPEG-4 streams (a known translation, a
  brightening clip whose accumulated residual exceeds int8), and wired through the datasets, the model config and the
  CLI. Small shapes; a few seconds on one core.
"""
import math

import numpy as np
import pytest
import torch

from lrkern.spiking import LIF
from lrkern.spiking.energy import OpCounter
from lrkern.spiking.stm import STM
from lrkern.spiking.video import CompressedVideoNet, GopSegments, PerGop, VideoNetConfig, config_for

SMALL = dict(frame=(32, 48), gops=2, dim=32, heads=2, mv_channels=8, res_channels=8, num_classes=3)


def _inputs(B=2, K=2, T=6, seed=0, H=32, W=48):
    g = torch.Generator().manual_seed(seed)
    fr = torch.randint(0, 256, (B, K, 3, H, W), dtype=torch.uint8, generator=g)
    mv = torch.randn(B, T, 2, H // 16, W // 16, generator=g) * 3
    res = torch.randint(-100, 100, (B, T, 1, H // 2, W // 2), dtype=torch.int8, generator=g)
    return fr, mv, res, torch.arange(T) // (T // K)


def _net(seed=0, **cfg):
    torch.manual_seed(seed)
    net = CompressedVideoNet(VideoNetConfig(**{**SMALL, **cfg}))
    if net.gain is not None:  # a non-trivial STM: per-GOP gain and a dynamic threshold (both start at 0)
        with torch.no_grad():
            net.gain.weight.normal_(0, 0.3)
            net.p_enc.stm.beta.fill_(0.4)
            net.p_enc.stm.tau.copy_(torch.linspace(1.5, 4.0, net.p_enc.channels))
    return net


def _runs(gi_row):
    """[(t0, t1)] of the runs of equal gop_index values of one clip."""
    cut = [0] + [t for t in range(1, len(gi_row)) if gi_row[t] != gi_row[t - 1]] + [len(gi_row)]
    return list(zip(cut[:-1], cut[1:]))


def _per_gop_loop(neuron, x, gi):
    """Reference: ``neuron`` called once per clip and GOP run from its reset state (x [T, B, ...], gi [B, T])."""
    out = torch.empty_like(x)
    for b in range(x.shape[1]):
        for t0, t1 in _runs(gi[b].tolist()):
            out[t0:t1, b] = neuron(x[t0:t1, b:b + 1])[:, 0]
    return out


def _p_path_reference(net, u, gain_t, gi, reset):
    """The P encoder after its input BN, rebuilt from the model's modules: the STM and every block's LIF on the whole
    sequence (reset=False) or once per clip and GOP (reset=True); conv and BN always on the whole [T, B] batch."""
    enc = net.p_enc
    x = u if gain_t is None else u * gain_t[..., None, None]
    run = (lambda m, y: _per_gop_loop(m, y, gi)) if reset else (lambda m, y: m(y))
    s = run(enc.stm, x)
    for block in enc.blocks:
        T, B = s.shape[:2]
        y = block.bn(block.conv(s.flatten(0, 1)))
        s = run(block.neuron, y.view(T, B, *y.shape[1:]))
    return s


def _forward_capturing(net, inputs):
    """Run the model; return (logits, the P encoder's input-BN output u [T, B, ...], its gain_t, its output)."""
    got = {}
    enc = net.p_enc
    h1 = enc.bn.register_forward_hook(lambda m, a, o: got.__setitem__("u", o))
    h2 = enc.register_forward_pre_hook(lambda m, a: got.__setitem__("gain_t", a[2]))
    h3 = enc.register_forward_hook(lambda m, a, o: got.__setitem__("s", o))
    try:
        y = net(*inputs)
    finally:
        for h in (h1, h2, h3):
            h.remove()
    T, B = inputs[1].shape[1], inputs[1].shape[0]
    return y, got["u"].view(T, B, *got["u"].shape[1:]), got["gain_t"], got["s"]


# ------------------------------------------------------------------------------------------------ reset_per_gop

@pytest.mark.parametrize("p_neuron", ["stm", "lif", "relu"])
def test_reset_off_is_the_unchanged_model(p_neuron):
    """reset_per_gop=False: same modules and state dict as a config without the option, the same logits and gradients
    bit for bit, and the P path equals neurons run over the whole sequence (state carried across GOPs)."""
    a, b = _net(p_neuron=p_neuron), _net(p_neuron=p_neuron, reset_per_gop=False)
    assert list(a.state_dict()) == list(b.state_dict())
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    inputs = _inputs()
    ya, yb = a(*inputs), b(*inputs)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        assert pa.grad is None or torch.equal(pa.grad, pb.grad), name
    with torch.no_grad():
        _, u, gain_t, s = _forward_capturing(b, inputs)
        assert torch.equal(s, _p_path_reference(b, u, gain_t, None, reset=False))


@pytest.mark.parametrize("p_neuron", ["stm", "lif"])
@pytest.mark.parametrize("gop_index", [
    [0, 0, 0, 1, 1, 1],                              # [T]: the same GOPs for every clip
    [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],        # [B, T]: other boundaries and unequal runs in each clip
    [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]],        # a one-frame GOP; a clip without a second GOP
], ids=["shared", "per-clip", "uneven"])
def test_reset_per_gop_equals_a_loop_over_gops(p_neuron, gop_index):
    net = _net(p_neuron=p_neuron, reset_per_gop=True)
    fr, mv, res, _ = _inputs()
    gi = torch.tensor(gop_index)
    gi_rows = gi.expand(2, -1) if gi.dim() == 1 else gi
    with torch.no_grad():
        y, u, gain_t, s = _forward_capturing(net, (fr, mv, res, gi))
        ref = _p_path_reference(net, u, gain_t, gi_rows, reset=True)
        carried = _p_path_reference(net, u, gain_t, gi_rows, reset=False)
        assert 0.01 < float(s.mean()) < 0.99          # the neurons do fire, not always
        assert torch.equal(s, ref)                   # bit for bit: the same fused op on the same neurons
        assert not torch.equal(s, carried)           # and the state does matter here
        y_off = _net(p_neuron=p_neuron, reset_per_gop=False)(fr, mv, res, gi)
        assert not torch.equal(y, y_off)


def test_reset_per_gop_makes_each_gop_independent_of_the_previous_one():
    """Eval mode (frame-wise BN): perturbing the P-frames of GOP 0 leaves the P path of GOP 1 unchanged exactly when
    the neurons restart per GOP, and changes it when their state carries over."""
    fr, mv, res, gi = _inputs()
    mv2, res2 = mv.clone(), res.clone()
    mv2[:, :3] = -mv2[:, :3] * 2
    res2[:, :3] = -res2[:, :3]
    for reset in (True, False):
        net = _net(reset_per_gop=reset)
        with torch.no_grad():
            for m in net.modules():  # eval-mode BN with the statistics of these inputs, so that neurons fire
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
                    m.reset_running_stats()
            net(fr, mv, res, gi)
            net.eval()
            s1 = _forward_capturing(net, (fr, mv, res, gi))[3]
            s2 = _forward_capturing(net, (fr, mv2, res2, gi))[3]
        assert not torch.equal(s1[:3], s2[:3])
        assert torch.equal(s1[3:], s2[3:]) == reset, reset


def test_reset_per_gop_gradients_match_the_loop_and_reach_every_parameter():
    torch.manual_seed(1)
    gi = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    for neuron in (STM(4), LIF()):
        if isinstance(neuron, STM):
            with torch.no_grad():
                neuron.beta.fill_(0.3)
        x = (torch.randn(6, 2, 4, 3, 3) * 1.5).requires_grad_()
        w = torch.randn(6, 2, 4, 3, 3)
        grads = []
        for fn in (lambda v: PerGop()(neuron, v, GopSegments(gi)), lambda v: _per_gop_loop(neuron, v, gi)):
            neuron.zero_grad()
            x.grad = None
            (fn(x) * w).sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in neuron.parameters()])
        for g_model, g_loop in zip(*grads):
            torch.testing.assert_close(g_model, g_loop, rtol=1e-5, atol=1e-6)
        assert grads[0][0].abs().sum() > 0
    net = _net(reset_per_gop=True)
    y = net(*_inputs()[:3], gi)
    y.square().sum().backward()
    for name, p in net.named_parameters():
        if name.startswith("p_enc.") and p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for p in (net.p_enc.mv_stem[0].weight, net.p_enc.res_stem[0].weight, net.p_enc.stm.tau,
              net.p_enc.stm.theta0, net.p_enc.stm.beta, net.gain.weight):
        assert p.grad.abs().sum() > 0


def test_gop_segments_layout():
    gi = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    seg = GopSegments(gi)
    assert (seg.runs, seg.steps) == (5, 3) and not seg.identity
    x = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3)
    lay = seg.split(x)
    assert lay.shape == (3, 5, 3)
    # run 0 = clip 0 frames 0-1 (+1 padded step), run 1 = clip 0 frames 2-4, run 2 = clip 1 frame 0 (+2 padded) ...
    assert torch.equal(lay[:2, 0], x[0:2, 0]) and torch.equal(lay[2, 0], torch.zeros(3))
    assert torch.equal(lay[:, 1], x[2:5, 0]) and torch.equal(lay[0, 2], x[0, 1])
    assert torch.equal(seg.merge(lay), x)
    assert GopSegments(torch.zeros(3, 4, dtype=torch.long)).identity


def test_reset_per_gop_energy_counts_the_blocks_as_spiking():
    """The blocks after the first neuron read spikes (SOPs) with or without the per-GOP layout; p_token reads firing
    rates (MACs)."""
    for reset in (False, True):
        net = _net(reset_per_gop=reset).eval()
        with OpCounter(net) as c, torch.no_grad():
            net(*_inputs())
        kinds = {r["layer"]: r["kind"] for r in c.report()["layers"]}
        assert kinds["p_enc.blocks.0.conv"] == kinds["p_enc.blocks.1.conv"] == "sop", reset
        assert kinds["p_token"] == "mac"


# ------------------------------------------------------------------------------------------- CoViAR accumulation

av = pytest.importorskip("av")

from lrkern.data import synth_motion as sm  # noqa: E402
from lrkern.data.compressed import (MV_UNIT, _luma, _pool_residual, accumulate_coviar,  # noqa: E402
                                    coviar_step, decode_compressed, encode_clip, motion_compensate)


def _trace_reference(d, r, gop_index):
    """Independent reference for integer-pel fields: follow every pixel's reference chain back to the I-frame,
    adding each frame's displacement and residual at the pixel the chain passes through (sources clamped)."""
    T, H, W = d.shape[:3]
    D, R = np.zeros(d.shape, np.float64), np.zeros(r.shape, np.float64)
    for t in range(T):
        first = t
        while first > 0 and gop_index[first - 1] == gop_index[t]:
            first -= 1
        for y in range(H):
            for x in range(W):
                py, px = y, x
                for s in range(t, first - 1, -1):
                    dx, dy = d[s, py, px]
                    D[t, y, x] += (dx, dy)
                    R[t, y, x] += r[s, py, px]
                    px = min(max(px - int(dx), 0), W - 1)
                    py = min(max(py - int(dy), 0), H - 1)
    return D, R


def _bilinear_scalar(f, x, y):
    H, W = f.shape[:2]
    x, y = min(max(x, 0.0), W - 1.0), min(max(y, 0.0), H - 1.0)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x1]) + fy * ((1 - fx) * f[y1, x0] + fx * f[y1, x1]))


def test_coviar_constant_translation_accumulates_linearly_and_resets_per_gop():
    T, H, W = 6, 8, 12
    gi = np.array([0, 0, 0, 0, 1, 1])
    for v in ((2.0, -1.0), (0.5, 0.25)):  # integer and sub-pixel
        d = np.broadcast_to(np.array(v, np.float32), (T, H, W, 2))
        r = np.full((T, H, W, 1), 10.0, np.float32)
        D, R = accumulate_coviar(d, r, gi)
        assert D.dtype == R.dtype == np.float32 and D.shape == d.shape and R.shape == r.shape
        steps = np.array([1, 2, 3, 4, 1, 2], np.float32)  # frames since the I-frame: restarts at the second GOP
        np.testing.assert_allclose(D, steps[:, None, None, None] * np.array(v, np.float32) + 0 * D, atol=1e-5)
        np.testing.assert_allclose(R[..., 0], np.broadcast_to(10 * steps[:, None, None], (T, H, W)), atol=1e-4)


def test_coviar_chains_match_a_per_pixel_trace():
    """Random integer-pel fields with motion boundaries: every pixel's accumulated motion and residual equal the
    explicit trace of its reference chain; the first P-frame of each GOP is the frame's own field."""
    rng = np.random.default_rng(0)
    T, H, W = 7, 8, 12
    d = rng.integers(-2, 3, (T, H, W, 2)).astype(np.float32)
    d[:, :, :6] = rng.integers(-2, 3, (T, 1, 1, 2))   # a rigid left half, a noisy right half
    r = rng.normal(0, 20, (T, H, W, 3)).astype(np.float32)
    gi = np.array([0, 0, 0, 0, 1, 1, 1])
    D, R = accumulate_coviar(d, r, gi)
    D_ref, R_ref = _trace_reference(d, r, gi)
    np.testing.assert_array_equal(D, D_ref)
    np.testing.assert_allclose(R, R_ref, rtol=0, atol=1e-3)
    for t in (0, 4):
        assert np.array_equal(D[t], d[t]) and np.array_equal(R[t], r[t])
    assert not np.array_equal(D[2], d[2])


def test_coviar_step_samples_bilinearly_at_the_fractional_source():
    rng = np.random.default_rng(1)
    H, W = 6, 10
    D_prev = rng.normal(0, 3, (H, W, 2)).astype(np.float32)
    R_prev = rng.normal(0, 30, (H, W, 1)).astype(np.float32)
    d = rng.uniform(-2.5, 2.5, (H, W, 2)).astype(np.float32)
    r = rng.normal(0, 5, (H, W, 1)).astype(np.float32)
    D, R = coviar_step(D_prev, R_prev, d, r)
    for y in range(H):
        for x in range(W):
            sx, sy = float(np.float32(x) - d[y, x, 0]), float(np.float32(y) - d[y, x, 1])
            np.testing.assert_allclose(D[y, x], _bilinear_scalar(D_prev, sx, sy) + d[y, x], atol=1e-4)
            np.testing.assert_allclose(R[y, x], _bilinear_scalar(R_prev, sx, sy) + r[y, x], atol=1e-3)


def test_coviar_never_clips():
    """Accumulated values beyond int8 keep their value: float32 fields, int16 pooled residuals; beyond int16 raises."""
    d = np.zeros((3, 16, 16, 2), np.float32)
    r = np.full((3, 16, 16, 1), 100.0, np.float32)
    _, R = accumulate_coviar(d, r, np.zeros(3, np.int64))
    assert R[2].min() == R[2].max() == 300.0
    pooled = _pool_residual(R[2], 2, wide=True)
    assert pooled.dtype == np.int16 and pooled.shape == (1, 8, 8) and (pooled == 300).all()
    assert (_pool_residual(R[2], 2) == 127).all()  # the per-frame format clamps: why the accumulated one is wide
    with pytest.raises(OverflowError, match="int16"):
        _pool_residual(np.full((16, 16, 1), 40000.0, np.float32), 2, wide=True)


def _translating_texture(v, n, S=96):
    """A detailed texture panning by ``v`` px/frame (integer), the whole frame moving."""
    tex = 128 + 60 * sm._blur_noise(np.random.default_rng(7), (S + 64, S + 64), 1.5)
    frames = [tex[32 - v[1] * t:32 - v[1] * t + S, 32 - v[0] * t:32 - v[0] * t + S] for t in range(n)]
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def test_decode_coviar_on_a_real_stream(tmp_path):
    """MPEG-4 Part 2, GOP 6, a pan of (2, -1) px/frame: the accumulated MV of the j-th P-frame of a GOP is j times
    the per-frame MV (interior cells), the first P-frame of each GOP equals the per-frame tensors, the residual is
    int16, and everything else is unchanged."""
    v = (2, -1)
    path = encode_clip(_translating_texture(v, 12), tmp_path / "pan.avi", gop=6)
    per = decode_compressed(path)
    acc = decode_compressed(path, accumulate="coviar")
    assert acc.accumulate == "coviar" and per.accumulate is None
    assert acc.mv.shape == per.mv.shape == (10, 2, 6, 6) and acc.mv.dtype == np.float32
    assert acc.residual.dtype == np.int16 and per.residual.dtype == np.int8 and acc.residual.shape == (10, 1, 48, 48)
    assert np.array_equal(acc.iframes, per.iframes) and np.array_equal(acc.gop_index, per.gop_index)
    inner = per.mv[:, :, 1:-1, 1:-1] * MV_UNIT
    np.testing.assert_allclose(np.median(inner, axis=(2, 3)), np.broadcast_to(np.array(v, np.float32), (10, 2)))
    for t, j in enumerate([1, 2, 3, 4, 5] * 2):  # j-th P-frame of its GOP
        got = acc.mv[t, :, 1:-1, 1:-1] * MV_UNIT
        np.testing.assert_allclose(np.median(got, axis=(1, 2)), j * np.array(v, np.float32), atol=1e-5)
    for t in (0, 5):  # first P-frame after each I-frame: nothing accumulated yet
        np.testing.assert_allclose(acc.mv[t], per.mv[t], atol=1e-6)
        np.testing.assert_array_equal(acc.residual[t], per.residual[t])
    # The accumulated residual is the frame minus the I-frame carried along the chain by the same bilinear motion
    # compensation: R_t = F_t - P_t with P_t = MC(P_{t-1}, vectors of t), P = the I-frame (luma) at each I-frame.
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        t = 0
        for frame in container.decode(stream):
            luma = _luma(frame).astype(np.float32)
            if int(frame.pict_type) == 1:
                pred = luma
                continue
            sd = frame.side_data.get("MOTION_VECTORS")
            pred = motion_compensate(pred, sd.to_ndarray() if sd is not None else None, impl="numpy")
            want = np.rint((luma - pred).reshape(48, 2, 48, 2).mean(axis=(1, 3)))
            assert np.abs(acc.residual[t, 0].astype(np.float64) - want).max() <= 1, t
            t += 1
    assert t == 10 and np.abs(acc.residual).max() > np.abs(per.residual).max()
    with pytest.raises(ValueError, match="accumulate"):
        decode_compressed(path, accumulate="sum")


def test_decode_coviar_residual_beyond_int8_keeps_its_value(tmp_path):
    """A textured clip brightening by 12 levels per frame (nearly still: MVs about 0): the per-frame residual is about
    9 (bright pixels saturate), the accumulated one grows as its running sum and passes 127, which int8 could not
    hold."""
    tex = 70 + 25 * sm._blur_noise(np.random.default_rng(3), (64, 64), 2.0)
    frames = np.clip(np.rint(np.stack([tex + 12 * t for t in range(12)])), 0, 255).astype(np.uint8)
    path = encode_clip(frames, tmp_path / "fade.avi", gop=12)
    per = decode_compressed(path)
    acc = decode_compressed(path, accumulate="coviar")
    assert per.pict_types == [1] + [2] * 11 and np.abs(per.mv).max() * MV_UNIT <= 2
    assert np.abs(per.residual).max() < 60
    means = acc.residual.astype(np.float64).mean(axis=(1, 2, 3))
    # (not exactly the running sum: the small vectors move the samples, and edges are clamped)
    np.testing.assert_allclose(means, np.cumsum(per.residual.astype(np.float64).mean(axis=(1, 2, 3))), rtol=0.05)
    assert acc.residual.max() > 127 and means[-1] > 100


def test_coviar_datasets_config_and_cli(tmp_path, capsys):
    """The options reach training: make_dataset / load_split / folder_dataset with accumulate="coviar", config_for
    takes the data's accumulate and refuses a mismatch, and `lrkern video train` runs with both options."""
    from lrkern.cli import main

    root = tmp_path / "synth"
    paths = sm.make_dataset(root, per_class=(1, 1, 1), workers=1, log=False, accumulate="coviar")
    assert paths["train"].name == "train-coviar.pt" and (root / "train.pt").is_file()
    tr = sm.load_split(root, "train", accumulate="coviar")
    base = sm.load_split(root, "train")
    assert tr.meta["accumulate"] == "coviar" and "accumulate" not in base.meta
    assert tr.residual.dtype == torch.int16 and tr.residual.shape == base.residual.shape
    assert torch.equal(tr.iframes, base.iframes) and int(tr.residual.abs().max()) <= 255
    folder = sm.folder_dataset(root / "train", accumulate="coviar")
    order = [folder.classes.index(c) for c in sm.CLASSES]
    assert torch.equal(folder.residual[order], tr.residual) and folder.meta["accumulate"] == "coviar"
    stamp = paths["train"].stat().st_mtime_ns
    sm.make_dataset(root, per_class=(1, 1, 1), workers=1, log=False, accumulate="coviar")
    assert paths["train"].stat().st_mtime_ns == stamp  # cached

    cfg = config_for("full", tr)
    assert cfg.accumulate == "coviar" and config_for("full_coviar", tr).accumulate == "coviar"
    assert config_for("full_reset_gop", tr).reset_per_gop
    with pytest.raises(ValueError, match="accumulate"):
        config_for("full_coviar", base)
    with pytest.raises(ValueError, match="accumulate"):
        config_for("full", tr, accumulate=None)
    net = CompressedVideoNet(config_for("full_coviar", tr))
    assert net(tr.iframes[:2], tr.mv[:2].float(), tr.residual[:2], tr.gop_index).shape == (2, 8)

    capsys.readouterr()
    assert main(["video", "train", "--data", str(root), "--epochs", "1", "--accumulate", "coviar",
                 "--reset-per-gop", "--out", str(tmp_path / "m.pt")]) == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=False)
    assert saved["config"].accumulate == "coviar" and saved["config"].reset_per_gop
    assert main(["video", "train", "--data", str(root), "--epochs", "1", "--model", "full_coviar"]) == 0
    with pytest.raises(SystemExit, match="accumulate"):
        main(["video", "train", "--data", str(root), "--model", "full_coviar", "--accumulate", "none"])


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="accumulate"):
        VideoNetConfig(**SMALL, accumulate="sum")
    with pytest.raises(ValueError, match="reset_per_gop"):
        VideoNetConfig(**SMALL, reset_per_gop="yes")
    for call in (lambda: sm.load_split(tmp_path, "train", accumulate="CoViAR"),
                 lambda: sm.make_dataset(tmp_path, per_class=(1, 1, 1), accumulate=1),
                 lambda: sm.folder_dataset(tmp_path, accumulate="mv")):
        with pytest.raises(ValueError, match="accumulate"):
            call()
    d, r = np.zeros((2, 8, 8, 2), np.float32), np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="^d must"):
        accumulate_coviar(d[..., :1], r, np.zeros(2))
    with pytest.raises(ValueError, match="^r must"):
        accumulate_coviar(d, r[:1], np.zeros(2))
    with pytest.raises(ValueError, match="gop_index"):
        accumulate_coviar(d, r, np.zeros(3))
    net = _net(reset_per_gop=True)
    fr, mv, res, _ = _inputs()
    with pytest.raises(ValueError, match="gop_index"):
        net(fr, mv, res, torch.zeros(2, 5, dtype=torch.long))

