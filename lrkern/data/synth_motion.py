"""The deterministic synthetic action set of spec ``spiking_video.md`` section 6, encoded with a real codec.

Every clip is 96x96 RGB at 25 fps, K = 3 GOPs of G = 12 frames (36 frames, T = 33 P-frames). The scene of clip
``index`` of ``split`` depends only on ``(seed, split, index)``, never on its class:

- a textured low-frequency background (two blurred-noise octaves), larger than the frame (136x136) so the camera can
  pan across it; 1-2 static distractor shapes drawn into it;
- class-independent camera drift: a constant velocity of 0-1 px/frame in a random direction, rendered sub-pixel
  smoothly (integer crop + bilinear shift of the background; the foreground is positioned analytically);
- one foreground shape (square, disc, triangle or cross; 24-40 px) with a random colour (at least 40 luma levels away
  from the background's mean), position, size and orientation, a slight shading gradient and an off-centre marker dot
  of a contrasting colour, so that a spinning disc is visible;
- pixel noise, sigma 3/255 (i.i.d. Gaussian per frame and channel), then rounding to uint8.

All shapes are rasterised with analytic anti-aliasing (coverage = clamp(0.5 - signed distance, 0, 1), a one-pixel
ramp across each edge), so sub-pixel motion is smooth.

The eight classes differ **only** in the foreground's motion. Each has period G and is at rest phase on every I-frame
(frames 0, 12, 24), with phase ``phi = 2 pi (t mod G) / G``:

| class | motion |
|---|---|
| static | none |
| osc_h / osc_v | offset ``A sin(phi)`` along x / y, A in [8, 12] px |
| orbit_cw / orbit_ccw | the centre moves on a circle of radius R in [8, 12] px through the rest position |
| spin_cw / spin_ccw | the shape turns a full turn per period (clockwise on screen = increasing angle, y down) |
| pulse | size times ``1 + 0.35 sin(phi)`` (grows, shrinks back, shrinks further, back) |

All random motion parameters are drawn for every clip whatever its class, so the I-frames of one scene are identical
across classes and an I-frame-only model cannot beat chance (12.5%) except through leakage.

``make_dataset`` renders, encodes (``lrkern.data.compressed.encode_clip``; default MPEG-4 Part 2, qscale 2) to
``root/<split>/<class>/<index>.avi`` (``.mp4`` for libx264), decodes with ``decode_compressed`` and caches each split in
``root/<split>.pt`` (uint8 I-frames, float16 MVs, int8 half-size luma residuals, int64 labels; about 164 KB per clip,
367 MB for the default 200/40/40 per class). A cache is reused when its metadata (seed, counts, codec, quality,
``GENERATOR_VERSION``) matches. ``root/<split>`` is itself a folder dataset: ``folder_dataset(root / "train")`` gives
the same tensors. ``make_dataset(..., accumulate="coviar")`` also decodes the split's video files with MVs and residuals
accumulated back to the I-frame (``decode_compressed(accumulate="coviar")``; int16 residuals) into
``root/<split>-coviar.pt``, which ``load_split(root, split, accumulate="coviar")`` reads.

Measured on the 2-core CPU machine (2 workers, other jobs running): the default set (2240 clips) takes 131 s to
generate (train 88 s, val 21 s, test 21 s; about 55 ms per clip per core: render 27 ms, encode + decode 28 ms), the
caches take 350 MiB and the video files 106 MiB, and ``load_split`` reads all three splits in 2.4 s. Sanity check on it:
a linear classifier on the raw MV tensors reaches 78% test accuracy, one on 8x8-pooled I-frames 11.6% (chance 12.5%).
"""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from lrkern.data.compressed import ACCUMULATE, decode_compressed, encode_clip

PathLike = Union[str, os.PathLike]

# Bump whenever the rendered clips, the codec settings or the cached layout change: it is part of the cache metadata.
GENERATOR_VERSION = "synth_motion-v1"

