"""Decode-attention benchmark: one query token per sequence over a filled 2-bit KV cache (``lrkern.decode_attention``)
against attention on an uncompressed cache and against dequantize-then-attend, all timed in the same run.

GPU (fp16; shapes Llama-3-8B Hq=32 Hkv=8 d=128 and SmolLM2-135M Hq=9 Hkv=3 d=64; B 1, 8, 32; T 1k to 64k):
  lrkern-kvlinc-2, lrkern-kivi-2   the Triton kernel on a kvlinc / kivi cache, 2 bits, group 128
  sdpa-fp16                        torch SDPA (enable_gqa, flash backend where it accepts the shape) on fp16 K, V
  flash-attn                       flash_attn_with_kvcache on the same K, V, when flash-attn imports
  dequant-sdpa                     transformers' QuantizedCache data flow: dequantize the kivi cache, append its
                                   window, SDPA; timed together
CPU (SmolLM2 shape, B 1, 4; T 1k, 4k, 8k; fp32 caches): lrkern-cpp-kvlinc-2 / -kivi-2 (the C++ kernel),
  reference-kvlinc-2 (T = 1k only), sdpa-fp32, sdpa-bf16, dequant-sdpa, and one kv.append + decode step
  (lrkern-cpp-kvlinc-2+append, B = 1, T = 8k).

    python bench/bench_decode.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lrkern
from bench.common import RESULTS, bench_backends, bench_ms

BENCH = "decode"
RESULTS_FILE = RESULTS / "decode_attention.jsonl"
BITS, GROUP, FEATURES = 2, 128, 64
PRESETS = ("kvlinc", "kivi")
# Error ratio rms(out - ref) / rms(ref) against lrkern's reference: lrkern kernels fed the same codes (fp16 and fp32
# caches alike), and baselines, which round inputs, probabilities and output in their own dtype (measured at T=100:
# fp16 5e-4, bf16 4e-3; the limits leave ~5x headroom).
KERNEL_TOL = 1e-3
BASELINE_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SANITY_B, SANITY_T = 2, 100  # T < GROUP: a KIVI cache then holds every token in its full-precision window
MEMORY_T = 8192
REFERENCE_T = 1024  # the CPU reference is timed at this T only: it dequantizes the whole cache to fp32 per call
APPEND_B, APPEND_T = 1, 8192
# The append line appends one token per call: room for this many, so no capacity growth (a full copy of the cache)
# lands inside the timed calls.
APPEND_HEADROOM = 4096
APPEND_CHUNK_BYTES = 256 * 2**20  # caches are filled in chunks of K of about this size: bounded temporaries
SCRATCH_BYTES = 2 * 2**30  # reference check, append temporaries, kernel workspaces
# Peak HBM bandwidth by device-name substring, most specific first (vendor data sheets).
PEAK_HBM = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))
KERNEL = "lrkern kernel"  # Report.unavailable's key for the device's decode kernel (Triton / C++)
SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Model:
    name: str
    hq: int
    hkv: int
    d: int


LLAMA3_8B = Model("Llama-3-8B", 32, 8, 128)
SMOLLM2 = Model("SmolLM2-135M", 9, 3, 64)


def grid(device: torch.device, quick: bool) -> Iterator[tuple[Model, int, int]]:
    """(model, B, T) of every case."""
    if device.type == "cuda":
        models, batches = (LLAMA3_8B, SMOLLM2), (8,) if quick else (1, 8, 32)
        lengths = (1024, 16384) if quick else (1024, 4096, 16384, 65536)
    else:
        models, batches = (SMOLLM2,), (1,) if quick else (1, 4)
        lengths = (1024, 8192) if quick else (1024, 4096, 8192)
    for model in models:
        for B in batches:
            for T in lengths:
                yield model, B, T


# ---------------------------------------------------------------------------------------------------- rows, report

@dataclass
class DecodeRow:
    """One provider timed on one case; one line of ``bench/results/decode_attention.jsonl``."""
    device: str
    provider: str
    B: int
    T: int
    Hq: int
    Hkv: int
    d: int
    bits: int  # bits per stored K/V element the provider reads (2, or the fp baseline's 16 / 32)
    ms: float  # median
    speedup_vs_sdpa_fp16: float | None  # time(sdpa-fp16) / time(row), same case (GPU); null on CPU
    speedup_vs_sdpa_fp32: float | None  # time(sdpa-fp32) / time(row), same case (CPU); null on GPU
    gbps: float | None  # bytes / median; null for the append line (it writes the cache too)
    p20: float
    p80: float
    reps: int  # timed repetitions (-1: do_bench's own count)
    bytes: int | None
    pct_peak: float | None  # gbps against the device's peak HBM bandwidth (GPU)
    model: str
    dtype: str  # the cache's (or the baseline's K, V) dtype
    err: float | None  # error ratio against lrkern's reference on the same cache (null: not checked)
    note: str
    meta: dict


@dataclass
class Report:
    device: torch.device
    peak: float | None  # bytes/s
    rows: list[DecodeRow] = field(default_factory=list)
    memory: list[tuple[Model, int, int]] = field(default_factory=list)  # (model, kvlinc-2 bytes, fp16 bytes)
    unavailable: dict[str, str] = field(default_factory=dict)  # KERNEL or "flash-attn" -> why it was not timed
    skipped: list[str] = field(default_factory=list)  # cases left out, with why
    errors: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return "sdpa-fp16" if self.device.type == "cuda" else "sdpa-fp32"


@dataclass
class Provider:
    """One decode step of one implementation, ready to call: inputs are built beforehand, outside the timing."""
    name: str
    fn: Callable[[], torch.Tensor]  # returns out [B, Hq, 1, d]
    dtype: torch.dtype  # the dtype it computes in (sets its tolerance as a baseline)
    bits: int
    nbytes: int | None
    kernel: bool  # an lrkern implementation: raising is an error; a baseline that raises is only skipped
    ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # held around the timed calls
    note: str = ""


class Case:
    """One (model, B, T): ``measure`` each provider, then ``finish`` adds the speed-ups against the baseline."""

    def __init__(self, model: Model, B: int, T: int, device: torch.device, peak: float | None, meta: dict, log):
        self.model, self.B, self.T, self.device, self.peak, self.meta, self.log = model, B, T, device, peak, meta, log
        self.rows: list[DecodeRow] = []
        self.errors: list[str] = []

    def label(self) -> str:
        return f"{self.model.name} B={self.B} T={self.T}"

    def measure(self, p: Provider, ref: torch.Tensor | None = None, tol: float = KERNEL_TOL) -> None:
        """Checks one output of ``p`` against ``ref`` (when given), then times it."""
        err = None
        try:
            with p.ctx():
                out = p.fn()
                if ref is not None:
                    err = error_ratio(out, ref)
                    if not err <= tol:  # NaN fails too
                        self.error(p.name, f"error ratio {err:.2e} > {tol:.0e} against the reference")
                ms, p20, p80, reps = bench_ms(p.fn, self.device)
        except Exception as exc:  # noqa: BLE001 -- one broken provider must not end the run
            why = describe(exc)
            if p.kernel:
                self.error(p.name, why)
            else:
                self.log(f"  skipped: {p.name} on {self.label()}: {why}")
            return
        gbps = p.nbytes / ms / 1e6 if p.nbytes is not None else None
        pct = gbps * 1e9 / self.peak if gbps is not None and self.peak else None
        m = self.model
        self.rows.append(DecodeRow(
            device=self.meta["device"], provider=p.name, B=self.B, T=self.T, Hq=m.hq, Hkv=m.hkv, d=m.d, bits=p.bits,
            ms=ms, speedup_vs_sdpa_fp16=None, speedup_vs_sdpa_fp32=None, gbps=gbps, p20=p20, p80=p80, reps=reps,
            bytes=p.nbytes, pct_peak=pct, model=m.name, dtype=SHORT_DTYPE[p.dtype], err=err, note=p.note,
            meta=self.meta))

    def error(self, provider: str, why: str) -> None:
        self.log(f"  error: {provider} on {self.label()}: {why}")
        self.errors.append(f"{provider} on {self.label()}: {why}")

    def finish(self, baseline: str) -> list[DecodeRow]:
        base = next((r.ms for r in self.rows if r.provider == baseline), None)
        key = "speedup_vs_sdpa_fp16" if baseline == "sdpa-fp16" else "speedup_vs_sdpa_fp32"
        for r in self.rows:
            setattr(r, key, base / r.ms if base is not None else None)
        return self.rows


def describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def error_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------- inputs

def build_cache(preset: str, k: torch.Tensor, v: torch.Tensor, psi) -> lrkern.QuantizedKV:
    """A ``preset`` cache holding k, v [B, Hkv, T, d] (capacity exactly T), filled in chunks so that the temporaries
    of append (copies, fp32 features) stay small next to a 64k-token cache."""
    B, H, T, d = k.shape
    kv = lrkern.QuantizedKV.preset(preset, B, H, d, dtype=k.dtype, device=k.device, psi=psi, capacity=T)
    chunk = max(GROUP, APPEND_CHUNK_BYTES // (B * H * d * k.element_size()) // GROUP * GROUP)
    for t0 in range(0, T, chunk):
        kv.append(k[:, :, t0:t0 + chunk], v[:, :, t0:t0 + chunk])
    return kv


def reference_out(q: torch.Tensor, kv: lrkern.QuantizedKV, phi) -> torch.Tensor:
    """lrkern's reference attention on the same cache (its codes, scales, window and correction state), a few batch
    rows per call: it dequantizes everything to fp32, which for a whole 64k-token batch would not fit."""
    c = kv.config
    args = list(kv.kernel_args()) + [phi(q).float() if phi is not None else None]
    # Per batch row the reference holds ~6 fp32 copies of K or V (dequantized, concatenated, masked); give it a
    # quarter of the scratch.
    per_row = 6 * 4 * c.num_kv_heads * (kv.k_codes.shape[2] + kv.k_win.shape[2]) * c.head_dim
    step = max(1, SCRATCH_BYTES // 4 // per_row)
    outs = []
    with lrkern.use_backend("reference"):
        for b in range(0, q.shape[0], step):
            rows = [a[b:b + step] if a is not None else None for a in args]
            outs.append(lrkern.kv_attention(q[b:b + step], *rows, c.bits, c.group_size, c.key_per_channel,
                                            c.cgroup, c.rotate_keys, c.value_rotation, 1.0 / math.sqrt(c.head_dim))[0])
    return torch.cat(outs)


def lrkern_bytes(q: torch.Tensor, kv: lrkern.QuantizedKV) -> int:
    """Bytes one decode step must move: the rows' codes, scales and zeros and window tokens, the correction state
    (S, z and phi(q)), q and out. Capacity past the rows' lengths is never read and not counted."""
    c = kv.config
    d, elt = c.head_dim, kv.k_win.element_size()
    nq, nw = sum(kv.n_quant_list), sum(kv.n_win_list)
    k_groups = nq // c.group_size * d if c.key_per_channel else nq * (d // c.cgroup)
    v_groups = nq * (d // c.cgroup)
    per_head = 2 * nq * d * c.bits // 8 + 2 * (k_groups + v_groups) * elt + 2 * nw * d * elt
    corr = 0
    if c.feature_dim:
        corr = 4 * (kv.corr_s.numel() + kv.corr_z.numel() + q.shape[0] * q.shape[1] * c.feature_dim)
    return c.num_kv_heads * per_head + corr + 2 * q.numel() * q.element_size()


def fp_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """An uncompressed cache's decode step: K and V, q and out."""
    return 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()


def too_big(need: int, device: torch.device) -> str | None:
    """Why ``need`` bytes do not fit in the GPU's free memory, or None. CPU cases (tens of MB) are not checked."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()  # blocks freed by the previous case count as free
    free = torch.cuda.mem_get_info(device)[0]
    return f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free" if need > free else None


def peak_hbm(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_HBM if key in name), None)


def kernel_unavailable(device: torch.device) -> str | None:
    """Why lrkern's decode kernel for ``device`` (Triton on CUDA, C++ on CPU) cannot be timed, or None."""
    backends, skipped = bench_backends(device)
    backend = "triton" if device.type == "cuda" else "cpp"
    if backend not in backends:
        return skipped[backend]
    if backend == "cpp":
        from lrkern import _ext
        from lrkern.ops import _cpp

        if not (hasattr(_cpp, "kv_attention") and hasattr(_ext.cpp(), "kv_attention_out")):
            return ("the C++ kv_attention kernel is not built (lrkern.ops._cpp.kv_attention or "
                    "lrkern._C.kv_attention_out is missing; rebuild with `python setup.py build_ext --inplace`)")
    return None


def flash_attn():
    """(flash_attn_with_kvcache, None), or (None, why not)."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a build against another torch
        return None, f"flash-attn does not import ({type(exc).__name__}: {exc})"
    return flash_attn_with_kvcache, None


# ---------------------------------------------------------------------------------------------------- providers

def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> SDPBackend:
    """The first SDPA backend that accepts these inputs: flash, else memory-efficient, else math."""
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")  # a declining backend warns with its reasons
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return backend
        except RuntimeError:
            continue
    return SDPBackend.MATH


def sdpa_provider(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Provider:
    backend = sdpa_backend(q, k, v)
    return Provider(f"sdpa-{SHORT_DTYPE[k.dtype]}", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                    k.dtype, 8 * k.element_size(), fp_bytes(q, k), False, lambda: sdpa_kernel([backend]),
                    f"sdpa backend: {backend.name.lower()}")


def flash_attn_provider(fa, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Provider:
    # flash-attn's layout is [B, T, H, d]; it takes strided caches (last dim contiguous), so K, V are not copied.
    qf, kf, vf = q.transpose(1, 2).contiguous(), k.transpose(1, 2), v.transpose(1, 2)
    return Provider("flash-attn", lambda: fa(qf, kf, vf).transpose(1, 2), k.dtype, 16, fp_bytes(q, k), False)


def dequantize_kivi(kv: lrkern.QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' QuantizedCache hands to attention: the quantized part dequantized in the cache dtype, then
    the full-precision window appended. KIVI preset: per-channel keys, per-token values, nothing rotated."""
    c = kv.config
    nq, nw = kv.n_quant_list[0], kv.n_win_list[0]  # every row of the benchmark's caches has the same length
    ng = nq // c.group_size
    k = lrkern.dequant(kv.k_codes[:, :, :nq], kv.k_scale[:, :, :ng], kv.k_zero[:, :, :ng], c.bits, c.group_size, -2)
    v = lrkern.dequant(kv.v_codes[:, :, :nq], kv.v_scale[:, :, :nq], kv.v_zero[:, :, :nq], c.bits, c.cgroup, -1)
    return torch.cat([k, kv.k_win[:, :, :nw]], dim=2), torch.cat([v, kv.v_win[:, :, :nw]], dim=2)


def dequant_sdpa_provider(q: torch.Tensor, kv: lrkern.QuantizedKV) -> Provider:
    backend = sdpa_backend(q, *dequantize_kivi(kv))
    fp_kv = 2 * kv.batch_size * kv.config.num_kv_heads * max(kv.lengths) * kv.config.head_dim * q.element_size()
    # The fp K, V are written once by dequant and read once by SDPA (the extra copy of the cat is not counted).
    return Provider("dequant-sdpa", lambda: F.scaled_dot_product_attention(q, *dequantize_kivi(kv), enable_gqa=True),
                    q.dtype, BITS, lrkern_bytes(q, kv) + 2 * fp_kv, False, lambda: sdpa_kernel([backend]),
                    f"lrkern.dequant + cat + sdpa ({backend.name.lower()})")


# ---------------------------------------------------------------------------------------------------- the benchmark

class DecodeBench:
    def __init__(self, device: torch.device, quick: bool, meta: dict, log):
        self.device, self.quick, self.meta, self.log = device, quick, meta, log
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.backend = "triton" if device.type == "cuda" else "cpp"
        self.report = Report(device, peak_hbm(device))
        self.kernel_why = kernel_unavailable(device)
        self.fa, fa_why = flash_attn() if device.type == "cuda" else (None, None)
        names = {KERNEL: f"{self.kernel_name('kvlinc')}, {self.kernel_name('kivi')}", "flash-attn": "flash-attn"}
        for key, why in ((KERNEL, self.kernel_why), ("flash-attn", fa_why)):
            if why:
                self.report.unavailable[key] = why
                log(f"  skipped: {names[key]}: {why}")

    def kernel_name(self, preset: str) -> str:
        return f"lrkern-{preset}-{BITS}" if self.device.type == "cuda" else f"lrkern-cpp-{preset}-{BITS}"

    def run(self) -> Report:
        peak = self.report.peak
        if self.device.type == "cuda":
            self.log(f"  peak HBM bandwidth used for % peak: {peak / 1e12:.2f} TB/s" if peak else
                     f"  peak HBM bandwidth of {self.meta['device']} unknown: % peak not reported")
        self.memory()
        for model in dict.fromkeys(m for m, _, _ in grid(self.device, self.quick)):
            self.sanity(model)
        for model, B, T in grid(self.device, self.quick):
            self.case(model, B, T)
        return self.report

    def memory(self) -> None:
        for model in (LLAMA3_8B, SMOLLM2):
            kv = lrkern.QuantizedKV.preset("kvlinc", 1, model.hkv, model.d, dtype=torch.float16, capacity=MEMORY_T)
            fp16 = 2 * model.hkv * MEMORY_T * model.d * 2
            self.report.memory.append((model, kv.nbytes, fp16))

    def inputs(self, model: Model, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        q = torch.randn(B, model.hq, 1, model.d, dtype=self.dtype, device=self.device)
        k = torch.randn(B, model.hkv, T, model.d, dtype=self.dtype, device=self.device)
        return q, k, torch.randn_like(k)

    def feature_maps(self, model: Model):
        """(phi, psi): untrained feature maps of the right shapes (the timing does not depend on their values)."""
        return tuple(lrkern.FeatureMap(h, model.d, FEATURES).to(self.device).requires_grad_(False)
                     for h in (model.hq, model.hkv))

    def kernel_provider(self, preset: str, q, kv, phi, backend: str | None = None) -> Provider:
        backend = backend or self.backend
        name = self.kernel_name(preset) if backend == self.backend else f"{backend}-{preset}-{BITS}"
        return Provider(name, lambda: lrkern.decode_attention(q, kv, phi=phi), q.dtype, BITS, lrkern_bytes(q, kv),
                        True, lambda: lrkern.use_backend(backend), f"backend {backend}")

    def baselines(self, q, k, v) -> list[Provider]:
        """Attention on the uncompressed cache in every dtype the device is compared in."""
        if self.device.type == "cuda":
            return [sdpa_provider(q, k, v)] + ([flash_attn_provider(self.fa, q, k, v)] if self.fa else [])
        half = [t.to(torch.bfloat16) for t in (q, k, v)]
        return [sdpa_provider(q, k, v), sdpa_provider(*half)]

    def sanity(self, model: Model) -> None:
        """The baselines (and the kernel) against lrkern's reference on a KIVI cache whose tokens all sit in the
        full-precision window (T < G): there the cache is exact, so a difference beyond the baseline's own rounding
        is a wrong call (GQA head mapping, scale, layout), not quantization."""
        q, k, v = self.inputs(model, SANITY_B, SANITY_T)
        kv = build_cache("kivi", k, v, None)
        ref = reference_out(q, kv, None)
        checks = [] if self.kernel_why else [self.kernel_provider("kivi", q, kv, None)]
        for p in checks + self.baselines(q, k, v):
            tol = KERNEL_TOL if p.kernel else BASELINE_TOL[p.dtype]
            line = f"{p.name} vs lrkern reference, {model.name} window-only KIVI cache T={SANITY_T}"
            try:
                with p.ctx():
                    err = error_ratio(p.fn(), ref)
            except Exception as exc:  # noqa: BLE001 -- a broken baseline is skipped (the timed run says so again)
                err, line = float("nan"), f"{line}: {describe(exc)}"
                if not p.kernel:
                    self.log(f"  skipped: sanity: {line}")
                    continue
            else:
                line = f"{line}: error ratio {err:.1e} (limit {tol:.0e})"
            if err <= tol:
                self.log(f"  sanity ok: {line}")
            else:
                self.log(f"  error: sanity: {line}")
                self.report.errors.append(f"sanity: {line}")

    def case(self, model: Model, B: int, T: int) -> None:
        case = Case(model, B, T, self.device, self.report.peak, self.meta, self.log)
        self.log(f"  {case.label()}")
        fp_kv = 2 * B * model.hkv * T * model.d * self.dtype.itemsize
        # Sized on the meta device: nothing is allocated before the case is known to fit.
        caches = sum(lrkern.QuantizedKV.preset(p, B, model.hkv, model.d, dtype=self.dtype, device="meta",
                                               capacity=T).nbytes for p in PRESETS)
        why = too_big(fp_kv + caches + SCRATCH_BYTES, self.device)
        if why:
            why += f" (fp K, V {fp_kv / 1e9:.1f} GB + 2-bit caches {caches / 1e9:.1f} GB + scratch)"
            self.log(f"  skipped: {case.label()}: {why}")
            self.report.skipped.append(f"{case.label()}: {why}")
            return
        q, k, v = self.inputs(model, B, T)
        phi, psi = self.feature_maps(model)
        kvs = {p: build_cache(p, k, v, psi if p == "kvlinc" else None) for p in PRESETS}
        refs = {p: reference_out(q, kv, phi if p == "kvlinc" else None) for p, kv in kvs.items()}
        if not self.kernel_why:
            for p, kv in kvs.items():
                case.measure(self.kernel_provider(p, q, kv, phi if p == "kvlinc" else None), refs[p])
        self.time_baselines(case, q, k, v)
        del k, v  # dequant-sdpa needs the room
        self.time_dequant_sdpa(case, q, kvs["kivi"], refs["kivi"], fp_kv)
        if self.device.type == "cpu":
            self.cpu_extras(case, q, kvs["kvlinc"], phi)
        self.report.rows += case.finish(self.report.baseline)
        self.report.errors += case.errors

    def time_baselines(self, case: Case, q, k, v) -> None:
        # A function of its own: the providers hold K and V, and must be gone when the caller frees them.
        for p in self.baselines(q, k, v):
            case.measure(p)

    def time_dequant_sdpa(self, case: Case, q, kv, ref, fp_kv: int) -> None:
        # The dequantized part and its cat with the window: twice the fp K, V at the peak.
        why = too_big(2 * fp_kv + SCRATCH_BYTES, self.device)
        if why:
            self.log(f"  skipped: dequant-sdpa on {case.label()}: {why}")
            return
        case.measure(dequant_sdpa_provider(q, kv), ref, BASELINE_TOL[q.dtype])

    def cpu_extras(self, case: Case, q, kv, phi) -> None:
        """The reference at one small T; one kv.append + decode step (the append is outside every other line)."""
        if case.T == REFERENCE_T:
            case.measure(self.kernel_provider("kvlinc", q, kv, phi, backend="reference"))
        if case.T == APPEND_T and case.B == APPEND_B and not self.kernel_why:
            case.measure(self.append_provider(q, kv, phi))

    def append_provider(self, q, kv, phi) -> Provider:
        """Appends one token, then decodes: the step a generating model runs. Every 128th call also quantizes a
        block and updates S, z (in the p80 tail, not the median). The cache grows by one token per call."""
        kv.reserve(max(kv.lengths) + APPEND_HEADROOM)
        shape = (kv.batch_size, kv.config.num_kv_heads, 1, kv.config.head_dim)
        k1, v1 = (torch.randn(shape, dtype=kv.dtype, device=kv.device) for _ in range(2))

        def step() -> torch.Tensor:
            kv.append(k1, v1)
            return lrkern.decode_attention(q, kv, phi=phi)

        return Provider(f"{self.kernel_name('kvlinc')}+append", step, q.dtype, BITS, None, True,
                        lambda: lrkern.use_backend(self.backend), "kv.append(1 token) + decode, cpp for both")


def run(device: torch.device, quick: bool, meta: dict, log=print) -> tuple[Report, list[str]]:
    """Returns (report, errors). Errors: an lrkern kernel failing or differing from the reference, a baseline
    differing from it on the sanity or dequant check."""
    report = DecodeBench(device, quick, meta, log).run()
    return report, report.errors


# ---------------------------------------------------------------------------------------------------- output

def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def table(report: Report) -> str:
    """The rows, one block per case, then the memory line; ``vs <baseline>`` = time(baseline) / time(row)."""
    gpu = report.device.type == "cuda"
    key = "speedup_vs_sdpa_fp16" if gpu else "speedup_vs_sdpa_fp32"
    header = ["model", "B", "T", "provider", "bits", "median ms", "p20-p80 ms", "GB/s"] + (["% peak"] if gpu else [])
    header += [f"vs {report.baseline}", "err", "note"]
    lines = []
    for r in report.rows:
        line = [r.model, str(r.B), str(r.T), r.provider, str(r.bits), f"{r.ms:.3f}", f"{r.p20:.3f}-{r.p80:.3f}",
                f"{r.gbps:.1f}" if r.gbps is not None else "-"]
        line += [f"{100 * r.pct_peak:.1f}%" if r.pct_peak is not None else "-"] if gpu else []
        line += [_ratio(getattr(r, key)), f"{r.err:.1e}" if r.err is not None else "-", r.note]
        lines.append(line)
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in (0, 3) or i == len(cells) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), "-" * len(fmt(header))]
    for i, (r, line) in enumerate(zip(report.rows, lines)):
        if i and (r.model, r.B, r.T) != (report.rows[i - 1].model, report.rows[i - 1].B, report.rows[i - 1].T):
            out.append("")
        out.append(fmt(line))
    out += [""] + [f"skipped: {s}" for s in report.skipped]
    for model, nbytes, fp16 in report.memory:
        out.append(f"memory: {model.name} kvlinc-2 cache, B=1 T={MEMORY_T} G={GROUP} (capacity {MEMORY_T}, fp16): "
                   f"{nbytes / 2**20:.2f} MiB vs fp16 K, V {fp16 / 2**20:.2f} MiB = {fp16 / nbytes:.2f}x smaller")
    return "\n".join(out)


