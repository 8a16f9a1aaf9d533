"""Low-rank (LANCE / HOSVD) ops benchmark: every lrkern backend that can run here (the Triton interpreter never)
against the reference backend and a memcpy of the same bytes, plus one training step of each compressed layer
against plain backprop.

  lance_project          the HOSVD core G = x x_k U_k^T ... (lrkern's default backend: the ATen GEMM chain on CPU,
                         the Triton two-sided kernel on CUDA) vs the reference tensordot chain vs memcpy
                         conv activations [B, C, H, W], modes=no_batch; transformer MLP inputs [B, L, F] with
                         modes=no_batch and modes=all (batch 8 -> 4); on CUDA also inputs of 64 MiB and more (the
                         spec's ">= 70% of peak HBM" target) in fp32 and bf16
  mode_gram_accumulate   out += X_(k) X_(k)^T for the channel mode of a conv activation and the feature mode of a
                         Linear input, vs the reference (unfold copy + matmul) vs memcpy
  lance_linear step,     forward + backward (dx, dW, db) of one layer in fp32: lrkern.ops.lance_linear /
  lance_conv2d step      lance_conv2d (default backend; and on the reference backend, which rebuilds dW from the
                         reconstructed X~) vs F.linear / F.conv2d ("backprop"), with the bytes each saves for backward

Bytes (GB/s, memcpy size): lance_project reads x once and writes the fp32 core: bytes(x) + bytes(core).
mode_gram_accumulate reads x once and reads + writes the fp32 [n, n] accumulator: bytes(x) + 2 * 4 n^2. The memcpy
is ``out.copy_(src)`` of that many bytes in all (half read, half written; for lance_project that is x.clone() scaled
to the op's bytes), so "% memcpy" is the fraction of the copy bandwidth the op reaches. The training steps are
compute-bound: their ``bytes`` is 0 (no GB/s); their ``ratios["backprop"]`` is time(backprop) / time(row), and the
summary line prints the inverse, the LANCE / backprop step-time ratio. Their params carry ``saved_bp`` and
``saved_lance``: the bytes autograd saves for backward (``lrkern.lance.SavedBytesMeter`` with the factors excluded),
checked against the analytic values (backprop: x; LANCE: the fp32 core).

Cases (ranks "-" = mode kept):
  CPU, fp32     lance_project: conv [128,64,14,14] -,3,4,3 and [128,128,7,7] -,3,2,2; MLP [8,512,576] and
                [8,512,1536] at -,32,64 and 4,32,64. gram: [128,64,14,14] dim 1, [8,512,576] dim 2. steps: conv
                [128,64,14,14] -> 128 (3x3, pad 1) -,3,4,3; linear [8,512,1536] -> 576 -,32,64
  CUDA          the same lance_project cases in fp32 and bf16, plus [8,2048,2048] (-,32,64 and 4,32,64) and
                [256,256,28,28] -,3,4,3 in fp32 and bf16 (64 MiB and more); gram also [8,512,1536] dim 2 and bf16;
                steps also linear 4,32,64 (the spec's full-run setting, modes=all)
  --quick       lance_project conv [128,64,14,14] and MLP [8,512,576] 4,32,64 (CUDA: [8,512,1536] 4,32,64 and
                [8,2048,2048] 4,32,64 fp32 + bf16); both grams (CUDA: fp32 only); the conv step only
Run time on 2 idle CPU cores (AMD EPYC): about 12 s with --quick, 25 s without (process start included). With
another job on the cores both are several times longer and the timings meaningless (OpenMP threads wait for a core).

Factors are torch.linalg.qr of random fp32 matrices (orthonormal columns); x is standard normal.

    python bench/bench_lance_ops.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import lrkern
from bench.common import MEMCPY, REFERENCE, Case, bench_backends, max_rel_err, memcpy_fn

BENCH = "lance"
BACKPROP = "backprop"  # the layer-step baseline: plain F.linear / F.conv2d, which saves x for backward
HBM_TARGET = 0.70  # spec (lance.md, Full run): lance_project >= 70% of peak HBM for inputs of 64 MB or more
HBM_TARGET_BYTES = 64 * 2**20
SEED = 0

# (layer, x shape, ranks per mode: None keeps the mode), modes = "all" when the batch mode is projected.
CONV_14 = ("conv", (128, 64, 14, 14), (None, 3, 4, 3))
CONV_7 = ("conv", (128, 128, 7, 7), (None, 3, 2, 2))
MLP_576 = ("mlp", (8, 512, 576), (None, 32, 64))
MLP_576_ALL = ("mlp", (8, 512, 576), (4, 32, 64))
MLP_1536 = ("mlp", (8, 512, 1536), (None, 32, 64))
MLP_1536_ALL = ("mlp", (8, 512, 1536), (4, 32, 64))
BIG_MLP = ("mlp", (8, 2048, 2048), (None, 32, 64))  # 128 MiB fp32, 64 MiB bf16
BIG_MLP_ALL = ("mlp", (8, 2048, 2048), (4, 32, 64))
BIG_CONV = ("conv", (256, 256, 28, 28), (None, 3, 4, 3))  # 196 MiB fp32, 98 MiB bf16


def project_cases(device: torch.device, quick: bool):
    """(layer, shape, ranks, dtype) of the lance_project cases."""
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        if quick:
            yield from ((*c, dt) for c in (CONV_14, MLP_1536_ALL) for dt in (f32,))
            yield from ((*BIG_MLP_ALL, dt) for dt in (f32, bf16))
            return
        for c in (CONV_14, CONV_7, MLP_576, MLP_576_ALL, MLP_1536, MLP_1536_ALL):
            yield from ((*c, dt) for dt in (f32, bf16))
        for c in (BIG_MLP, BIG_MLP_ALL, BIG_CONV):
            yield from ((*c, dt) for dt in (f32, bf16))
        return
    if quick:
        yield from ((*c, f32) for c in (CONV_14, MLP_576_ALL))
        return
    yield from ((*c, f32) for c in (CONV_14, CONV_7, MLP_576, MLP_576_ALL, MLP_1536, MLP_1536_ALL))


def gram_cases(device: torch.device, quick: bool):
    """(layer, shape, dim, dtype): the channel mode of a conv activation, the feature mode of a Linear input."""
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        cases = [("conv", CONV_14[1], 1), ("mlp", MLP_576[1], 2)] + ([] if quick else [("mlp", MLP_1536[1], 2)])
        yield from ((*c, dt) for c in cases for dt in ((f32,) if quick else (f32, bf16)))
        return
    yield "conv", CONV_14[1], 1, f32
    yield "mlp", MLP_576[1], 2, f32


def step_cases(device: torch.device, quick: bool):
    """(layer, x shape, ranks, out features / channels) of the training-step cases (fp32)."""
    conv = ("conv", CONV_14[1], CONV_14[2], 128)
    linear = ("linear", MLP_1536[1], MLP_1536[2], 576)
    if quick:
        yield conv
        return
    yield conv
    yield linear
    if device.type == "cuda":
        yield "linear", MLP_1536_ALL[1], MLP_1536_ALL[2], 576  # the spec's full-run setting (modes=all)


# ---------------------------------------------------------------------------------------------------- helpers

def orth(n: int, r: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """[n, r] fp32 with orthonormal columns: Q of the QR of a random matrix."""
    return torch.linalg.qr(torch.randn(n, r, generator=gen))[0].contiguous().to(device)


class Gens:
    """Seeded generators: ``host`` for the factors (QR on the CPU), ``dev`` for the inputs (drawn where they live,
    so a GPU run does not spend seconds filling 200 MB on the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host = torch.Generator().manual_seed(SEED)
        self.dev = torch.Generator(device=device).manual_seed(SEED)

    def randn(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.dev, device=self.device).to(dtype)


def make_factors(shape, ranks, device: torch.device, gen: Gens) -> list:
    return [None if r is None else orth(n, r, device, gen.host) for n, r in zip(shape, ranks)]


def rank_str(ranks) -> str:
    return ",".join("-" if r is None else str(r) for r in ranks)


def modes_of(ranks) -> str:
    return "no_batch" if ranks[0] is None else "all"


def core_numel(shape, ranks) -> int:
    return math.prod(n if r is None else r for n, r in zip(shape, ranks))


def impl_name(backend: str) -> str:
    return REFERENCE if backend == REFERENCE else f"lrkern[{backend}]"


def peak_hbm(device: torch.device) -> float | None:
    from bench.bench_decode import peak_hbm as peak

    return peak(device)


def input_bytes(row) -> int:
    """bytes(x) of a lance_project row, from its shape and dtype."""
    return math.prod(int(n) for n in row.shape.split("x")) * getattr(torch, row.dtype).itemsize


@contextlib.contextmanager
def backend_everywhere(name: str):
    """``use_backend(name)`` plus ``LRKERN_BACKEND=name``: on CUDA autograd runs backward on its own device thread,
    which does not see the caller's contextvars, so the forced backend must also reach it through the environment
    (read at every op call)."""
    old = os.environ.get("LRKERN_BACKEND")
    os.environ["LRKERN_BACKEND"] = name
    try:
        with lrkern.use_backend(name):
            yield
    finally:
        if old is None:
            os.environ.pop("LRKERN_BACKEND", None)
        else:
            os.environ["LRKERN_BACKEND"] = old


def _check_close(tol: float, ref):
    """check(out) for Case.measure: None when every output tensor is within ``tol`` (max rel err) of ``ref``."""
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)

    def check(out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for i, (o, r) in enumerate(zip(outs, refs)):
            if o.shape != r.shape:
                return f"output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
            err = max_rel_err(o, r)
            if not err <= tol:
                return f"output {i}: max rel err {err:.2e} > {tol:.0e}"
        return None

    return check


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- run

def run(device: torch.device, quick: bool, meta: dict, log=print) -> tuple[list, list[str]]:
    """Returns (rows, errors)."""
    rows, errors = [], []
    backends, _ = bench_backends(device)
    gen = Gens(device)
    peak = peak_hbm(device)
    if device.type == "cuda":
        log(f"  peak HBM bandwidth used for % peak: {peak / 1e12:.2f} TB/s" if peak else
            f"  peak HBM bandwidth of {meta['device']} unknown: % peak not reported")
    for layer, shape, ranks, dtype in project_cases(device, quick):
        case = _project_case(device, backends, gen, layer, shape, ranks, dtype, log)
        rows += case.finish(meta)
        errors += case.errors
        if peak:
            for r in case.rows:
                if r.role == "kernel":
                    log(f"  {r.impl} {case.label()}: {r.gbps:.0f} GB/s = {100 * r.gbps * 1e9 / peak:.1f}% of peak "
                        f"HBM (input {input_bytes(r) / 2**20:.0f} MiB)")
        _sync(device)
    for layer, shape, dim, dtype in gram_cases(device, quick):
        case = _gram_case(device, backends, gen, layer, shape, dim, dtype, log)
        rows += case.finish(meta)
        errors += case.errors
        flop = 2 * math.prod(shape) * shape[dim]
        log("  " + ", ".join(f"{r.impl} {flop / r.ms / 1e9:.2f} TFLOP/s" for r in case.rows if r.impl != MEMCPY)
            + f" ({case.label()}: {flop / 1e9:.2f} GFLOP a call)")
        _sync(device)
    for layer, shape, ranks, out in step_cases(device, quick):
        case, summary = _step_case(device, backends, gen, layer, shape, ranks, out, log)
        rows += case.finish(meta)
        errors += case.errors
        log(summary(case))
        _sync(device)
    return rows, errors


def _project_case(device, backends, gen, layer, shape, ranks, dtype, log) -> Case:
    x = gen.randn(*shape, dtype=dtype)
    fs = make_factors(shape, ranks, device, gen)
    nbytes = x.numel() * x.element_size() + 4 * core_numel(shape, ranks)
    params = {"layer": layer, "modes": modes_of(ranks), "ranks": rank_str(ranks)}
    case = Case(BENCH, "lance_project", shape, dtype, params, nbytes, device, log)
    with lrkern.use_backend(REFERENCE):
        ref = lrkern.lance_project(x, fs)
    check = _check_close(1e-4 if dtype == torch.float32 else 2e-2, ref)
    for backend in backends:
        def call(backend=backend):
            with lrkern.use_backend(backend):
                return lrkern.lance_project(x, fs)

        case.measure(impl_name(backend), call, backend=backend, check=None if backend == REFERENCE else check)
    case.measure(MEMCPY, memcpy_fn(nbytes, device))
    return case


def _gram_case(device, backends, gen, layer, shape, dim, dtype, log) -> Case:
    x = gen.randn(*shape, dtype=dtype)
    n = shape[dim]
    nbytes = x.numel() * x.element_size() + 2 * 4 * n * n
    params = {"layer": layer, "dim": dim, "mode": "channel" if layer == "conv" else "feature"}
    case = Case(BENCH, "mode_gram_accumulate", shape, dtype, params, nbytes, device, log)
    with lrkern.use_backend(REFERENCE):
        ref = torch.zeros(n, n, device=device)
        lrkern.mode_gram_accumulate(x, ref, dim, 1.0)
    check = _check_close(1e-4, ref)
    for backend in backends:
        acc = torch.zeros(n, n, device=device)  # measure's first call (the checked one) accumulates into zeros

        def call(backend=backend, acc=acc):
            with lrkern.use_backend(backend):
                lrkern.mode_gram_accumulate(x, acc, dim, 1.0)
            return acc

        case.measure(impl_name(backend), call, backend=backend, check=None if backend == REFERENCE else check)
    case.measure(MEMCPY, memcpy_fn(nbytes, device))
    return case


def _step_case(device, backends, gen, layer, shape, ranks, out, log):
    """One forward + backward (dx, dW, db) of the layer, fp32: LANCE on each backend and plain backprop."""
    from lrkern.lance import SavedBytesMeter

    torch.manual_seed(SEED)
    if layer == "linear":
        module = torch.nn.Linear(shape[-1], out).to(device)
        x = gen.randn(*shape).requires_grad_(True)
        dy = gen.randn(*shape[:-1], out)

        def lance():
            return lrkern.ops.lance_linear(x, module.weight, module.bias, fs)[0]

        def bp():
            return F.linear(x, module.weight, module.bias)
        what = f"x {list(shape)} -> {out}"
    else:
        module = torch.nn.Conv2d(shape[1], out, 3, padding=1).to(device)
        x = gen.randn(*shape).requires_grad_(True)
        dy = gen.randn(shape[0], out, *shape[2:])

        def lance():
            return lrkern.ops.lance_conv2d(x, module.weight, module.bias, fs, [1, 1], [1, 1], [1, 1], False)[0]

        def bp():
            return F.conv2d(x, module.weight, module.bias, 1, 1)
        what = f"x {list(shape)} -> {out} ch, 3x3, pad 1"
    fs = make_factors(shape, ranks, device, gen)
    inputs = (x, module.weight, module.bias)

    def step(fwd):
        return lambda: torch.autograd.grad(fwd(), inputs, dy)

    # Bytes autograd keeps for backward, measured on the forward, and what they must be.
    with SavedBytesMeter(module, exclude=fs) as m_lance:
        lance()
    with SavedBytesMeter(module, exclude=fs) as m_bp:
        bp()
    saved_lance, saved_bp = m_lance.total, m_bp.total
    want_lance, want_bp = 4 * core_numel(shape, ranks), x.numel() * x.element_size()
    op = f"lance_{layer}{'2d' if layer == 'conv' else ''} step"
    params = {"modes": modes_of(ranks), "ranks": rank_str(ranks), "out": out, "saved_bp": saved_bp,
              "saved_lance": saved_lance}
    case = Case(BENCH, op, shape, torch.float32, params, 0, device, log)
    for what_saved, got, want in (("LANCE", saved_lance, want_lance), ("backprop", saved_bp, want_bp)):
        if got != want:
            case.errors.append(f"{case.label()}: {what_saved} saves {got} bytes for backward, expected {want}")
            log(f"  error: {case.errors[-1]}")

    with backend_everywhere(REFERENCE):
        ref = step(lance)()
    grads_bp = step(bp)()
    # cuDNN convolutions take TF32 by default on CUDA (torch.backends.cudnn.allow_tf32).
    tol = 1e-4 if device.type == "cpu" else 1e-2
    check_ref = _check_close(tol, ref)
    check_dx = _check_close(tol, grads_bp[:1])  # dx is exact: it needs W, not X

    def check(got):
        return check_ref(got) or check_dx(got[:1])

    for backend in backends:
        with backend_everywhere(backend):
            case.measure(impl_name(backend), step(lance), backend=backend,
                         check=None if backend == REFERENCE else check)
    case.measure(BACKPROP, step(bp))
    for r in case.rows:  # backprop is this case's baseline: the ratios of the other rows are against it
        if r.impl == BACKPROP:
            r.role = "baseline"

    def summary(case: Case) -> str:
        t = {r.impl: r.ms for r in case.rows}
        kernels = [r for r in case.rows if r.role == "kernel"]
        times = ", ".join(f"{r.impl} {r.ms:.2f} ms = {r.ms / t[BACKPROP]:.2f}x backprop" for r in kernels) \
            if BACKPROP in t else "backprop not timed"
        return (f"  {op} ({what}, ranks {rank_str(ranks)}): backprop {t.get(BACKPROP, float('nan')):.2f} ms; "
                f"{times}; saved for backward: backprop {saved_bp / 2**20:.2f} MiB, LANCE {saved_lance / 2**10:.1f} "
                f"KiB ({saved_bp / max(saved_lance, 1):.0f}x less)")

    return case, summary


# ---------------------------------------------------------------------------------------------------- targets

def targets(rows, device: torch.device, backends_note: dict[str, str] | None = None) -> list[str]:
    """The spec's bandwidth target for lance_project (GPU): every triton row whose input is >= 64 MiB reaches
    >= 70% of the device's peak HBM bandwidth (bytes(x) + bytes(core) / median time)."""
    name = f"GPU lance_project >= {100 * HBM_TARGET:.0f}% of peak HBM, inputs >= {HBM_TARGET_BYTES >> 20} MiB, triton"
    if device.type != "cuda":
        return [f"{name}: not measured on this device ({device.type})"]
    big = [r for r in rows if r.op == "lance_project" and r.backend == "triton" and input_bytes(r) >= HBM_TARGET_BYTES]
    if not big:
        why = (backends_note or {}).get("triton")
        return [f"{name}: not measured ({f'triton backend unavailable: {why}' if why else 'no such row in this run'})"]
    peak = peak_hbm(device)
    if not peak:
        return [f"{name}: not measured (the peak HBM bandwidth of {torch.cuda.get_device_name(device)} is not in "
                "bench_decode.PEAK_HBM)"]
    worst, best = min(big, key=lambda r: r.gbps), max(big, key=lambda r: r.gbps)

    def show(r) -> str:
        return (f"{100 * r.gbps * 1e9 / peak:.1f}% ({r.gbps:.0f} GB/s, {r.shape} {r.dtype} ranks {r.params['ranks']}, "
                f"{r.ms:.3f} ms)")

    ok = worst.gbps * 1e9 / peak >= HBM_TARGET
    return [f"{name} ({peak / 1e12:.2f} TB/s): worst {show(worst)}, best {show(best)} over {len(big)} case(s) "
            f"{'met' if ok else 'NOT MET'}"]


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(sys.argv[1:], only=(BENCH,)))