CLASSES = ("static", "osc_h", "osc_v", "orbit_cw", "orbit_ccw", "spin_cw", "spin_ccw", "pulse")
SHAPES = ("square", "disc", "triangle", "cross")
SPLITS = ("train", "val", "test")
SIZE = 96             # frame height = width
GOP = 12              # G
GOPS = 3              # K
FRAMES = GOP * GOPS   # 36
FPS = 25
PAD = 20              # background margin on every side (camera travel is at most 35 px over the clip)
NOISE_SIGMA = 3.0     # in 0..255 units
PULSE = 0.35
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov")
_EXT = {"mpeg4": ".avi", "libx264": ".mp4"}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}


# --------------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------------

def shape_sdf(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of a shape of half-extent ``r`` in its local frame (u, v).

    square: side 2r; disc: radius r; triangle: equilateral, circumradius 1.15 r, a vertex on +u; cross: arms of
    half-length r and half-width 0.35 r. (Polygon distances are exact along edges, which is all the anti-aliasing
    ramp needs.)
    """
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - r
    if kind == "disc":
        return np.hypot(u, v) - r
    if kind == "triangle":
        R = 1.15 * r
        d = None
        for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3):
            e = -(u * math.cos(a) + v * math.sin(a)) - R / 2
            d = e if d is None else np.maximum(d, e)
        return d
    if kind == "cross":
        w = 0.35 * r
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    raise ValueError(f"unknown shape {kind!r}; one of {SHAPES}")


def draw_shape(img: np.ndarray, kind: str, cx: float, cy: float, size: float, angle: float, colour: Sequence[float],
               marker: Optional[Sequence[float]] = None, shading: float = 0.15) -> np.ndarray:
    """Composite an anti-aliased shape onto ``img`` (float32 ``[H, W, 3]``, modified in place and returned).

    Args:
        kind: one of ``SHAPES``.
        cx, cy: centre in pixels (pixel centres at integer coordinates; x right, y down); sub-pixel values are exact.
        size: the nominal extent 2r (square side, disc diameter).
        angle: orientation in radians (increasing = clockwise on screen, since y points down).
        colour: RGB in 0..255.
        marker: RGB of an off-centre dot at local (0.5 r, 0), radius 0.28 r, or None.
        shading: relative brightness gradient along the local u axis (+-shading).
    """
    H, W = img.shape[:2]
    r = size / 2
    ext = 1.2 * r + 2
    x0, x1 = max(int(math.floor(cx - ext)), 0), min(int(math.ceil(cx + ext)) + 1, W)
    y0, y1 = max(int(math.floor(cy - ext)), 0), min(int(math.ceil(cy + ext)) + 1, H)
    if x0 >= x1 or y0 >= y1:
        return img
    X = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    Y = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    c, s = math.cos(angle), math.sin(angle)
    u = c * X + s * Y
    v = -s * X + c * Y
    a = np.clip(0.5 - shape_sdf(kind, u, v, r), 0.0, 1.0)[..., None]
    col = np.asarray(colour, np.float32) * (1.0 + shading * np.clip(u / r, -1, 1))[..., None]
    if marker is not None:
        am = np.clip(0.5 - (np.hypot(u - 0.5 * r, v) - 0.28 * r), 0.0, 1.0)[..., None]
        col = col * (1 - am) + np.asarray(marker, np.float32) * am
    patch = img[y0:y1, x0:x1]
    patch *= 1 - a
    patch += a * col
    return img


# --------------------------------------------------------------------------------------------------------------------
# Scenes and motions
# --------------------------------------------------------------------------------------------------------------------

def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _blur_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (per channel, FFT, periodic), normalised to zero mean and unit std."""
    H, W = shape
    n = rng.standard_normal((3, H, W))
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.rfftfreq(W)[None, :]
    g = np.exp(-2 * (math.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    out = np.fft.irfft2(np.fft.rfft2(n) * g, s=(H, W))
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-8
    return out.transpose(1, 2, 0)


@dataclass
class Scene:
    """Everything about a clip except its class. Positions are in frame pixels at rest phase."""

    background: np.ndarray               # float32 [SIZE + 2 PAD, SIZE + 2 PAD, 3], distractors drawn in
    cam0: tuple[float, float]            # camera offset (x, y) into the background at frame 0
    cam_vel: tuple[float, float]         # camera drift in px/frame (the scene content moves by -cam_vel)
    shape: str
    centre: tuple[float, float]          # foreground centre (x, y) in the frame at frame 0, rest phase
    size: float
    angle: float
    colour: tuple[float, float, float]
    marker: tuple[float, float, float]
    osc_amp: float
    orbit_radius: float
    orbit_phase: float                   # angle of the rest position on the orbit circle
    noise: float = NOISE_SIGMA
    noise_seed: tuple[int, ...] = field(default_factory=tuple)


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """The scene of clip ``index`` of ``split``: a deterministic function of ``(seed, split, index)`` only."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([int(seed), _SPLIT_ID[split], int(index), 0])
    B = SIZE + 2 * PAD
    base = rng.uniform(60, 190, 3)
    tex = 0.8 * _blur_noise(rng, (B, B), 8.0) + 0.45 * _blur_noise(rng, (B, B), 2.5)
    bg = (base + 28.0 * tex).astype(np.float32)
    bg_luma = _luma(base)
    # 1-2 static distractors, anywhere in the background (they pan with it).
    for _ in range(int(rng.integers(1, 3))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        draw_shape(bg, kind, rng.uniform(10, B - 10), rng.uniform(10, B - 10), rng.uniform(12, 22),
                   rng.uniform(0, 2 * math.pi), rng.uniform(30, 225, 3), marker=None, shading=0.0)
    speed, heading = rng.uniform(0, 1), rng.uniform(0, 2 * math.pi)
    vel = (speed * math.cos(heading), speed * math.sin(heading))
    mid = (FRAMES - 1) / 2
    cam0 = (PAD - vel[0] * mid, PAD - vel[1] * mid)     # centred at mid-clip; stays in [0, 2 PAD - 1]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    size = rng.uniform(24, 40)
    angle = rng.uniform(0, 2 * math.pi)
    colour = rng.uniform(25, 230, 3)
    for _ in range(64):  # deterministic rejection: the shape must stand out from the background
        if abs(_luma(colour) - bg_luma) >= 40:
            break
        colour = rng.uniform(25, 230, 3)
    marker = 255.0 - colour
    if abs(_luma(marker) - _luma(colour)) < 60:
        marker = np.full(3, 20.0 if _luma(colour) > 128 else 235.0)
    # Foreground rest centre at mid-clip: near the middle, keeping the panned trajectory at least 22 px from the edges.
    margin = 22.0
    cmid = []
    for vv in vel:
        lo, hi = margin + abs(vv) * mid, SIZE - 1 - margin - abs(vv) * mid
        cmid.append(rng.uniform(lo, hi))
    centre = (cmid[0] + vel[0] * mid, cmid[1] + vel[1] * mid)  # frame-0 position (content moves by -vel)
    return Scene(background=bg, cam0=cam0, cam_vel=vel, shape=kind, centre=centre, size=float(size),
                 angle=float(angle), colour=tuple(float(c) for c in colour), marker=tuple(float(c) for c in marker),
                 osc_amp=float(rng.uniform(8, 12)), orbit_radius=float(rng.uniform(8, 12)),
                 orbit_phase=float(rng.uniform(0, 2 * math.pi)), noise=NOISE_SIGMA,
                 noise_seed=(int(seed), _SPLIT_ID[split], int(index), 1))


# A motion maps (scene, t) -> (dx, dy, dangle, scale) of the foreground relative to its rest pose.
Motion = Callable[[Scene, int], tuple[float, float, float, float]]


def class_motion(cls: Union[int, str]) -> Motion:
    """The motion of class ``cls`` (index into ``CLASSES`` or its name)."""
    name = CLASSES[cls] if isinstance(cls, (int, np.integer)) else cls
    if name not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; one of {CLASSES}")

    def motion(sc: Scene, t: int) -> tuple[float, float, float, float]:
        phi = 2 * math.pi * (t % GOP) / GOP
        if name == "osc_h":
            return sc.osc_amp * math.sin(phi), 0.0, 0.0, 1.0
        if name == "osc_v":
            return 0.0, sc.osc_amp * math.sin(phi), 0.0, 1.0
        if name in ("orbit_cw", "orbit_ccw"):
            sgn = 1.0 if name == "orbit_cw" else -1.0   # y down: increasing angle is clockwise on screen
            a0, R = sc.orbit_phase, sc.orbit_radius
            return (R * (math.cos(a0 + sgn * phi) - math.cos(a0)), R * (math.sin(a0 + sgn * phi) - math.sin(a0)),
                    0.0, 1.0)
        if name == "spin_cw":
            return 0.0, 0.0, phi, 1.0
        if name == "spin_ccw":
            return 0.0, 0.0, -phi, 1.0
        if name == "pulse":
            return 0.0, 0.0, 0.0, 1.0 + PULSE * math.sin(phi)
        return 0.0, 0.0, 0.0, 1.0

    return motion


def translation(vx: float, vy: float) -> Motion:
    """A constant-velocity translation of the foreground (px/frame; a diagnostic motion for tests, not a class)."""
    return lambda sc, t: (vx * t, vy * t, 0.0, 1.0)


def render_clip(scene: Scene, motion: Union[int, str, Motion], frames: int = FRAMES) -> np.ndarray:
    """Render uint8 ``[frames, SIZE, SIZE, 3]`` RGB frames of ``scene`` with the foreground ``motion`` (a class
    index / name, or a ``Motion`` callable)."""
    fn = motion if callable(motion) else class_motion(motion)
    bg = scene.background
    noise_rng = np.random.default_rng(list(scene.noise_seed) or [0])
    out = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    for t in range(frames):
        camx, camy = scene.cam0[0] + scene.cam_vel[0] * t, scene.cam0[1] + scene.cam_vel[1] * t
        ix, iy = int(math.floor(camx)), int(math.floor(camy))
        fx, fy = camx - ix, camy - iy
        crop = bg[iy:iy + SIZE + 1, ix:ix + SIZE + 1]
        if crop.shape[:2] != (SIZE + 1, SIZE + 1):
            raise ValueError(f"camera offset ({camx:.1f}, {camy:.1f}) leaves the background at frame {t}")
        img = ((1 - fy) * ((1 - fx) * crop[:-1, :-1] + fx * crop[:-1, 1:])
               + fy * ((1 - fx) * crop[1:, :-1] + fx * crop[1:, 1:])).astype(np.float32)
        dx, dy, da, sc = fn(scene, t)
        cx = scene.centre[0] - scene.cam_vel[0] * t + dx
        cy = scene.centre[1] - scene.cam_vel[1] * t + dy
        draw_shape(img, scene.shape, cx, cy, scene.size * sc, scene.angle + da, scene.colour, scene.marker)
        if scene.noise > 0:
            img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(scene.noise)
        np.clip(np.rint(img), 0, 255, out=img)
        out[t] = img
    return out


def make_clip(seed: int, split: str, index: int, cls: Optional[Union[int, str]] = None) -> tuple[np.ndarray, int]:
    """Frames uint8 ``[36, 96, 96, 3]`` and label of clip ``index`` of ``split`` (class ``index % 8`` unless ``cls``
    overrides it; the scene never depends on the class)."""
    label = index % len(CLASSES) if cls is None else (cls if isinstance(cls, (int, np.integer))
                                                       else CLASSES.index(cls))
    return render_clip(sample_scene(seed, split, index), int(label)), int(label)


# --------------------------------------------------------------------------------------------------------------------
# Tensors, cache, folders
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class VideoTensors:
    """A labelled set of compressed-domain clips (torch tensors).

    - ``iframes`` uint8 ``[N, K, 3, H, W]``; ``mv`` float16 ``[N, T, 2, H/16, W/16]`` (displacement / 8 px);
      ``residual`` int8 ``[N, T, 1, H/2, W/2]`` (int16 when accumulated); ``gop_index`` int64 ``[T]``; ``labels``
      int64 ``[N]``; ``classes``: the class names (``labels`` index them); ``meta``: how the set was made
      (``meta.get("accumulate")``: None, or ``"coviar"`` for MVs and residuals accumulated to the I-frame).
    """

    iframes: "torch.Tensor"  # noqa: F821
    mv: "torch.Tensor"  # noqa: F821
    residual: "torch.Tensor"  # noqa: F821
    gop_index: "torch.Tensor"  # noqa: F821
    labels: "torch.Tensor"  # noqa: F821
    classes: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_root() -> Path:
    """``$LRKERN_CACHE_DIR/synth_motion`` (default ``~/.cache/lrkern/synth_motion``)."""
    from lrkern.lance.training import default_cache_dir
    return default_cache_dir() / "synth_motion"


def _pool_map(fn, items: list, workers: int, label: str, log: bool = True) -> list:
    """``[fn(x) for x in items]`` over ``workers`` processes (fork on Linux: no ``__main__`` guard needed), in order,
    printing progress."""
    t0, n, out = time.perf_counter(), len(items), []
    step = max(1, n // 10)

    def report(i):
        if log and (i % step == 0 or i == n):
            dt = time.perf_counter() - t0
            print(f"  {label}: {i}/{n} clips, {dt:.0f} s elapsed, ~{dt / i * (n - i):.0f} s left", flush=True)

    if workers <= 1 or n <= 1:
        for i, x in enumerate(items, 1):
            out.append(fn(x))
            report(i)
        return out
    # fork (Linux) needs no ``if __name__ == "__main__"`` guard in the calling script. A forked child must never free
    # the parent's PyAV objects: FFmpeg's swscale contexts own threads that do not exist in the child, and a garbage
    # collection there deadlocks in sws_freeContext. So collect first and freeze every object the children inherit.
    fork = "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork:
        gc.collect()
        gc.freeze()
    try:
        pool = ctx.Pool(min(workers, n))  # the workers are forked here
    finally:
        if fork:
            gc.unfreeze()
    with pool:
        for i, r in enumerate(pool.imap(fn, items, chunksize=max(1, min(8, n // (4 * workers)))), 1):
            out.append(r)
            report(i)
    return out


def _stack(clips: list, labels: list[int], classes: list[str], meta: dict) -> VideoTensors:
    import torch
    gi = clips[0].gop_index
    return VideoTensors(
        iframes=torch.from_numpy(np.stack([c.iframes for c in clips])),
        mv=torch.from_numpy(np.stack([c.mv for c in clips]).astype(np.float16)),
        residual=torch.from_numpy(np.stack([c.residual for c in clips])),
        gop_index=torch.from_numpy(np.asarray(gi, np.int64)),
        labels=torch.tensor(labels, dtype=torch.int64), classes=list(classes), meta=meta)


def _synth_job(job: tuple):
    seed, split, index, codec, quality, path = job
    frames, _ = make_clip(seed, split, index)
    encode_clip(frames, path, codec=codec, gop=GOP, fps=FPS, quality=quality, threads=1)
    return decode_compressed(path, gop=GOP, max_gops=GOPS, threads=1)


def _accumulate_job(job: tuple):
    path, accumulate = job
    return decode_compressed(path, gop=GOP, max_gops=GOPS, threads=1, accumulate=accumulate)


def _check_accumulate(accumulate: Optional[str]) -> None:
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be None or 'coviar', got {accumulate!r}")


def _cache_path(root: Path, split: str, accumulate: Optional[str]) -> Path:
    return root / (f"{split}.pt" if accumulate is None else f"{split}-{accumulate}.pt")


def _save_split(path: Path, vt: VideoTensors) -> None:
    import torch
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"meta": vt.meta, "iframes": vt.iframes, "mv": vt.mv, "residual": vt.residual,
                "gop_index": vt.gop_index, "labels": vt.labels}, tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache behind


def _cache_meta(seed: int, split: str, count: int, codec: str, quality: Optional[int]) -> dict:
    return {"generator": GENERATOR_VERSION, "seed": int(seed), "split": split, "per_class": int(count),
            "codec": codec, "quality": quality, "size": SIZE, "gop": GOP, "gops": GOPS, "fps": FPS,
            "classes": list(CLASSES), "residual": "luma", "residual_scale": 2}


def _read_meta(path: Path) -> Optional[dict]:
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta")
    except Exception:  # unreadable or truncated cache: rebuild
        return None


def make_dataset(root: Optional[PathLike] = None, seed: int = 0, per_class: Sequence[int] = (200, 40, 40),
                 codec: str = "mpeg4", quality: Optional[int] = None, workers: Optional[int] = None,
                 log: bool = True, accumulate: Optional[str] = None) -> dict[str, Path]:
    """Generate, encode, decode and cache the synthetic action set (idempotent).

    Args:
        root: output folder (default ``default_root()``); use a separate root per codec.
        seed: the data seed; clip ``i`` of a split depends only on ``(seed, split, i)``.
        per_class: clips per class for train, val and test. Clip ``i`` has class ``i % 8``.
        codec: ``"mpeg4"`` (default) or ``"libx264"``.
        quality: encoder quality (``encode_clip``'s default: qscale 2 / crf 12).
        workers: processes (default: all CPUs).
        log: print progress and timings.
        accumulate: None, or ``"coviar"``: also decode every split's video files with MVs and residuals accumulated
            to the I-frame into ``root/<split>-coviar.pt`` (the per-frame cache is built first, as it owns the files).

    Returns:
        ``{split: root/<split>.pt}`` (``root/<split>-<accumulate>.pt`` with ``accumulate``). A split whose cache
        metadata matches is not rebuilt.
    """
    root = Path(root) if root is not None else default_root()
    _check_accumulate(accumulate)
    if codec not in _EXT:
        raise ValueError(f"codec must be one of {tuple(_EXT)}, got {codec!r}")
    if len(per_class) != len(SPLITS):
        raise ValueError(f"per_class must give {len(SPLITS)} counts (train, val, test), got {per_class}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in zip(SPLITS, per_class):
        path = root / f"{split}.pt"
        meta = _cache_meta(seed, split, count, codec, quality)
        out[split] = path
        n = count * len(CLASSES)
        ext = _EXT[codec]
        files = [root / split / CLASSES[i % len(CLASSES)] / f"{i:05d}{ext}" for i in range(n)]
        if path.is_file() and _read_meta(path) == meta:
            if log:
                print(f"synth_motion: {path} is up to date ({count} clips per class)", flush=True)
        else:
            _build_split(root, split, path, meta, seed, codec, quality, files, workers, log)
        if accumulate is not None:
            out[split] = _build_accumulated(root, split, path, meta, accumulate, files, workers, log)
    return out


def _build_split(root: Path, split: str, path: Path, meta: dict, seed: int, codec: str, quality: Optional[int],
                 files: list[Path], workers: int, log: bool) -> None:
    """Render, encode and decode the clips of ``split`` into ``files`` and the per-frame cache ``path``."""
    n = len(files)
    if log:
        print(f"synth_motion: building {split} ({n} clips, {codec}, seed {seed}, {workers} workers) in {root}",
              flush=True)
    t0 = time.perf_counter()
    jobs = [(seed, split, i, codec, quality, str(f)) for i, f in enumerate(files)]
    for c in CLASSES:  # drop this generator's old clips, so that root/<split> holds exactly this split
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for f in (root / split / c).iterdir():
            if f.suffix in _EXT.values() and f.stem.isdigit() and len(f.stem) == 5:
                f.unlink()
    clips = _pool_map(_synth_job, jobs, workers, split, log) if n else []
    if not clips:
        raise ValueError(f"per_class for {split} must be >= 1, got {meta['per_class']}")
    _save_split(path, _stack(clips, [i % len(CLASSES) for i in range(n)], list(CLASSES), meta))
    if log:
        print(f"synth_motion: {split} done in {time.perf_counter() - t0:.1f} s, "
              f"{path.stat().st_size / 2**20:.1f} MiB", flush=True)


def _build_accumulated(root: Path, split: str, base: Path, meta: dict, accumulate: str, files: list[Path],
                       workers: int, log: bool) -> Path:
    """Decode the video files of ``split`` (those of the per-frame cache ``base``) with ``accumulate`` into
    ``root/<split>-<accumulate>.pt``, unless that cache is up to date; returns its path."""
    path = _cache_path(root, split, accumulate)
    ameta = {**meta, "accumulate": accumulate}
    if path.is_file() and _read_meta(path) == ameta:
        if log:
            print(f"synth_motion: {path} is up to date", flush=True)
        return path
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} (and {len(missing) - 1} more) missing: the accumulate={accumulate!r} "
                                f"inputs are decoded from the video files of {base}; delete {base} and rerun "
                                "make_dataset to render them again")
    t0 = time.perf_counter()
    clips = _pool_map(_accumulate_job, [(str(f), accumulate) for f in files], workers, f"{split} ({accumulate})",
                      log)
    _save_split(path, _stack(clips, [i % len(CLASSES) for i in range(len(files))], list(CLASSES), ameta))
    if log:
        print(f"synth_motion: {split} ({accumulate}) done in {time.perf_counter() - t0:.1f} s, "
              f"{path.stat().st_size / 2**20:.1f} MiB", flush=True)
    return path


def load_split(root: Optional[PathLike] = None, split: str = "train",
               accumulate: Optional[str] = None) -> VideoTensors:
    """The cached tensors of ``split`` written by ``make_dataset`` (FileNotFoundError with the command otherwise);
    ``accumulate="coviar"``: the CoViAR-accumulated inputs (``make_dataset(..., accumulate="coviar")``)."""
    import torch
    _check_accumulate(accumulate)
    root = Path(root) if root is not None else default_root()
    path = _cache_path(root, split, accumulate)
    if not path.is_file():
        arg = "" if accumulate is None else f", accumulate={accumulate!r}"
        raise FileNotFoundError(f"{path} does not exist; build it with "
                                f"`python -c \"from lrkern.data.synth_motion import make_dataset; "
                                f"make_dataset('{root}'{arg})\"`")
    d = torch.load(path, map_location="cpu", weights_only=True)
    return VideoTensors(iframes=d["iframes"], mv=d["mv"], residual=d["residual"], gop_index=d["gop_index"],
                        labels=d["labels"], classes=list(d["meta"]["classes"]), meta=d["meta"])


def _folder_job(job: tuple):
    path, gop, gops, residual_scale, accumulate = job
    return decode_compressed(path, gop=gop, max_gops=gops, residual_scale=residual_scale, threads=1,
                             accumulate=accumulate)


def folder_dataset(root: PathLike, gops: int = GOPS, gop: Optional[int] = None, residual_scale: int = 2,
                   workers: int = 1, extensions: Sequence[str] = VIDEO_EXTENSIONS,
                   accumulate: Optional[str] = None) -> VideoTensors:
    """Any folder ``root/<label>/<video files>`` as ``VideoTensors`` (labels: the sorted folder names).

    Every clip is decoded with ``decode_compressed`` (with its ``accumulate``: None or ``"coviar"``) and cut to its
    first ``gops`` GOPs. All clips must share the frame size and the GOP length (``gop``, default: the first clip's
    first GOP length), so that they stack; otherwise a ValueError names the clip and how to re-encode it.
    """
    _check_accumulate(accumulate)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    exts = {e.lower() for e in extensions}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(str(f), k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.is_file() and f.suffix.lower() in exts]
    if not items:
        raise ValueError(f"no video files ({', '.join(sorted(exts))}) in {root}/<label>/")
    if gop is None:
        first = decode_compressed(items[0][0], max_gops=1, residual_scale=residual_scale, threads=1)
        gop = first.gop_lengths[0]
        # the first GOP of a single-GOP clip may be cut short by the file's end; the per-clip check reports it
    jobs = [(p, gop, gops, residual_scale, accumulate) for p, _ in items]
    clips = _pool_map(_folder_job, jobs, workers, root.name, log=False)
    size = clips[0].size
    for c in clips:
        if c.size != size:
            raise ValueError(f"{c.path} is {c.size[0]}x{c.size[1]} but {clips[0].path} is {size[0]}x{size[1]}; "
                             f"re-encode all clips to one size, e.g. ffmpeg -i IN -vf scale={size[1]}:{size[0]} "
                             f"-c:v mpeg4 -q:v 2 -bf 0 -g {gop} OUT.avi")
    meta = {"root": str(root), "gop": gop, "gops": gops, "residual": "luma", "residual_scale": residual_scale,
            "paths": [c.path for c in clips], "fps": clips[0].fps, "accumulate": accumulate}
    return _stack(clips, [k for _, k in items], classes, meta)