def _worst(name: str, rows: list[DecodeRow], key: str, threshold: float, shown, why_none: str) -> str:
    values = [(getattr(r, key), r) for r in rows if getattr(r, key) is not None]
    if not values:
        return f"{name}: not measured ({why_none})"
    (v, r), (best, b) = min(values, key=lambda x: x[0]), max(values, key=lambda x: x[0])
    verdict = "met" if v >= threshold else "NOT MET"
    return (f"{name}: worst {shown(v)} at {r.model} B={r.B} T={r.T}, best {shown(best)} at {b.model} B={b.B} "
            f"T={b.T}, {len(values)} case(s) (target >= {shown(threshold)}) {verdict}")


def _gpu_targets(report: Report, rows: list[DecodeRow], why: str) -> list[str]:
    big = [r for r in rows if r.T >= 16384 and r.B >= 8]
    name = "GPU KVLinC-2 bytes read vs peak HBM at T >= 16k, B >= 8"
    if report.peak:
        bandwidth = _worst(f"{name} ({report.peak / 1e12:.2f} TB/s)", big, "pct_peak", 0.75,
                           lambda v: f"{100 * v:.0f}%", why)
    else:
        bandwidth = f"{name}: not measured (the peak bandwidth of this GPU is not in PEAK_HBM)"
    return [
        _worst("GPU KVLinC-2 vs SDPA fp16 at T >= 16k, B >= 8", big, "speedup_vs_sdpa_fp16", 4.0, _ratio, why),
        bandwidth,
        _worst("GPU KVLinC-2 never slower than SDPA fp16, T >= 1k", rows, "speedup_vs_sdpa_fp16", 1.0, _ratio, why),
        "CPU KVLinC-2 (cpp) >= 2x SDPA fp32 at T = 8k: not measured on this device (cuda)",
    ]


