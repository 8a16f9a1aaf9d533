"""Motion-vector rasterisation and motion compensation of lrkern.data.compressed: the NumPy reference vs the C++
kernels (csrc/cpu/mv.cpp), per P-frame, on 96x96 and 224x224 frames with real FFmpeg records (a textured pan with a
moving patch, encoded with MPEG-4 Part 2 and with H.264), plus the whole loader (``decode_compressed``) per clip.
Single-threaded (torch.set_num_threads(1) and one decoder thread, as in a DataLoader worker); CPU time per call, the
best of ``--repeat`` runs. Prints only; records nothing.

    python bench/bench_mv.py [--repeat 7]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrkern.data import compressed as cd  # noqa: E402
from lrkern.data.synth_motion import _blur_noise  # noqa: E402


def _clip(S: int, n: int = 12) -> np.ndarray:
    """A textured background panning by (1.5, -0.75) px/frame with a patch moving by (-2.25, 1.25) px/frame."""
    rng = np.random.default_rng(S)
    bg = 128 + 40 * _blur_noise(rng, (S + 64, S + 64), 3.0)
    fg = 128 + 60 * _blur_noise(rng, (S // 2 + 2, S // 2 + 2), 1.5)

    def shift(img, ox, oy, h, w):
        ix, iy = int(math.floor(ox)), int(math.floor(oy))
        fx, fy = ox - ix, oy - iy
        c = img[iy:iy + h + 1, ix:ix + w + 1]
        return (1 - fy) * ((1 - fx) * c[:-1, :-1] + fx * c[:-1, 1:]) + fy * ((1 - fx) * c[1:, :-1] + fx * c[1:, 1:])

    out = []
    for t in range(n):
        f = shift(bg, 32 + 1.5 * t, 32 - 0.75 * t, S, S)
        px, py = int(S / 4 - 2.25 * t + 3 * n), int(S / 4 + 1.25 * t)
        px = min(max(px, 0), S - S // 2)
        f[py:py + S // 2, px:px + S // 2] = fg[:S // 2, :S // 2]
        out.append(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    return np.stack(out)


def _records(path: Path):
    """The motion-vector records and decoded frames (luma, RGB) of the stream's P-frames."""
    import av

    recs, luma, rgb = [], [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.options = {"flags2": "+export_mvs"}
        for fr in c.decode(s):
            sd = fr.side_data.get("MOTION_VECTORS")
            recs.append(sd.to_ndarray() if sd is not None else None)
            luma.append(fr.to_ndarray(format="gray"))
            rgb.append(fr.to_ndarray(format="rgb24"))
    return recs, luma, rgb


def _time(fn, repeat: int, number: int) -> float:
    """Best over ``repeat`` runs of the mean CPU time (process_time: robust to other jobs on a shared machine; every
    timed call is single-threaded) of ``number`` calls, in microseconds."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        ts.append((time.process_time() - t0) / number)
    return float(np.min(ts)) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not cd._use_cpp("auto"):
        print("lrkern._C has no motion-vector kernels; build it first")
        return 1
    print(f"{'frame':>9} {'codec':>7} {'blocks':>6} {'op (CPU time per call)':<26} {'numpy us':>10} {'cpp us':>9} "
          f"{'speedup':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for S in (96, 224):
            frames = _clip(S)
            for codec, ext in (("mpeg4", "avi"), ("libx264", "mp4")):
                path = cd.encode_clip(frames, Path(tmp) / f"{S}.{ext}", codec=codec, gop=12)
                recs, luma, rgb = _records(path)
                t = max(range(1, len(recs)), key=lambda i: 0 if recs[i] is None else len(recs[i]))
                rec, nb = recs[t], (0 if recs[t] is None else len(recs[t]))
                number = max(1, int(2e4 / S))
                cases = [("mv_rasterize", lambda impl: cd.mv_rasterize(rec, S, S, impl=impl)),
                         ("mv_rasterize mask", lambda impl: cd.mv_rasterize(rec, S, S, mask=True, impl=impl)),
                         ("motion_compensate luma u8", lambda impl: cd.motion_compensate(luma[t - 1], rec, impl=impl)),
                         ("motion_compensate rgb u8", lambda impl: cd.motion_compensate(rgb[t - 1], rec, impl=impl))]
                for name, fn in cases:
                    a, b = fn("numpy"), fn("cpp")
                    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), name
                    tn = _time(lambda: fn("numpy"), args.repeat, number)
                    tc = _time(lambda: fn("cpp"), args.repeat, number)
                    print(f"{S:>4}x{S:<4} {codec:>7} {nb:>6} {name:<26} {tn:>10.1f} {tc:>9.1f} {tn / tc:>7.1f}x")
                tn = _time(lambda: cd.decode_compressed(path, threads=1, impl="numpy"), 3, 1)
                tc = _time(lambda: cd.decode_compressed(path, threads=1, impl="cpp"), 3, 1)
                print(f"{S:>4}x{S:<4} {codec:>7} {'':>6} {'decode_compressed 12 fr':<26} {tn:>10.0f} {tc:>9.0f} "
                      f"{tn / tc:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
