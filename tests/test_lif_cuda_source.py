"""The CUDA C LIF kernels (csrc/cuda/lif.cu) checked without a GPU, and the ``cuda`` backend's wiring.

lif.cu also compiles as plain C++ with csrc/cuda/cpu_shim.h included first (CUDA qualifiers and thread indices,
the *_rn intrinsics as single rounded operations, software fp16 conversions); csrc/cuda/lif_cpu_driver.cpp
includes it and runs each kernel instantiation over a simulated grid. g++ builds that into a shared library
(-ffp-contract=off, as the GPU build uses --fmad=false) that these tests drive through ctypes:

- the kernels against lrkern/reference/lif.py: forward bit-exact (spikes, h, v_last, v_seq) in every dtype, the
  atan backward bit-exact, the sigmoid backward by error ratio (glibc's expf vs torch's exp); several blocks with a
  ragged tail, outputs poisoned with NaN first so an unwritten element fails;
- the shim's fp16 / bf16 conversions against torch's casts;
- the CuPy launcher (lrkern/kernels/cuda_lif.py) end to end through the op and autograd, with its launch replaced by
  the CPU driver: template names, argument order and host-side scalars as the GPU gets them;
- where NVRTC is installed (pip install nvidia-cuda-nvrtc-cu12), every instantiation compiles with NVRTC for
  sm_90, and Triton's ptxas assembles it without spills;
- the dispatcher's ``cuda`` backend and ``lrkern.spiking.LIF(backend=...)``.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lrkern
from lrkern.ops import _dispatch
from lrkern.reference import lif as R
from lrkern.spiking import LIF
from tests.helpers import TOLERANCE, err_ratio
from tests.nvrtc_helpers import compile_ptx, instantiations, nvrtc_library, ptxas_sm90

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK = 64  # small, so the shapes below span several blocks and a ragged tail

# (tau, v_threshold, v_reset (None = soft), decay_input, detach_reset, surrogate, alpha)
OPTS = [
    (2.0, 1.0, 0.0, True, False, "sigmoid", 4.0), (3.0, 1.0, 0.0, True, True, "atan", 2.0),
    (2.0, 1.0, None, True, False, "atan", 2.0), (1.7, 0.8, None, False, True, "sigmoid", 4.0),
    (3.0, 1.0, -0.2, False, False, "sigmoid", 3.0), (2.5, 0.9, None, False, False, "atan", 3.5),
]
OPT_IDS = ["hard", "hard-detach-atan-tau3", "soft-atan", "soft-nodecay-detach", "hard-vr-nodecay", "soft-nodecay-atan"]
SHAPES = [(1, 7), (5, 130), (9, 257)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: this check compiles csrc/cuda/lif.cu as C++ with csrc/cuda/cpu_shim.h")
    out = tmp_path_factory.mktemp("lif_cuda_cpu") / "liblif_cuda_cpu.so"
    cmd = [gxx, "-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-shared", "-fPIC", "-include", str(CUDA_SRC / "cpu_shim.h"), str(CUDA_SRC / "lif_cpu_driver.cpp"),
           "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    so = ctypes.CDLL(str(out))
    vp, i, ll, f, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_uint
    so.lk_lif_fwd.argtypes = [i, i, i, i, vp, vp, vp, vp, vp, vp, ll, ll, f, f, f, u, u]
    so.lk_lif_bwd.argtypes = [i, i, i, i, i, i, vp, vp, vp, vp, vp, vp, vp, ll, ll, f, f, f, f, f, f, f, u, u]
    for name in ("lk_f32_to_f16_n", "lk_f16_to_f32_n", "lk_f32_to_bf16_n"):
        getattr(so, name).argtypes = [vp, vp, ll]
    return so


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _grid(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def kernel_forward(lib, x, v0, tau, vth, v_reset, decay_input, store):
    """The CUDA C forward on the CPU: (s, h, v_last, v_seq)."""
    T, N = x.shape
    soft = v_reset is None
    s, h = _poisoned(x.shape, x.dtype), _poisoned(x.shape, x.dtype)
    v_last = _poisoned((N,), torch.float32)
    v_seq = _poisoned((T, N) if store else (0,), torch.float32)
    rc = lib.lk_lif_fwd(DTYPES[x.dtype], soft, decay_input, store, x.data_ptr(), v0.data_ptr(), s.data_ptr(),
                        h.data_ptr(), v_last.data_ptr(), v_seq.data_ptr() if store else None, T, N, tau, vth,
                        0.0 if soft else v_reset, _grid(N), BLOCK)
    assert rc == 0
    return s, h, v_last, v_seq


def kernel_backward(lib, gs, gv, gseq, h, s, tau, vth, v_reset, decay_input, detach, sur, alpha):
    T, N = h.shape
    soft = v_reset is None
    has_seq = gseq.numel() > 0
    gx, gv0 = _poisoned(h.shape, h.dtype), _poisoned((N,), torch.float32)
    rc = lib.lk_lif_bwd(DTYPES[h.dtype], soft, decay_input, detach, sur == "atan", has_seq, gs.data_ptr(),
                        gv.data_ptr(), gseq.data_ptr() if has_seq else None, h.data_ptr(), s.data_ptr(),
                        gx.data_ptr(), gv0.data_ptr(), T, N, tau, vth, 0.0 if soft else v_reset, 1.0 - 1.0 / tau,
                        alpha, math.pi / 2.0 * alpha, alpha / 2.0, _grid(N), BLOCK)
    assert rc == 0
    return gx, gv0


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}")
def test_forward_is_bit_exact(lib, shape, opt, dtype):
    tau, vth, v_reset, decay_input, _, _, _ = opt
    x = (torch.randn(shape) * 1.5).to(dtype)
    v0 = torch.randn(shape[1]) * 0.3
    got = kernel_forward(lib, x, v0, tau, vth, v_reset, decay_input, True)
    ref = R.lif_forward(x, v0, tau, vth, v_reset or 0.0, v_reset is None, decay_input, True)
    if x.numel() > 100:
        assert got[0].any() and not got[0].all(), "the case should both fire and not fire"
    for name, a, b in zip(("s", "h", "v_last", "v_seq"), got, ref):
        # The fp32 arithmetic is the reference's, and h is rounded once, to nearest even: equal in every dtype.
        assert a.dtype == b.dtype and torch.equal(a, b), name
    got_nostore = kernel_forward(lib, x, v0, tau, vth, v_reset, decay_input, False)
    assert torch.equal(got_nostore[2], ref[2]) and got_nostore[3].numel() == 0


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}")
def test_backward_matches_the_reference(lib, shape, opt, dtype):
    tau, vth, v_reset, decay_input, detach, sur, alpha = opt
    x = (torch.randn(shape) * 1.5).to(dtype)
    v0 = torch.randn(shape[1]) * 0.3
    s, h, _, _ = R.lif_forward(x, v0, tau, vth, v_reset or 0.0, v_reset is None, decay_input, False)
    gs, gv, gseq = torch.randn(shape).to(dtype), torch.randn(shape[1]), torch.randn(shape)
    for seq in (gseq, torch.empty(0)):
        got = kernel_backward(lib, gs, gv, seq, h, s, tau, vth, v_reset, decay_input, detach, sur, alpha)
        ref = R.lif_backward(gs, gv, seq, h, s, tau, vth, v_reset or 0.0, v_reset is None, decay_input, detach,
                             R.ATAN if sur == "atan" else R.SIGMOID, alpha)
        assert got[0].dtype == dtype and not got[0].isnan().any() and not got[1].isnan().any()
        if sur == "atan":
            # No transcendental: the reference's operations in its order, so the gradients are bit-identical.
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        else:
            tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
            assert err_ratio(got[0], ref[0]) <= tol and err_ratio(got[1], ref[1]) <= 1e-6


def test_shim_fp16_and_bf16_conversions_match_torch(lib):
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g).float(),
             torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 65536.0, 1e9, -1e9, float("inf"), float("-inf"),
                           2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25,
                           1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1e-40])]
    # Exact halfway points between neighbouring fp16 values (ties go to the even one), normal and subnormal.
    h = torch.arange(0, 0x7C00, 37, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    parts.append((h + torch.nextafter(h.half(), torch.tensor(float("inf"), dtype=torch.float16)).float()) / 2)
    x = torch.cat(parts + [-p for p in parts]).contiguous()
    out = torch.empty(x.numel(), dtype=torch.int16)
    lib.lk_f32_to_f16_n(x.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out, x.half().view(torch.int16))
    lib.lk_f32_to_bf16_n(x.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out, x.bfloat16().view(torch.int16))
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    back = torch.empty(bits.numel(), dtype=torch.float32)
    lib.lk_f16_to_f32_n(bits.data_ptr(), back.data_ptr(), bits.numel())
    ref = bits.view(torch.float16).float()
    nan = ref.isnan()
    assert torch.equal(back.isnan(), nan) and torch.equal(back[~nan].view(torch.int32), ref[~nan].view(torch.int32))


# ------------------------------------------------------------------ the launcher, with its launch run on the CPU

_TYPES = {"float": 0, "lk_f16": 1, "lk_bf16": 2}


@pytest.fixture
def cpu_cuda_backend(lib, monkeypatch):
    """Makes the ``cuda`` backend run CPU tensors: the dispatcher's CuPy check passes, the launcher's device check
    is skipped, and each launch (template name, grid, argument tuple) goes to the CPU driver instead of CuPy."""
    from lrkern.kernels import cuda_lif

    launches = []

    def launch(name, device, n, args):
        m = re.fullmatch(r"(lif_fwd|lif_bwd)<(\w+), (.*)>", name)
        assert m, name
        flags = [{"true": 1, "false": 0}[f] for f in m.group(3).split(", ")]
        conv = [int(a) if isinstance(a, np.integer) else float(a) if isinstance(a, np.floating) else (a or None)
                for a in args]
        for a in args:  # pointers are ints, sizes int64, every scalar already rounded to fp32 on the host
            assert isinstance(a, (int, np.int64, np.float32)), (name, type(a))
        fn = lib.lk_lif_fwd if m.group(1) == "lif_fwd" else lib.lk_lif_bwd
        assert fn(_TYPES[m.group(2)], *flags, *conv, _grid(n), BLOCK) == 0
        launches.append(name)

    monkeypatch.setattr(_dispatch, "cupy_unavailable", lambda device: None)
    monkeypatch.setattr(cuda_lif, "_launch", launch)
    monkeypatch.setattr(cuda_lif, "_check", lambda name, t, dtypes: None if t.dtype in dtypes else pytest.fail(name))
    return launches


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_launcher_through_the_op_and_autograd(cpu_cuda_backend, opt, dtype):
    tau, vth, v_reset, decay_input, detach, sur, alpha = opt
    x = (torch.randn(6, 3, 45) * 1.5).to(dtype).requires_grad_(True)
    v0 = (torch.randn(3, 45) * 0.3).requires_grad_(True)
    args = (v0, tau, vth, v_reset, sur, alpha, detach, decay_input, True)
    outs, grads = {}, {}
    for backend in ("cuda", "reference"):
        with lrkern.use_backend(backend):
            s, v_last, v_seq, h = torch.ops.lrkern.lif_multistep(x, *args)
            g = torch.autograd.grad((s.float() * torch.arange(45)).sum() + v_last.sum() + (v_seq * 0.5).sum(),
                                    (x, v0))
        outs[backend], grads[backend] = (s, v_last, v_seq, h), g
    for a, b in zip(outs["cuda"], outs["reference"]):
        assert torch.equal(a, b)
    tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    assert err_ratio(grads["cuda"][0], grads["reference"][0]) <= tol
    assert err_ratio(grads["cuda"][1], grads["reference"][1]) <= 1e-6
    flags = ", ".join("true" if f else "false" for f in (v_reset is None, decay_input))
    ctype = {torch.float32: "float", torch.float16: "lk_f16", torch.bfloat16: "lk_bf16"}[dtype]
    assert cpu_cuda_backend == [f"lif_fwd<{ctype}, {flags}, true>",
                                f"lif_bwd<{ctype}, {flags}, {str(detach).lower()}, {str(sur == 'atan').lower()}, true>"]


def test_module_on_the_cuda_backend(cpu_cuda_backend):
    x = torch.randn(8, 2, 50) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the backend runs: no fallback warning
        assert torch.equal(LIF(backend="cuda", v_reset=None)(x), LIF(backend="torch", v_reset=None)(x))
    assert cpu_cuda_backend == ["lif_fwd<float, true, true, false>"]


# ------------------------------------------------------------------ NVRTC + ptxas (optional: needs NVRTC)

def test_nvrtc_compiles_every_instantiation_for_sm90_without_spills(tmp_path):
    from lrkern.kernels import cuda_lif

    nvrtc = nvrtc_library()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12 to compile lif.cu for sm_90 here)")
    names = instantiations("lif_fwd", "lif_bwd")
    text, lowered = compile_ptx(nvrtc, cuda_lif.source_path().read_bytes(), "lif.cu", names, cuda_lif.OPTIONS)
    # No FMA in the forward: every product and sum is rounded on its own, as in the reference.
    forward = re.findall(r"\.entry _Z7lif_fwd\w+\(.*?\n\}", text, flags=re.S)
    assert len(forward) == 24 and not any("fma." in body for body in forward)
    stats = ptxas_sm90(text, tmp_path, "lif")
    assert {lowered[name] for name, _, _ in stats} == set(names)
    assert all(spill == 0 and regs <= 64 for _, spill, regs in stats), stats


# ------------------------------------------------------------------ dispatcher and module


def test_cuda_backend_is_known_but_never_automatic(monkeypatch):
    assert "cuda" in _dispatch.BACKENDS
    assert "cuda" not in lrkern.available_backends("cpu")
    assert _dispatch.why_unavailable("cuda", torch.device("cpu")) == (
        "the CUDA C backend runs CUDA tensors only (got cpu)")
    monkeypatch.delenv("LRKERN_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "cupy_unavailable", lambda device: None)  # as if CuPy worked everywhere
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert lrkern.select_backend(torch.device("cuda")) == "triton"
    assert lrkern.select_backend(torch.device("cpu")) in ("cpp", "reference")


def test_ops_without_a_cuda_kernel_say_so():
    disp = importlib.import_module("lrkern.ops.hadamard")._impl  # the attribute lrkern.ops.hadamard is the op
    with pytest.raises(NotImplementedError, match=r"lrkern::hadamard has no cuda implementation"):
        disp.implementation("cuda")


def test_cupy_failure_is_reported_with_its_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setattr(_dispatch, "_cupy_reasons", {})
    reason = _dispatch.why_unavailable("cuda", torch.device("cuda", 0))
    assert re.match(r"CuPy does not import \((ModuleNotFoundError|ImportError): import of cupy halted.*\); install "
                    r"the wheel for torch's CUDA, e\.g\. `pip install cupy-cuda\d+x`$", reason), reason
    assert _dispatch._cupy_reasons == {0: reason}  # checked once per device


def test_launcher_imports_without_cupy_and_finds_its_source():
    code = "import sys, lrkern.kernels.cuda_lif; assert 'cupy' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]  # CuPy is imported only when a kernel launches
    from lrkern.kernels import cuda_lif

    assert cuda_lif.source_path() == CUDA_SRC / "lif.cu"
    assert "lif_fwd" in cuda_lif._code() and "lif_bwd" in cuda_lif._code()


def test_module_backend_argument(monkeypatch):
    from lrkern.ops import lif as lif_ops

    used = []
    real = lif_ops._fwd.implementation
    monkeypatch.setattr(lif_ops._fwd, "implementation", lambda b: used.append(b) or real(b))
    x = torch.randn(5, 40) * 1.5
    ref = LIF()(x)
    cases = [("torch", "reference"), ("auto", lrkern.select_backend(x.device))]
    cases += [(b, b) for b in ("triton", "cpp") if _dispatch.why_unavailable(b, x.device) is None]
    for backend, expected in cases:
        used.clear()
        lif = LIF(backend=backend)
        assert torch.equal(lif(x), ref) and used == [expected], backend
    assert "backend=torch" in repr(LIF(backend="torch"))
    with pytest.raises(ValueError, match=r"backend='cupy' is not supported; accepted: auto, torch, cpp, triton, cuda"):
        LIF(backend="cupy")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend 'triton' was forced but cannot run here: .*TRITON_INTERPRET"):
        LIF(backend="triton")(x)


def test_module_cuda_backend_falls_back_with_one_warning(monkeypatch):
    if _dispatch.why_unavailable("triton", torch.device("cpu")) is not None:
        pytest.skip("Triton cannot run CPU tensors here (no TRITON_INTERPRET=1): the Triton fallback is not reachable")
    x = torch.randn(5, 40) * 1.5
    lif = LIF(backend="cuda")
    with pytest.warns(RuntimeWarning) as caught:
        out = lif(x)
        out2 = lif(x)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg == ("lrkern.spiking.LIF(backend='cuda'): the CUDA C backend cannot run here (the CUDA C backend runs "
                   "CUDA tensors only (got cpu)); using the Triton backend instead")
    assert "error" not in msg.lower()
    assert torch.equal(out, LIF()(x)) and torch.equal(out2, out)
    # Where Triton cannot run either, lrkern's automatic choice runs, and the warning says which.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match=r"using lrkern's automatic choice \((cpp|reference)\) instead"):
        assert torch.equal(LIF(backend="cuda")(x), out)
