"""Compressed-domain video tensors through PyAV (spec ``spiking_video.md`` 3.3): I-frames, P-frame motion vectors and
P-frame residuals of a real MPEG-4 Part 2 or H.264 stream, plus ``encode_clip`` to write such a stream.

FFmpeg exports motion vectors only from a decoding pass (``flags2=+export_mvs``) and never exports residuals, so every
frame is decoded; this reproduces the model's inputs, not a compressed-domain decoder's savings.

What FFmpeg gives (PyAV 18.1, FFmpeg 8): on a P-frame, ``frame.side_data.get('MOTION_VECTORS').to_ndarray()`` is a
structured array with one record per inter-predicted block: ``w, h`` (block size: 16 for MPEG-4 Part 2 without 4MV,
4 to 16 for H.264), ``dst_x, dst_y`` (the block centre in this frame), ``motion_x, motion_y, motion_scale`` (the
vector in 1/``motion_scale`` pixels: 2 = half-pel for MPEG-4 Part 2, 4 = quarter-pel for H.264; the source position is
``dst + motion / motion_scale``), ``src_x, src_y`` (that source rounded to integers) and ``source`` (< 0: a past
reference; only a direction, never which frame, so H.264 must be encoded with ``refs=1``). Intra blocks of a P-frame
have no record; I-frames have no side data at all.

The tensors (lrkern formulation, not the paper's, whose code is not public):

- **MV** ``[T, 2, H/16, W/16]`` float32: each block's displacement ``d = dst - src`` in pixels, the motion *from the
  previous frame to this one* (a block moving right by 2 px has ``d_x = +2``; x right, y down), painted onto a
  4x4-pixel grid, area-averaged into 16x16 cells and divided by 8 px. Blocks without a vector (intra) count as 0. With
  ``mv_mask=True`` a third channel holds the fraction of each cell covered by blocks that have a vector.
- **Residual** ``R_t = F_t - MC(F_{t-1}, MV_t)`` on the decoded luma plane (or RGB): each block of the previous
  decoded frame is sampled bilinearly at its fractional source position, clamped at the frame edges (FFmpeg's edge
  extension); a pixel of a block without a vector copies the co-located pixel. For MPEG-4 Part 2 this is the codec's
  own prediction up to the half-pel rounding (``(a + b + 1 - rounding) >> 1`` vs the exact average); for H.264 it is
  an approximation (6-tap quarter-pel filter, deblocking, weighted prediction are not modelled). Average-pooled by
  ``residual_scale`` (2 by default), rounded, clamped to +-127, stored as int8.

With ``accumulate="coviar"`` (the CoViAR ablation of spec 3.2; Wu et al., "Compressed Video Action Recognition",
CVPR 2018) both are accumulated back to the GOP's I-frame instead, at full resolution before pooling
(``accumulate_coviar``): per pixel p of P-frame t, with ``q = p - d_t(p)`` its source in frame t - 1,

    D_t(p) = D_{t-1}(q) + d_t(p),    R_t(p) = R_{t-1}(q) + r_t(p),    D = R = 0 on the I-frame,

so ``D_t(p)`` is the displacement from the I-frame all the way to frame t along p's reference chain. ``D_{t-1}`` and
``R_{t-1}`` are sampled **bilinearly** at the fractional q, with q clamped to the frame, exactly like the motion
compensation above (for integer-pel vectors this is the plain pixel lookup of a chain trace); with this choice
``F_t - R_t`` is the I-frame warped step by step through the same bilinear predictions, a convex combination of
I-frame pixels, so the accumulated residual stays within +-255 (per plane). Blocks without a vector count as zero
motion, as in the motion compensation. Then ``D_t`` is area-averaged into 16x16 cells and divided by 8 px (the MV
tensor's units), and ``R_t`` is average-pooled by ``residual_scale`` and rounded, but **not clamped**: it is stored as
int16 (the per-frame residual is int8 clamped to +-127); a value outside int16 raises. The optional mask channel
stays the per-frame validity of the P-frame's own vectors.

``mv_rasterize`` and ``motion_compensate`` (and the loader) run the C++ kernels of ``lrkern._C`` (``csrc/cpu/mv.cpp``,
spec section 4 item 4) when the extension is built, else the pure NumPy code here, which stays the reference; the C++
outputs are bit-identical to it. ``impl="numpy"`` (or the module flag ``MV_IMPL``) forces the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lrkern import _ext

PathLike = Union[str, os.PathLike]

PICT_I, PICT_P, PICT_B = 1, 2, 3  # av.video.frame.PictureType values (a plain int in PyAV 18)
MV_CELL = 16      # output grid cell (one macroblock)
MV_UNIT = 8.0     # MV tensor = mean displacement in px / MV_UNIT
_SUB = 4          # painting grid: every block size of MPEG-4 Part 2 and H.264 is a multiple of 4 px
_PLANAR_8BIT = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "gray"}

# MV record fields this module reads (the dtype of FFmpeg's AVMotionVector as PyAV exposes it).
MV_FIELDS = ("source", "w", "h", "dst_x", "dst_y", "motion_x", "motion_y", "motion_scale")

# Which implementation mv_rasterize / motion_compensate / decode_compressed use when their ``impl`` is None:
# "auto" (the C++ kernels when lrkern._C is built, else NumPy), "numpy" (the reference) or "cpp" (error if not built).
MV_IMPL = "auto"
_IMPLS = ("auto", "numpy", "cpp")
ACCUMULATE = (None, "coviar")  # decode_compressed(accumulate=...): per-frame, or accumulated to the I-frame (CoViAR)


@dataclass
class CompressedClip:
    """The compressed-domain tensors of one clip (NumPy arrays).

    - ``iframes`` uint8 ``[K, 3, H, W]``: the decoded I-frames in RGB, one per GOP.
    - ``mv`` float32 ``[T, 2 | 3, H/16, W/16]``: per P-frame motion (see the module docstring; x then y, then the
      optional validity channel).
    - ``residual`` int8 ``[T, 1 | 3, H/r, W/r]``: per P-frame motion-compensation residual (luma or RGB); int16 when
      accumulated (``accumulate="coviar"``: ``mv`` and ``residual`` hold the values accumulated to the I-frame).
    - ``gop_index`` int64 ``[T]``: the GOP (0..K-1) each P-frame belongs to.
    - ``pict_types``: the picture type of every kept frame in decoding order (1 = I, 2 = P).
    - ``fps``: the stream's average frame rate; ``size``: ``(H, W)``; ``path``: the file; ``accumulate``: None or
      ``"coviar"`` (see ``decode_compressed``).
    """

    iframes: np.ndarray
    mv: np.ndarray
    residual: np.ndarray
    gop_index: np.ndarray
    pict_types: list[int] = field(default_factory=list)
    fps: float = 0.0
    size: tuple[int, int] = (0, 0)
    path: str = ""
    accumulate: Optional[str] = None

    @property
    def num_gops(self) -> int:
        return int(self.iframes.shape[0])

    @property
    def gop_lengths(self) -> list[int]:
        """Frames per GOP (I-frame included)."""
        return [1 + int((self.gop_index == k).sum()) for k in range(self.num_gops)]


# --------------------------------------------------------------------------------------------------------------------
# Pure NumPy: motion-vector records -> grids, motion compensation
# --------------------------------------------------------------------------------------------------------------------

def _check_size(H: int, W: int, what: str = "frame") -> None:
    if H <= 0 or W <= 0 or H % MV_CELL or W % MV_CELL:
        raise ValueError(f"{what} size {H}x{W} (HxW) is not a multiple of {MV_CELL}; lrkern never crops silently: "
                         f"re-encode it, e.g. ffmpeg -i IN -vf \"crop=floor(iw/16)*16:floor(ih/16)*16\" "
                         f"-c:v mpeg4 -q:v 2 -bf 0 -g 12 OUT.avi")


def displacement_grid(records: Optional[np.ndarray], H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint the records onto a 4x4-pixel grid.

    Args:
        records: the structured array of ``frame.side_data.get('MOTION_VECTORS').to_ndarray()`` (fields
            ``MV_FIELDS``), or None / empty (no inter block).
        H, W: frame size, multiples of 16.

    Returns:
        ``(d, valid)``: ``d`` float32 ``[H/4, W/4, 2]`` the displacement ``dst - src`` in pixels (x, y) of the block
        covering each 4x4 cell, 0 where none; ``valid`` bool ``[H/4, W/4]``. Records with a future reference
        (``source > 0``, B-frames only) are ignored; where blocks overlap the later record wins.
    """
    _check_size(H, W)
    gh, gw = H // _SUB, W // _SUB
    d = np.zeros((gh, gw, 2), np.float32)
    valid = np.zeros((gh, gw), bool)
    if records is None or len(records) == 0:
        return d, valid
    r = records[records["source"] < 0]
    if len(r) == 0:
        return d, valid
    bw = r["w"].astype(np.int64)
    bh = r["h"].astype(np.int64)
    if np.any(bw % _SUB) or np.any(bh % _SUB) or np.any(bw <= 0) or np.any(bh <= 0):
        raise ValueError(f"motion-vector block sizes {sorted(set(bw.tolist()))}x{sorted(set(bh.tolist()))} are not "
                         f"multiples of {_SUB} px; only MPEG-4 Part 2 and H.264 streams are supported")
    scale = r["motion_scale"].astype(np.float32)
    scale[scale == 0] = 1.0
    # d = dst - src = -motion / motion_scale
    dx = -r["motion_x"].astype(np.float32) / scale
    dy = -r["motion_y"].astype(np.float32) / scale
    cx0 = (r["dst_x"].astype(np.int64) - bw // 2) // _SUB  # first 4x4 cell of each block
    cy0 = (r["dst_y"].astype(np.int64) - bh // 2) // _SUB
    nx, ny = bw // _SUB, bh // _SUB
    n = nx * ny
    blk = np.repeat(np.arange(len(r)), n)                  # block of every painted cell
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # cell index inside its block
    cx = cx0[blk] + k % nx[blk]
    cy = cy0[blk] + k // nx[blk]
    inside = (cx >= 0) & (cx < gw) & (cy >= 0) & (cy < gh)
    cx, cy, blk = cx[inside], cy[inside], blk[inside]
    d[cy, cx, 0] = dx[blk]
    d[cy, cx, 1] = dy[blk]
    valid[cy, cx] = True
    return d, valid


def _rasterize_grid(d: np.ndarray, valid: np.ndarray, mask: bool) -> np.ndarray:
    gh, gw = valid.shape
    f = MV_CELL // _SUB
    h, w = gh // f, gw // f
    mv = d.reshape(h, f, w, f, 2).mean(axis=(1, 3)).transpose(2, 0, 1) / MV_UNIT
    if mask:
        m = valid.reshape(h, f, w, f).mean(axis=(1, 3))[None]
        mv = np.concatenate([mv, m], 0)
    return np.ascontiguousarray(mv, dtype=np.float32)


def mv_rasterize(records: Optional[np.ndarray], H: int, W: int, mask: bool = False,
                 impl: Optional[str] = None) -> np.ndarray:
    """The MV tensor of one P-frame (lrkern formulation, spec 3.3).

    Args:
        records: FFmpeg motion-vector records (see ``displacement_grid``), or None.
        H, W: frame size (multiples of 16).
        mask: add a third channel, the fraction of each 16x16 cell covered by blocks with a vector.
        impl: ``"auto"`` (C++ when built), ``"numpy"`` (the reference) or ``"cpp"``; None: the module's ``MV_IMPL``.

    Returns:
        float32 ``[2 | 3, H/16, W/16]``: the area-averaged displacement ``dst - src`` (x, y) in units of 8 px.
    """
    cpp = _use_cpp(impl)
    d, valid = _grids(records, H, W, cpp)
    return _rasterize(d, valid, mask, cpp)


def _compensate_grid(prev: np.ndarray, d: np.ndarray) -> np.ndarray:
    H, W = prev.shape[:2]
    f = _SUB
    # source = pixel - d, one vector per 4x4 cell
    mx = np.repeat(np.repeat(-d[..., 0], f, 0), f, 1)
    my = np.repeat(np.repeat(-d[..., 1], f, 0), f, 1)
    sx = np.clip(np.arange(W, dtype=np.float32)[None, :] + mx, 0, W - 1)
    sy = np.clip(np.arange(H, dtype=np.float32)[:, None] + my, 0, H - 1)
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = sx - x0
    fy = sy - y0
    x1 = np.minimum(x0 + 1, W - 1)
    y1 = np.minimum(y0 + 1, H - 1)
    p = prev.astype(np.float32)
    if p.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = p[y0, x0] * (1 - fx) + p[y0, x1] * fx
    bot = p[y1, x0] * (1 - fx) + p[y1, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def motion_compensate(prev: np.ndarray, records: Optional[np.ndarray], impl: Optional[str] = None) -> np.ndarray:
    """Predict a P-frame from the previous decoded frame and its motion-vector records.

    Args:
        prev: the previous decoded frame, ``[H, W]`` (luma) or ``[H, W, C]``, any numeric dtype; H, W multiples of 16.
        records: FFmpeg motion-vector records of the current frame (see ``displacement_grid``), or None.
        impl: ``"auto"`` (C++ when built), ``"numpy"`` (the reference) or ``"cpp"``; None: the module's ``MV_IMPL``.

    Returns:
        float32 of ``prev``'s shape: every block sampled bilinearly at its fractional source position
        (``pixel + motion / motion_scale``) with coordinates clamped to the frame (edge extension); pixels of blocks
        without a vector copy the co-located pixel of ``prev``.
    """
    prev = np.asarray(prev)
    if prev.ndim not in (2, 3):
        raise ValueError(f"prev must be [H, W] or [H, W, C], got shape {prev.shape}")
    cpp = _use_cpp(impl)
    d, _ = _grids(records, prev.shape[0], prev.shape[1], cpp)
    return _compensate(prev, d, cpp)


# C++ dispatch: the same three stages (paint, pool, compensate) through lrkern._C. The records travel as one int32
# [N, 8] table (MV_FIELDS columns); d and valid stay torch tensors between the stages.

def _use_cpp(impl: Optional[str]) -> bool:
    impl = MV_IMPL if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "numpy":
        return False
    ok = _ext.cpp() is not None and hasattr(_ext.cpp(), "motion_compensate_out")
    if impl == "cpp" and not ok:
        raise RuntimeError("impl='cpp' but the C++ extension lrkern._C (with the motion-vector kernels) is not built "
                           f"({_ext.load_error() or 'a build without csrc/cpu/mv.cpp'}); build it with `pip install -e "
                           ". --no-build-isolation`, or use impl='numpy'")
    return ok


def _record_table(records: Optional[np.ndarray]):
    import torch

    n = 0 if records is None else len(records)
    t = np.empty((n, len(MV_FIELDS)), np.int32)
    for k, name in enumerate(MV_FIELDS):
        if n:
            t[:, k] = records[name]
    return torch.from_numpy(t)


def _grids(records: Optional[np.ndarray], H: int, W: int, cpp: bool):
    """``displacement_grid`` (NumPy arrays) or its C++ twin (torch tensors)."""
    if not cpp:
        return displacement_grid(records, H, W)
    from lrkern.ops import _cpp

    _check_size(H, W)
    return _cpp.mv_displacement(_record_table(records), H, W)


def _rasterize(d, valid, mask: bool, cpp: bool) -> np.ndarray:
    if not cpp:
        return _rasterize_grid(d, valid, mask)
    from lrkern.ops import _cpp

    return _cpp.mv_pool(d, valid, mask).numpy()


def _compensate(prev: np.ndarray, d, cpp: bool) -> np.ndarray:
    if not cpp:
        return _compensate_grid(prev, d)
    import torch

    from lrkern.ops import _cpp

    p = prev if prev.ndim == 3 else prev[..., None]
    if p.dtype != np.uint8 and p.dtype != np.float32:
        p = p.astype(np.float32)      # what the reference does first (also a non-native byte order)
    if not (p.flags.c_contiguous and p.flags.writeable):
        p = np.array(p, order="C")
    return _cpp.motion_compensate(torch.from_numpy(p), d).numpy().reshape(prev.shape)


def _pool_residual(r: np.ndarray, scale: int, wide: bool = False) -> np.ndarray:
    """``r`` float ``[H, W, C]`` -> int8 ``[C, H/scale, W/scale]`` (average pool, round, clamp +-127); ``wide``: int16
    without clamping (the accumulated residual), OverflowError outside the int16 range."""
    H, W, C = r.shape
    if scale > 1:
        r = r.reshape(H // scale, scale, W // scale, scale, C).mean(axis=(1, 3))
    if not wide:
        return np.clip(np.rint(r), -127, 127).astype(np.int8).transpose(2, 0, 1)
    r = np.rint(r)
    lim = np.iinfo(np.int16)
    if r.size and (r.min() < lim.min or r.max() > lim.max):
        raise OverflowError(f"accumulated residual range [{r.min():.0f}, {r.max():.0f}] does not fit int16")
    return r.astype(np.int16).transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------------------------------
# CoViAR accumulation (module docstring): motion and residual traced back to the GOP's I-frame, at full resolution
# --------------------------------------------------------------------------------------------------------------------

def _bilinear_at(field: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """float32 ``field [H, W, C]`` sampled bilinearly at ``(sx, sy)`` ``[H, W]`` (already clamped to the frame)."""
    H, W = field.shape[:2]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    x1 = np.minimum(x0 + 1, W - 1)
    y1 = np.minimum(y0 + 1, H - 1)
    top = field[y0, x0] * (1 - fx) + field[y0, x1] * fx
    bot = field[y1, x0] * (1 - fx) + field[y1, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def coviar_step(D_prev: Optional[np.ndarray], R_prev: Optional[np.ndarray], d: np.ndarray,
                r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One P-frame of ``accumulate_coviar``: ``(D_t, R_t)`` from ``(D_{t-1}, R_{t-1})`` (None: the I-frame, zeros),
    this frame's per-pixel displacement ``d`` float ``[H, W, 2]`` (``dst - src`` in px, x then y) and residual ``r``
    float ``[H, W, C]``. ``D_{t-1}`` and ``R_{t-1}`` are sampled bilinearly at ``p - d(p)``, clamped to the frame."""
    d = np.asarray(d, np.float32)
    r = np.asarray(r, np.float32)
    if D_prev is None:  # accumulated to the I-frame: nothing before this frame
        return d.copy(), r.copy()
    H, W = d.shape[:2]
    sx = np.clip(np.arange(W, dtype=np.float32)[None, :] - d[..., 0], 0, W - 1)
    sy = np.clip(np.arange(H, dtype=np.float32)[:, None] - d[..., 1], 0, H - 1)
    return _bilinear_at(D_prev, sx, sy) + d, _bilinear_at(R_prev, sx, sy) + r


def accumulate_coviar(d: np.ndarray, r: np.ndarray, gop_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CoViAR accumulation of full-resolution per-frame motion and residuals (module docstring).

    Args:
        d: float ``[T, H, W, 2]``: each P-frame's per-pixel displacement ``dst - src`` in pixels (x, y), the motion from
            the previous frame (0 where a block has no vector).
        r: float ``[T, H, W, C]``: each P-frame's residual.
        gop_index: int ``[T]``: the GOP of each P-frame; the accumulation restarts wherever it changes (the first
            P-frame after an I-frame), so ``D_t = d_t`` and ``R_t = r_t`` there.

    Returns:
        ``(D, R)`` float32 of the shapes of ``d`` and ``r``: the displacement from the GOP's I-frame to frame t along
        each pixel's reference chain, and the residual accumulated along it.
    """
    d, r, gi = np.asarray(d), np.asarray(r), np.asarray(gop_index)
    if d.ndim != 4 or d.shape[-1] != 2:
        raise ValueError(f"d must be [T, H, W, 2] (per-pixel displacement in px), got shape {d.shape}")
    if r.ndim != 4 or r.shape[:3] != d.shape[:3]:
        raise ValueError(f"r must be [T, H, W, C] with d's T, H, W = {d.shape[:3]}, got shape {r.shape}")
    if gi.shape != d.shape[:1]:
        raise ValueError(f"gop_index must be [T] = [{d.shape[0]}], got shape {gi.shape}")
    D = np.empty(d.shape, np.float32)
    R = np.empty(r.shape, np.float32)
    for t in range(d.shape[0]):
        fresh = t == 0 or gi[t] != gi[t - 1]
        D[t], R[t] = coviar_step(None if fresh else D[t - 1], None if fresh else R[t - 1], d[t], r[t])
    return D, R


def _pixel_field(d) -> np.ndarray:
    """The 4x4-cell displacement grid ``[H/4, W/4, 2]`` (NumPy or the C++ path's tensor) -> per pixel ``[H, W, 2]``."""
    d = d.numpy() if hasattr(d, "numpy") else np.asarray(d)
    return np.repeat(np.repeat(d, _SUB, 0), _SUB, 1)


def _pool_displacement(D: np.ndarray, valid, mask: bool) -> np.ndarray:
    """Per-pixel displacement ``[H, W, 2]`` in px -> the MV tensor ``[2 | 3, H/16, W/16]`` (area mean / MV_UNIT); the
    mask channel is the cover of ``valid`` (the 4x4-cell grid), as ``mv_rasterize``'s."""
    H, W = D.shape[:2]
    h, w = H // MV_CELL, W // MV_CELL
    mv = D.reshape(h, MV_CELL, w, MV_CELL, 2).mean(axis=(1, 3), dtype=np.float64).transpose(2, 0, 1) / MV_UNIT
    if mask:
        v = valid.numpy() if hasattr(valid, "numpy") else np.asarray(valid)
        f = MV_CELL // _SUB
        mv = np.concatenate([mv, v.reshape(h, f, w, f).mean(axis=(1, 3))[None]], 0)
    return np.ascontiguousarray(mv, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------------
# PyAV decoding / encoding
# --------------------------------------------------------------------------------------------------------------------

def _luma(frame) -> np.ndarray:
    """The decoded luma plane ``[H, W]`` uint8 (the codec's own samples for 8-bit planar YUV, else a conversion)."""
    if frame.format.name in _PLANAR_8BIT:
        plane = frame.planes[0]
        a = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        return a[:frame.height, :frame.width]
    return frame.to_ndarray(format="gray")


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a listed requirement
        raise ImportError("lrkern.data.compressed needs PyAV: pip install av (its wheels bundle FFmpeg)") from e
    return av


def decode_compressed(path: PathLike, gop: Optional[int] = None, residual: str = "luma", residual_scale: int = 2,
                      mv_mask: bool = False, max_gops: Optional[int] = None,
                      threads: Optional[int] = None, impl: Optional[str] = None,
                      accumulate: Optional[str] = None) -> CompressedClip:
    """Decode a video file into compressed-domain tensors (see the module docstring for the formulation).

    GOP k is every frame from the k-th I-frame up to (not including) the next one, so irregular GOP structures work;
    T = sum over GOPs of (GOP length - 1).

    Args:
        path: an MPEG-4 Part 2 or H.264 file without B-frames (any container FFmpeg reads).
        gop: if given, the expected GOP length: every kept GOP must have exactly ``gop`` frames, else ValueError.
        residual: ``"luma"`` (``[T, 1, ...]``, on the decoded Y plane) or ``"rgb"`` (``[T, 3, ...]``).
        residual_scale: average-pooling factor of the residual (2: half size; 1: full size); must divide 16.
        mv_mask: add the validity channel to ``mv``.
        max_gops: keep only the first ``max_gops`` GOPs (decoding stops at the next I-frame); ValueError if the file
            has fewer.
        threads: decoder threads (None: FFmpeg's default; 1 is fastest for small clips in worker processes).
        impl: MV / motion-compensation implementation, as in ``mv_rasterize`` (None: the module's ``MV_IMPL``); the
            outputs are identical either way.
        accumulate: None (per-frame MVs and residuals) or ``"coviar"``: both accumulated back to the GOP's I-frame at
            full resolution before pooling (module docstring; ``accumulate_coviar``); the residual is then int16,
            unclamped.

    Raises:
        FileNotFoundError: no such file.
        ValueError (naming the file): a B-frame, a first frame that is not an I-frame, a size that is not a multiple
            of 16, fewer than ``max_gops`` GOPs, a GOP length other than ``gop``, or no video stream; (naming the
            argument) an unknown ``residual``, ``residual_scale``, ``max_gops`` or ``accumulate``.
    """
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    if residual not in ("luma", "rgb"):
        raise ValueError(f"residual must be 'luma' or 'rgb', got {residual!r}")
    if residual_scale < 1 or MV_CELL % residual_scale:
        raise ValueError(f"residual_scale must divide {MV_CELL}, got {residual_scale}")
    if max_gops is not None and max_gops < 1:
        raise ValueError(f"max_gops must be >= 1, got {max_gops}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be None or 'coviar', got {accumulate!r}")
    cpp = _use_cpp(impl)
    reencode = (f"re-encode it without B-frames, e.g. ffmpeg -i {path} -c:v mpeg4 -q:v 2 -bf 0 -g 12 OUT.avi "
                "(or -c:v libx264 -bf 0 -refs 1 -sc_threshold 0 -g 12 -keyint_min 12 OUT.mp4)")

    iframes: list[np.ndarray] = []
    mvs: list[np.ndarray] = []
    ress: list[np.ndarray] = []
    gop_index: list[int] = []
    pict_types: list[int] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        if threads is not None:
            stream.codec_context.thread_count = threads
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        H = W = None
        prev = None
        acc_d = acc_r = None  # CoViAR state: full-resolution D_{t-1}, R_{t-1} (None right after an I-frame)
        for frame in container.decode(stream):
            pt = int(frame.pict_type)
            if H is None:
                H, W = frame.height, frame.width
                _check_size(H, W, f"{path}: frame")
            if pt == PICT_B:
                raise ValueError(f"{path}: frame {len(pict_types)} is a B-frame; lrkern reads only I- and P-frames: "
                                 + reencode)
            if pt not in (PICT_I, PICT_P):
                raise ValueError(f"{path}: frame {len(pict_types)} has picture type {pt} (only I = 1 and P = 2 are "
                                 "supported): " + reencode)
            if pt == PICT_I:
                if max_gops is not None and len(iframes) == max_gops:
                    break
                iframes.append(frame.to_ndarray(format="rgb24").transpose(2, 0, 1))
                cur = _luma(frame) if residual == "luma" else None
                acc_d = acc_r = None
            else:
                if not iframes:
                    raise ValueError(f"{path}: the first decoded frame is a P-frame (the stream does not start with "
                                     "an I-frame); lrkern never drops frames silently: " + reencode)
                sd = frame.side_data.get("MOTION_VECTORS")
                rec = sd.to_ndarray() if sd is not None else None
                d, valid = _grids(rec, H, W, cpp)
                cur = _luma(frame) if residual == "luma" else frame.to_ndarray(format="rgb24")
                c = cur[..., None] if cur.ndim == 2 else cur
                p = prev[..., None] if prev.ndim == 2 else prev
                r = c.astype(np.float32) - _compensate(p, d, cpp)
                if accumulate is None:
                    mvs.append(_rasterize(d, valid, mv_mask, cpp))
                    ress.append(_pool_residual(r, residual_scale))
                else:
                    acc_d, acc_r = coviar_step(acc_d, acc_r, _pixel_field(d), r)
                    mvs.append(_pool_displacement(acc_d, valid, mv_mask))
                    ress.append(_pool_residual(acc_r, residual_scale, wide=True))
                gop_index.append(len(iframes) - 1)
            if cur is None:  # an I-frame in RGB residual mode
                cur = iframes[-1].transpose(1, 2, 0)
            prev = np.array(cur)  # own copy: the frame's buffer is reused by the decoder
            pict_types.append(pt)
    if not pict_types:
        raise ValueError(f"{path}: no frame could be decoded")
    K = len(iframes)
    if max_gops is not None and K < max_gops:
        raise ValueError(f"{path} has {K} GOP(s) (I-frames at frames "
                         f"{[i for i, t in enumerate(pict_types) if t == PICT_I]}), fewer than the {max_gops} asked "
                         f"for; use a longer clip or re-encode it with a shorter GOP, e.g. ffmpeg -i {path} -c:v mpeg4 "
                         f"-q:v 2 -bf 0 -g 12 OUT.avi")
    gi = np.asarray(gop_index, np.int64)
    if gop is not None:
        lengths = [1 + int((gi == k).sum()) for k in range(K)]
        if any(n != gop for n in lengths):
            raise ValueError(f"{path}: GOP lengths {lengths}, expected every GOP to have {gop} frames; re-encode with "
                             f"a fixed GOP, e.g. ffmpeg -i {path} -c:v mpeg4 -q:v 2 -bf 0 -g {gop} OUT.avi")
    C = 1 if residual == "luma" else 3
    h, w = H // MV_CELL, W // MV_CELL
    rdtype = np.int8 if accumulate is None else np.int16
    return CompressedClip(
        iframes=np.stack(iframes).astype(np.uint8),
        mv=np.stack(mvs) if mvs else np.zeros((0, 3 if mv_mask else 2, h, w), np.float32),
        residual=np.stack(ress) if ress else np.zeros((0, C, H // residual_scale, W // residual_scale), rdtype),
        gop_index=gi, pict_types=pict_types, fps=fps, size=(H, W), path=str(path), accumulate=accumulate)


def encode_clip(frames: np.ndarray, path: PathLike, codec: str = "mpeg4", gop: int = 12, fps: int = 25,
                quality: Optional[int] = None, bitrate: Optional[int] = None, threads: int = 1) -> Path:
    """Encode RGB frames into a real I/P-only stream with PyAV.

    Args:
        frames: uint8 ``[N, H, W, 3]`` (H, W even; ``decode_compressed`` needs multiples of 16).
        path: output file; the container follows the extension (``.avi`` for mpeg4, ``.mp4``/``.mkv`` for H.264).
        codec: ``"mpeg4"`` (MPEG-4 Part 2, half-pel, 16x16 vectors, ``max_b_frames=0``) or ``"libx264"`` (H.264,
            quarter-pel; ``bf=0``, ``refs=1``, scene-cut detection off, ``keyint = min-keyint = gop``).
        gop: GOP length (an I-frame every ``gop`` frames).
        fps: frame rate.
        quality: mpeg4: fixed quantiser ``qscale`` 1..31 (default 2, near-lossless I-frames); libx264: ``crf``
            (default 12). Ignored when ``bitrate`` is given.
        bitrate: target bit rate in bit/s instead of a fixed quality.
        threads: encoder threads (1: deterministic output and no oversubscription in worker processes).

    Returns:
        ``Path(path)``.
    """
    av = _import_av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    N, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"frame size {H}x{W} must be even (yuv420p)")
    if codec not in ("mpeg4", "libx264"):
        raise ValueError(f"codec must be 'mpeg4' or 'libx264', got {codec!r}")
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        cc = stream.codec_context
        cc.gop_size = gop
        cc.thread_count = threads
        if codec == "mpeg4":
            cc.max_b_frames = 0
            if bitrate is not None:
                cc.bit_rate = int(bitrate)
            else:
                # A fixed quantiser: qmin = qmax = q. (The qscale flag with global_quality would need every input
                # frame's quality set, which PyAV does not expose; without it the encoder falls back to qmin.)
                q = 2 if quality is None else int(quality)
                if not 1 <= q <= 31:
                    raise ValueError(f"mpeg4 quality (qscale) must be in 1..31, got {q}")
                cc.qmin = cc.qmax = q
        else:
            opts = {"bf": "0", "refs": "1", "sc_threshold": "0", "keyint_min": str(gop),
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:ref=1"}
            if bitrate is not None:
                cc.bit_rate = int(bitrate)
            else:
                opts["crf"] = str(12 if quality is None else int(quality))
            cc.options = opts
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
