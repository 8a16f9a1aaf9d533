"""The compressed-domain video loader (lrkern.data.compressed) and the synthetic action set
(lrkern.data.synth_motion): motion vectors of a known translation through real MPEG-4 Part 2 and H.264 streams, the
residual of a clean pan, the pure NumPy MV / motion-compensation functions, determinism, the rest-phase I-frames, the
error paths, folder datasets and the cached dataset. CPU only, about 15 s on 2 cores."""
import math

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from lrkern.data import synth_motion as sm  # noqa: E402
from lrkern.data.compressed import (MV_UNIT, decode_compressed, displacement_grid, encode_clip,  # noqa: E402
                                    motion_compensate, mv_rasterize)

S = 96
_EXT = {"mpeg4": "avi", "libx264": "mp4"}
_RNG = np.random.default_rng(1234)
_BG = 128 + 40 * sm._blur_noise(_RNG, (S, S), 3.0)             # static background texture (RGB)
_FG = 128 + 60 * sm._blur_noise(_RNG, (240, 240), 1.5)         # detailed texture: block matching is unambiguous
_SMOOTH = 128 + 40 * sm._blur_noise(_RNG, (240, 240), 6.0)     # low-frequency texture: clean intra coding


def _shift(img, ox, oy):
    """``img`` sampled bilinearly at (x + ox, y + oy) on an S x S grid (content moves by (-ox, -oy))."""
    ix, iy = int(math.floor(ox)), int(math.floor(oy))
    fx, fy = ox - ix, oy - iy
    c = img[iy:iy + S + 1, ix:ix + S + 1]
    return (1 - fy) * ((1 - fx) * c[:-1, :-1] + fx * c[:-1, 1:]) + fy * ((1 - fx) * c[1:, :-1] + fx * c[1:, 1:])


def _u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _moving_patch(v, n=24, half=24, c0=(30.0, 34.0)):
    """A 48x48 textured patch translating by ``v`` px/frame (texture and outline together) over a static textured
    background; no camera drift, no noise."""
    X, Y = np.arange(S)[None, :], np.arange(S)[:, None]
    frames = []
    for t in range(n):
        cx, cy = c0[0] + v[0] * t, c0[1] + v[1] * t
        a = np.clip(0.5 - (np.maximum(np.abs(X - cx), np.abs(Y - cy)) - half), 0, 1)[..., None]
        frames.append(_u8(_BG * (1 - a) + _shift(_FG, 70 - v[0] * t, 70 - v[1] * t) * a))
    return np.stack(frames)


