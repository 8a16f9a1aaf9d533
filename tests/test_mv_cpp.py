"""The C++ motion-vector kernels (csrc/cpu/mv.cpp) against the NumPy reference of lrkern.data.compressed: random
FFmpeg-style records (block sizes 16x16 to 4x4, half-, quarter- and odd-pel scales, vectors far outside the frame,
blocks partly outside it, overlapping blocks, future-reference and intra blocks, no records), uint8 luma / RGB and
float frames. Every output must be bit-identical (compared as raw bits, so even the sign of a zero counts). Then the
whole loader on real MPEG-4 Part 2 and H.264 clips with impl forced to numpy vs cpp. CPU only, a few seconds."""
import numpy as np
import pytest

from lrkern import _ext
from lrkern.data import compressed as cd
from lrkern.data.compressed import motion_compensate, mv_rasterize

pytestmark = pytest.mark.skipif(not (_ext.cpp() is not None and hasattr(_ext.cpp(), "motion_compensate_out")),
                                reason=f"lrkern._C without the motion-vector kernels ({_ext.load_error()})")

_DT = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"), ("dst_x", "<i2"),
       ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]
_BLOCKS = [(16, 16), (8, 8), (16, 8), (8, 16), (4, 4), (8, 4), (4, 8)]


def _bits_equal(a, b):
    """Same dtype, shape and bits (assert_array_equal would accept -0.0 == 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    ua = a.view(np.uint32) if a.dtype == np.float32 else a
    ub = b.view(np.uint32) if b.dtype == np.float32 else b
    if not np.array_equal(ua, ub):
        bad = np.argwhere(ua != ub)
        i = tuple(bad[0])
        raise AssertionError(f"{len(bad)} values differ, first at {i}: {a[i]!r} vs {b[i]!r}")


def _random_records(rng, H, W, n, scales=(2, 4), blocks=_BLOCKS, max_px=24.0, outside=True, future=True):
    """n FFmpeg-style records: a random block size, the block's top-left on the 4-px grid (partly outside the frame
    when ``outside``), a vector of up to ``max_px`` px in each direction (some far outside the frame), a random
    scale, a few future references (ignored by the reference) and repeated positions (the later record wins)."""
    r = np.zeros(n, _DT)
    for i in range(n):
        bw, bh = blocks[rng.integers(len(blocks))]
        lo = -bw if outside else 0
        x0 = 4 * rng.integers(lo // 4, (W - (0 if outside else bw)) // 4 + 1)
        y0 = 4 * rng.integers((-bh if outside else 0) // 4, (H - (0 if outside else bh)) // 4 + 1)
        sc = int(scales[rng.integers(len(scales))])
        s = max(sc, 1)
        if rng.random() < 0.1:                                 # far outside the frame
            mx, my = (int(v) for v in rng.integers(-3 * max(H, W) * s, 3 * max(H, W) * s, 2))
        else:
            mx, my = (int(v) for v in rng.integers(-int(max_px * s), int(max_px * s) + 1, 2))
        src = -1 if not future or rng.random() < 0.9 else 1
        dx, dy = x0 + bw // 2, y0 + bh // 2
        r[i] = (src, bw, bh, dx + mx // s, dy + my // s, dx, dy, 0, mx, my, sc)
    return r


def _frames(rng, H, W):
    luma = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    f32 = (rng.standard_normal((H, W, 3)) * 50).astype(np.float32)
    f32[0, :5] = -0.0                                          # signed zeros survive a co-located copy
    return {"luma": luma, "rgb": rgb, "float32": f32}


def _check(records, H, W, rng):
    for mask in (False, True):
        _bits_equal(mv_rasterize(records, H, W, mask, impl="cpp"), mv_rasterize(records, H, W, mask, impl="numpy"))
    for prev in _frames(rng, H, W).values():
        _bits_equal(motion_compensate(prev, records, impl="cpp"), motion_compensate(prev, records, impl="numpy"))


@pytest.mark.parametrize("H,W", [(32, 48), (96, 96), (48, 224)])
@pytest.mark.parametrize("scales", [(2,), (4,), (1, 2, 4, 0)], ids=["half-pel", "quarter-pel", "mixed"])
def test_random_records_bit_exact(H, W, scales):
    rng = np.random.default_rng(H * 1000 + W + 7 * len(scales))
    for n in (1, 5, (H // 8) * (W // 8)):                     # sparse (mostly intra) to dense and overlapping
        _check(_random_records(rng, H, W, n, scales), H, W, rng)


@pytest.mark.parametrize("bw,bh", [(16, 16), (8, 8), (16, 8), (4, 4)])
def test_tiling_per_block_size(bw, bh):
    """A full tiling by one block size (an encoder's partition), every block with its own vector; about 10% intra."""
    H, W = 64, 80
    rng = np.random.default_rng(bw * 100 + bh)
    keep = []
    for y0 in range(0, H, bh):
        for x0 in range(0, W, bw):
            if rng.random() < 0.9:
                keep.append((x0, y0))
    for sc in (2, 4):
        r = np.zeros(len(keep), _DT)
        for i, (x0, y0) in enumerate(keep):
            mx, my = (int(v) for v in rng.integers(-12 * sc, 12 * sc + 1, 2))
            r[i] = (-1, bw, bh, 0, 0, x0 + bw // 2, y0 + bh // 2, 0, mx, my, sc)
        _check(r, H, W, rng)


def test_non_dyadic_scale_and_large_vectors():
    """A scale of 3 makes d = -m / 3 inexact in fp32, so the 16-value cell sums round: the C++ sums in the order
    NumPy's mean does (row-major from +0) and still matches bit for bit; sub-pixel sources far outside clamp."""
    H, W = 48, 64
    rng = np.random.default_rng(3)
    _check(_random_records(rng, H, W, 200, scales=(3, 5, 7), max_px=40), H, W, rng)


def test_no_records_and_all_ignored():
    H, W = 32, 32
    rng = np.random.default_rng(0)
    future = _random_records(rng, H, W, 6)
    future["source"] = 1
    for rec in (None, np.zeros(0, _DT), future):
        _check(rec, H, W, rng)
        prev = _frames(rng, H, W)["rgb"]
        np.testing.assert_array_equal(motion_compensate(prev, rec, impl="cpp"), prev.astype(np.float32))
        assert not mv_rasterize(rec, H, W, mask=True, impl="cpp").any()


def test_other_input_layouts_and_dtypes():
    """Non-contiguous, read-only, int16 / float64 / bool frames and a single-channel 3-D frame: the C++ path
    converts exactly as the reference's ``prev.astype(np.float32)``."""
    H, W = 32, 48
    rng = np.random.default_rng(5)
    rec = _random_records(rng, H, W, 30, scales=(2, 4))
    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ro = base.copy()
    ro.flags.writeable = False
    cases = [base[..., 1], base.transpose(1, 0, 2).transpose(1, 0, 2)[:, :, ::-1], ro, base.astype(np.int16) - 100,
             rng.standard_normal((H, W)) * 1e3, base[..., :1], base > 100, base.astype(">f4")]
    for prev in cases:
        _bits_equal(motion_compensate(prev, rec, impl="cpp"), motion_compensate(prev, rec, impl="numpy"))


def test_impl_selection_and_errors(monkeypatch):
    H, W = 32, 48
    rec = _random_records(np.random.default_rng(1), H, W, 8)
    with pytest.raises(ValueError, match="impl must be"):
        mv_rasterize(rec, H, W, impl="torch")
    # the same errors, with the same messages, from both paths
    bad = rec.copy()
    bad["w"][0], bad["source"][0] = 6, -1
    msgs = []
    for impl in ("numpy", "cpp"):
        with pytest.raises(ValueError, match="not multiples of 4 px") as e:
            mv_rasterize(bad, H, W, impl=impl)
        msgs.append(str(e.value).splitlines()[0])
        with pytest.raises(ValueError, match="not multiples of 4 px"):
            motion_compensate(np.zeros((H, W), np.uint8), bad, impl=impl)
        with pytest.raises(ValueError, match="multiple of 16"):
            mv_rasterize(rec, 40, 48, impl=impl)
        with pytest.raises(ValueError, match="prev must be"):
            motion_compensate(np.zeros((2, H, W, 3)), rec, impl=impl)
    assert msgs[0] == msgs[1], msgs
    # "numpy" (argument or module flag) never touches the extension; "auto" uses it
    from lrkern.ops import _cpp

    calls = []
    real = _cpp.mv_displacement
    monkeypatch.setattr(_cpp, "mv_displacement", lambda *a: calls.append(1) or real(*a))
    mv_rasterize(rec, H, W, impl="numpy")
    monkeypatch.setattr(cd, "MV_IMPL", "numpy")
    mv_rasterize(rec, H, W)
    motion_compensate(np.zeros((H, W), np.uint8), rec)
    assert calls == []
    monkeypatch.setattr(cd, "MV_IMPL", "auto")
    mv_rasterize(rec, H, W)
    assert calls == [1]


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_decode_compressed_numpy_vs_cpp(tmp_path, codec):
    """The loader end to end on a real stream (MPEG-4 Part 2: 16x16 half-pel; H.264: partitions down to 4x4,
    quarter-pel): identical tensors with impl forced to numpy and to cpp."""
    pytest.importorskip("av")
    from lrkern.data import synth_motion as sm

    frames = sm.make_clip(3, "val", 3)[0][:16]                 # 96x96, an orbiting shape over a drifting background
    path = cd.encode_clip(frames, tmp_path / f"c.{'avi' if codec == 'mpeg4' else 'mp4'}", codec=codec, gop=8)
    for kw in (dict(), dict(residual="rgb", mv_mask=True, residual_scale=1)):
        a = cd.decode_compressed(path, impl="numpy", **kw)
        b = cd.decode_compressed(path, impl="cpp", **kw)
        assert a.mv.shape[0] == 14 and np.abs(a.mv).max() > 0 and np.abs(a.residual).max() > 0
        for name in ("iframes", "mv", "residual", "gop_index"):
            _bits_equal(getattr(b, name), getattr(a, name))
        assert a.pict_types == b.pict_types