def _cpu_targets(rows: list[DecodeRow], why: str) -> list[str]:
    return [
        ("GPU KVLinC-2 >= 4x SDPA fp16 at T >= 16k, B >= 8; >= 75% of peak HBM; never slower than SDPA fp16: "
         "not measured on this device (cpu)"),
        _worst("CPU KVLinC-2 (cpp) vs SDPA fp32 at T = 8k", [r for r in rows if r.T == 8192], "speedup_vs_sdpa_fp32",
               2.0, _ratio, why),
    ]


def targets(report: Report) -> list[str]:
    """The decode targets, each met / NOT MET / not measured (with why)."""
    gpu = report.device.type == "cuda"
    kernel = "lrkern-kvlinc-2" if gpu else "lrkern-cpp-kvlinc-2"
    rows = [r for r in report.rows if r.provider == kernel]
    missing = report.unavailable.get(KERNEL)
    why = f"{kernel} not timed: {missing}" if missing else \
        "no such case ran" + "".join(f"; skipped {s}" for s in report.skipped)
    out = _gpu_targets(report, rows, why) if gpu else _cpu_targets(rows, why)
    for model, nbytes, fp16 in report.memory:
        ratio = fp16 / nbytes
        out.append(f"memory kvlinc-2 vs fp16 at T={MEMORY_T}, {model.name}: {ratio:.2f}x smaller (target >= 6x) "
                   f"{'met' if ratio >= 6 else 'NOT MET'}")
    return out


def record(report: Report) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with RESULTS_FILE.open("a") as f:
        for r in report.rows:
            f.write(json.dumps(asdict(r)) + "\n")
    return RESULTS_FILE


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(sys.argv[1:], only=(BENCH,)))