def _records(rows):
    """FFmpeg-style MV records from (w, h, dst_x, dst_y, motion_x, motion_y, motion_scale) tuples."""
    dt = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"), ("dst_x", "<i2"),
          ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]
    r = np.zeros(len(rows), dt)
    for i, (w, h, dx, dy, mx, my, sc) in enumerate(rows):
        r[i] = (-1, w, h, dx + mx // sc, dy + my // sc, dx, dy, 0, mx, my, sc)
    return r


# ------------------------------------------------------------------------------------------- motion vectors (1)

@pytest.mark.parametrize("codec,v", [("mpeg4", (2.0, -1.5)), ("libx264", (1.25, 0.75))], ids=["mpeg4", "h264"])
def test_mv_of_known_translation(tmp_path, codec, v):
    """d = dst - src: the motion from the previous frame to this one, in px (x right, y down); MV = d / 8."""
    n, c0, half = 24, (30.0, 34.0), 24
    clip = decode_compressed(encode_clip(_moving_patch(v, n, half, c0), tmp_path / f"t.{_EXT[codec]}", codec=codec))
    assert [i for i, p in enumerate(clip.pict_types) if p == 1] == [0, 12]
    assert clip.mv.shape == (n - 2, 2, S // 16, S // 16) and clip.mv.dtype == np.float32
    fg_err, bg_abs = [], []
    t_of = [t for t in range(n) if t % 12]                     # P-frame index -> frame number
    for ti, t in enumerate(t_of):
        centres = [(c0[0] + v[0] * s, c0[1] + v[1] * s) for s in (t - 1, t)]
        for i in range(S // 16):
            for j in range(S // 16):
                x0, x1, y0, y1 = 16 * j, 16 * j + 15, 16 * i, 16 * i + 15
                inside = all(x0 >= cx - half + 1 and x1 <= cx + half - 1 and y0 >= cy - half + 1
                             and y1 <= cy + half - 1 for cx, cy in centres)
                far = all(x1 < cx - half - 16 or x0 > cx + half + 16 or y1 < cy - half - 16 or y0 > cy + half + 16
                          for cx, cy in centres)
                d = clip.mv[ti, :, i, j] * MV_UNIT
                if inside:
                    fg_err.append(np.abs(d - np.asarray(v)).max())
                if far:
                    bg_abs.append(np.abs(d).max())
    assert len(fg_err) > 40 and len(bg_abs) > 40
    # measured: 0.000 px for both codecs (mean and max)
    assert max(fg_err) <= 0.5, f"foreground MV error up to {max(fg_err):.2f} px"
    assert float(np.mean(fg_err)) <= 0.1
    assert max(bg_abs) <= 0.25, f"static background MV up to {max(bg_abs):.2f} px"


def test_mv_rasterize_and_motion_compensate_reference():
    H, W = 32, 48
    # a 16x16 MPEG-4 block moved right by 2 px (motion = src - dst = -4 half-pels); an H.264 8x8 block moved up by
    # 0.75 px (motion_y = +3 quarter-pels) inside the cell below-right; the rest has no vector (intra).
    rec = _records([(16, 16, 24, 8, -4, 0, 2), (8, 8, 36, 28, 0, 3, 4)])
    mv = mv_rasterize(rec, H, W, mask=True)
    assert mv.shape == (3, 2, 3) and mv.dtype == np.float32
    expect = np.zeros((3, 2, 3), np.float32)
    expect[0, 0, 1] = 2 / 8
    expect[1, 1, 2] = -0.75 / 4 / 8
    expect[2, 0, 1], expect[2, 1, 2] = 1.0, 0.25
    np.testing.assert_allclose(mv, expect, atol=1e-7)
    d, valid = displacement_grid(rec, H, W)
    assert d.shape == (8, 12, 2) and valid.sum() == 16 + 4

    prev = np.arange(H * W, dtype=np.float32).reshape(H, W) % 251
    pred = motion_compensate(prev, rec)
    # the moved block samples prev 2 px to the left; elsewhere co-located copies
    np.testing.assert_array_equal(pred[0:16, 16:32], prev[0:16, 14:30])
    mask = np.ones((H, W), bool)
    mask[0:16, 16:32] = mask[24:32, 32:40] = False
    np.testing.assert_array_equal(pred[mask], prev[mask])
    # the 8x8 block: source 0.75 px below, bilinear, clamped at the bottom edge
    sy = np.clip(np.arange(24, 32) + 0.75, 0, H - 1)
    y0 = np.floor(sy).astype(int)
    y1 = np.minimum(y0 + 1, H - 1)
    f = (sy - y0)[:, None]
    np.testing.assert_allclose(pred[24:32, 32:40], prev[y0, 32:40] * (1 - f) + prev[y1, 32:40] * f, rtol=1e-6)
    # a half-pel vector averages the two neighbours; RGB frames are compensated per channel
    half = motion_compensate(prev, _records([(16, 16, 8, 8, 1, 0, 2)]))
    np.testing.assert_allclose(half[0:16, 0:15], (prev[0:16, 0:15] + prev[0:16, 1:16]) / 2)
    rgb = np.stack([prev, prev + 1, prev + 2], -1)
    np.testing.assert_allclose(motion_compensate(rgb, rec)[..., 2], pred + 2, rtol=1e-6)
    assert mv_rasterize(None, H, W).shape == (2, 2, 3) and not mv_rasterize(None, H, W).any()
    with pytest.raises(ValueError, match="multiple of 16"):
        mv_rasterize(rec, 40, 48)


# ------------------------------------------------------------------------------------------------ residual (2)

def test_residual_of_clean_pan_is_zero(tmp_path):
    """An integer-pel pan of a clean low-frequency texture: MC(F_{t-1}, MV_t) predicts F_t (MPEG-4 Part 2)."""
    v = (2.0, -1.0)
    frames = np.stack([_u8(_shift(_SMOOTH, 70 - v[0] * t, 70 - v[1] * t)) for t in range(24)])
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(np.diff(luma, axis=0)[:, 8:-8, 8:-8]).mean() > 2.0   # the content does move
    path = encode_clip(frames, tmp_path / "pan.avi")
    clip = decode_compressed(path, residual_scale=1)
    assert clip.residual.shape == (22, 1, S, S) and clip.residual.dtype == np.int8
    np.testing.assert_allclose(clip.mv[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3)) * MV_UNIT, v, atol=1e-3)
    inner = np.abs(clip.residual[:, :, 8:-8, 8:-8].astype(np.float32))   # the entering border is new content
    assert inner.mean() < 0.1 and inner.max() <= 3, (inner.mean(), inner.max())   # measured 0.007, max 2
    # default: half size; RGB variant
    half = decode_compressed(path)
    assert half.residual.shape == (22, 1, S // 2, S // 2)
    rgb = decode_compressed(path, residual="rgb", mv_mask=True)
    assert rgb.residual.shape == (22, 3, S // 2, S // 2) and rgb.mv.shape == (22, 3, S // 16, S // 16)
    assert np.abs(rgb.residual[:, :, 4:-4, 4:-4].astype(np.float32)).mean() < 1.0
    np.testing.assert_array_equal(rgb.mv[:, :2], half.mv)
    assert rgb.iframes.shape == (2, 3, S, S) and rgb.iframes.dtype == np.uint8
    assert list(half.gop_index) == [0] * 11 + [1] * 11 and half.fps == 25.0 and half.size == (S, S)


# ------------------------------------------------------------------------------- synthetic set: determinism (3)

def test_synth_determinism():
    a, la = sm.make_clip(0, "train", 5)
    b, lb = sm.make_clip(0, "train", 5)
    assert a.shape == (36, 96, 96, 3) and a.dtype == np.uint8
    assert la == lb == 5 and np.array_equal(a, b)
    assert not np.array_equal(a, sm.make_clip(0, "train", 13)[0])   # same class, another scene
    assert not np.array_equal(a, sm.make_clip(1, "train", 5)[0])    # another seed
    assert not np.array_equal(a, sm.make_clip(0, "val", 5)[0])      # another split


# --------------------------------------------------------------------------- synthetic set: rest phase (4)

def test_synth_iframes_identical_across_classes(tmp_path):
    clips = [sm.make_clip(3, "test", 7, cls=c)[0] for c in range(len(sm.CLASSES))]
    for c in range(1, len(clips)):
        for t in (0, 12, 24):
            np.testing.assert_array_equal(clips[c][t], clips[0][t], err_msg=f"{sm.CLASSES[c]} frame {t}")
        for t in (3, 6, 9):
            if sm.CLASSES[c] not in ("osc_h", "osc_v", "pulse") or t != 6:   # sin(phi) = 0 at t = 6 too
                assert np.abs(clips[c][t].astype(int) - clips[0][t]).max() > 50, (sm.CLASSES[c], t)
    # through the codec: the decoded I-frames are identical, the motion vectors are not
    dec = [decode_compressed(encode_clip(clips[c], tmp_path / f"{c}.avi")) for c in (0, 3)]
    np.testing.assert_array_equal(dec[0].iframes, dec[1].iframes)
    assert dec[0].iframes.shape == (3, 3, 96, 96) and dec[0].mv.shape == (33, 2, 6, 6)
    assert np.abs(dec[1].mv).mean() > 2 * np.abs(dec[0].mv).mean()


# ---------------------------------------------------------------------------------------------- errors (5)

def test_b_frames_and_bad_size_raise(tmp_path):
    frames = sm.make_clip(0, "train", 1)[0][:16]
    path = tmp_path / "bframes.avi"
    with av.open(str(path), "w") as container:
        st = container.add_stream("mpeg4", rate=25)
        st.width, st.height, st.pix_fmt = 96, 96, "yuv420p"
        st.codec_context.max_b_frames = 2
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(p)
        for p in st.encode():
            container.mux(p)
    with pytest.raises(ValueError, match="B-frame") as e:
        decode_compressed(path)
    assert str(path) in str(e.value)

    odd = encode_clip(frames[:, :40, :88], tmp_path / "odd.avi")
    with pytest.raises(ValueError, match="multiple of 16") as e:
        decode_compressed(odd)
    assert str(odd) in str(e.value)
    with pytest.raises(FileNotFoundError):
        decode_compressed(tmp_path / "missing.avi")

    ok = encode_clip(frames, tmp_path / "ok.avi", gop=8)     # GOPs of 8 + 8
    assert decode_compressed(ok).gop_lengths == [8, 8]
    with pytest.raises(ValueError, match="fewer than the 3"):
        decode_compressed(ok, max_gops=3)
    with pytest.raises(ValueError, match="expected every GOP to have 12"):
        decode_compressed(ok, gop=12)


def test_irregular_gops(tmp_path):
    """GOP k = the frames from the k-th I-frame to the next, whatever their lengths (here 12 + 5)."""
    frames = sm.make_clip(0, "train", 2)[0][:17]
    clip = decode_compressed(encode_clip(frames, tmp_path / "irr.avi", gop=12))
    assert clip.gop_lengths == [12, 5] and clip.mv.shape[0] == 15 and list(clip.gop_index).count(1) == 4
    assert decode_compressed(tmp_path / "irr.avi", max_gops=1).mv.shape[0] == 11


# ----------------------------------------------------------------------------------------- folder dataset (6)

def test_folder_dataset(tmp_path):
    for k, name in enumerate(("jump", "wave")):
        for i in range(2):
            frames, _ = sm.make_clip(0, "val", 8 * i + 2 * k + 1)
            encode_clip(frames, tmp_path / name / f"clip{i}.{'avi' if i == 0 else 'mp4'}",
                        codec="mpeg4" if i == 0 else "libx264")
    (tmp_path / "jump" / "notes.txt").write_text("not a video")
    ds = sm.folder_dataset(tmp_path)
    assert ds.classes == ["jump", "wave"] and ds.labels.tolist() == [0, 0, 1, 1] and len(ds) == 4
    assert ds.iframes.shape == (4, 3, 3, 96, 96) and ds.iframes.dtype == torch.uint8
    assert ds.mv.shape == (4, 33, 2, 6, 6) and ds.residual.shape == (4, 33, 1, 48, 48)
    assert ds.residual.dtype == torch.int8 and ds.gop_index.tolist() == [0] * 11 + [1] * 11 + [2] * 11
    one = decode_compressed(tmp_path / "wave" / "clip0.avi")
    np.testing.assert_array_equal(ds.iframes[2].numpy(), one.iframes)
    np.testing.assert_array_equal(ds.residual[2].numpy(), one.residual)
    two = sm.folder_dataset(tmp_path, gops=2)
    assert two.mv.shape == (4, 22, 2, 6, 6) and torch.equal(two.iframes, ds.iframes[:, :2])
    # a clip with too few GOPs, a clip of another size
    encode_clip(sm.make_clip(0, "val", 3)[0][:24], tmp_path / "wave" / "short.avi")
    with pytest.raises(ValueError, match="short.avi has 2 GOP"):
        sm.folder_dataset(tmp_path)
    (tmp_path / "wave" / "short.avi").unlink()
    encode_clip(np.zeros((36, 64, 96, 3), np.uint8), tmp_path / "wave" / "small.avi")
    with pytest.raises(ValueError, match="re-encode all clips to one size"):
        sm.folder_dataset(tmp_path)


# ------------------------------------------------------------------------------------------ cached dataset (7)

def test_make_dataset_and_cache_reuse(tmp_path, capsys):
    root = tmp_path / "synth"
    paths = sm.make_dataset(root, seed=0, per_class=(2, 1, 1), workers=2)
    assert set(paths) == {"train", "val", "test"}
    stamp = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    tr = sm.load_split(root, "train")
    assert len(tr) == 16 and tr.labels.tolist() == [i % 8 for i in range(16)] and tr.classes == list(sm.CLASSES)
    assert tr.iframes.shape == (16, 3, 3, 96, 96) and tr.iframes.dtype == torch.uint8
    assert tr.mv.shape == (16, 33, 2, 6, 6) and tr.mv.dtype == torch.float16
    assert tr.residual.shape == (16, 33, 1, 48, 48) and tr.residual.dtype == torch.int8
    assert tr.gop_index.shape == (33,) and tr.meta["seed"] == 0
    assert (root / "train" / "osc_h" / "00009.avi").is_file()
    # the I-frames are the decoded rest-phase frames: the cached ones match a fresh decode of the file on disk
    np.testing.assert_array_equal(tr.iframes[9].numpy(), decode_compressed(root / "train" / "osc_h" /
                                                                           "00009.avi").iframes)
    # root/<split> is a folder dataset of the same clips
    va = sm.load_split(root, "val")
    fd = sm.folder_dataset(root / "val")
    assert fd.classes == sorted(sm.CLASSES)
    order = [fd.classes.index(c) for c in sm.CLASSES]
    assert torch.equal(fd.iframes[order], va.iframes) and torch.equal(fd.mv[order], va.mv)
    # reuse: nothing rebuilt
    capsys.readouterr()
    sm.make_dataset(root, seed=0, per_class=(2, 1, 1), workers=2)
    assert "up to date" in capsys.readouterr().out
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == stamp
    # another seed: rebuilt, different clips
    sm.make_dataset(root, seed=1, per_class=(2, 1, 1), workers=1, log=False)
    assert sm.load_split(root, "test").meta["seed"] == 1
    assert not torch.equal(sm.load_split(root, "train").iframes, tr.iframes)
    with pytest.raises(FileNotFoundError, match="make_dataset"):
        sm.load_split(tmp_path / "nowhere", "train")
