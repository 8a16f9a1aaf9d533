"""The CUDA C STM kernels (csrc/cuda/stm.cu) checked without a GPU, and the ``cuda`` backend's wiring.

stm.cu compiles as plain C++ with csrc/cuda/cpu_shim.h included first; csrc/cuda/stm_cpu_driver.cpp includes it and
runs each kernel instantiation over a simulated 2-D grid whose threads are coroutines, so the backward's
shared-memory reduction and its barriers run as written. g++ builds that into a shared library (-ffp-contract=off,
as the GPU build uses --fmad=false) that these tests drive through ctypes:

- the kernels against lrkern/reference/stm.py, hard and soft reset, detach_reset on and off, with and without gain
  and beta, sigmoid and atan: forward bit-exact (spikes, h, v_last) in fp32 / fp16 / bf16; the backward's grad_u and
  grad_v0 bit-exact with atan (no transcendental) and by error ratio with sigmoid (glibc's expf vs torch's exp); the
  parameter gradients at test_stm.py's tolerance; without u, the rows not computed are zeros and the rest is equal.
  Rows of one and of several blocks with a ragged tail; outputs and scratch poisoned with NaN first, so an unwritten
  element fails; every backward also runs with each block's threads in reverse order, which must not change a bit
  (a missing barrier would);
- deliberately broken copies of stm.cu (a dropped trace decay, the trace rebuilt one step late, the trace's
  gradient carry without beta, the soft-reset V[t-1] rebuilt with theta0, a missing barrier, an early return before
  the barriers, a wrong partial index) compiled and caught by the same checks;
- the CuPy launcher (lrkern/kernels/cuda_stm.py) end to end through the op and autograd, with its launch replaced by
  the CPU driver: template names, argument order, host-side scalars and the host's sum of the partials;
- the helpers shared with lif.cu are a verbatim copy; the launcher imports without CuPy and finds its source;
- where NVRTC is installed (pip install nvidia-cuda-nvrtc-cu12), every instantiation compiles with NVRTC for
  sm_90, and Triton's ptxas assembles it without spills.
"""
from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lrkern
from lrkern.ops import _dispatch
from lrkern.reference import stm as R
from tests.helpers import TOLERANCE, err_ratio
from tests.nvrtc_helpers import compile_ptx, instantiations, nvrtc_library, ptxas_sm90

CUDA_C_OPS = True  # the `backend` fixture runs "cuda" here (where CuPy and a GPU are present)

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPE_IDS = ["fp32", "fp16", "bf16"]
RHO = math.exp(-0.25)

# (v_reset (None = soft), decay_input, detach_reset, surrogate, alpha): test_stm.py's flag sets
OPTS = [
    (0.0, True, False, "sigmoid", 4.0), (0.0, True, True, "atan", 2.0), (None, True, False, "atan", 2.0),
    (None, False, True, "sigmoid", 4.0), (-0.2, False, False, "sigmoid", 3.0), (None, True, True, "atan", 3.5),
]
OPT_IDS = ["hard", "hard-detach-atan", "soft-atan", "soft-nodecay-detach", "hard-vr-nodecay", "soft-detach-atan"]
# (beta, gain): the dynamic threshold and the input gain, each on and off
PARAMS = [(True, True), (False, False), (True, False), (False, True)]
PARAM_IDS = ["beta-gain", "static", "beta", "gain"]
# (T, B, C, S, block): block None is the launcher's rule (S = 35: one block of 64 with 29 idle threads; S = 300: two
# blocks of 256 per row, the second with 44 live threads); 32 forces three blocks on a row of 70.
SHAPES = [(1, 1, 1, 1, None), (5, 2, 3, 35, None), (4, 1, 2, 300, None), (6, 2, 2, 70, 32)]
SHAPE_IDS = ["T1-S1", "T5-S35", "T4-S300", "T6-S70-b32"]


def _compile(out: Path, driver: Path, float_only: bool = False) -> subprocess.Popen:
    gxx = shutil.which("g++")
    cmd = [gxx, "-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-shared", "-fPIC", "-include", str(driver.parent / "cpu_shim.h"), str(driver), "-o", str(out)]
    if float_only:
        cmd.insert(1, "-DLK_DRIVER_FLOAT_ONLY")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _load(path: Path):
    so = ctypes.CDLL(str(path))
    vp, i, ll, f, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_uint
    so.lk_stm_fwd.argtypes = [i, i, i, i] + [vp] * 9 + [ll] * 4 + [f, f, u, u, u, i]
    so.lk_stm_bwd.argtypes = [i] * 6 + [vp] * 14 + [ll] * 4 + [f, f, i, f, f, f, u, u, u, i]
    return so


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: this check compiles csrc/cuda/stm.cu as C++ with csrc/cuda/cpu_shim.h")
    out = tmp_path_factory.mktemp("stm_cuda_cpu") / "libstm_cuda_cpu.so"
    proc = _compile(out, CUDA_SRC / "stm_cpu_driver.cpp")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return _load(out)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _geometry(rows: int, row_len: int, block):
    from lrkern.kernels import cuda_stm

    if block is None:
        return cuda_stm._grid(rows, row_len)
    return (rows, -(-row_len // block)), block


def _ptr(t):
    return None if t is None else t.data_ptr()


def kernel_forward(lib, u, v0, gain, tau, theta0, beta, v_reset, decay_input, block=None):
    """The CUDA C forward on the CPU: (s, h, v_last)."""
    T, B, C, S = u.shape
    soft = v_reset is None
    s, h, v_last = _poisoned(u.shape, u.dtype), _poisoned(u.shape, u.dtype), _poisoned((B, C, S), torch.float32)
    (gx, gy), blk = _geometry(B * C, S, block)
    rc = lib.lk_stm_fwd(DTYPES[u.dtype], soft, decay_input, beta is not None, u.data_ptr(), v0.data_ptr(),
                        _ptr(gain), tau.data_ptr(), theta0.data_ptr(), _ptr(beta), s.data_ptr(), h.data_ptr(),
                        v_last.data_ptr(), T, B * C * S, S, C, RHO, 0.0 if soft else v_reset, gx, gy, blk, False)
    assert rc == 0, f"lk_stm_fwd returned {rc}"
    return s, h, v_last


def kernel_backward(lib, gs, gv, u, v0, h, s, gain, tau, theta0, beta, v_reset, decay_input, detach, sur, alpha,
                    block=None, reverse=False):
    """The CUDA C backward on the CPU, and the launcher's host sum of its partials: (grad_u, grad_v0, grad_params)."""
    from lrkern.kernels.cuda_stm import reduce_partials

    T, B, C, S = h.shape
    soft = v_reset is None
    (gx, gy), blk = _geometry(B * C, S, block)
    gu, gv0 = _poisoned(h.shape, h.dtype), _poisoned((B, C, S), torch.float32)
    partial = _poisoned((4, B * C, gy), torch.float64)
    trace = _poisoned(h.shape, torch.float32) if beta is not None else None
    rc = lib.lk_stm_bwd(DTYPES[h.dtype], soft, decay_input, beta is not None, sur == "atan", u is not None,
                        gs.data_ptr(), gv.data_ptr(), _ptr(u), v0.data_ptr(), h.data_ptr(), s.data_ptr(), _ptr(gain),
                        tau.data_ptr(), theta0.data_ptr(), _ptr(beta), _ptr(trace), gu.data_ptr(), gv0.data_ptr(),
                        partial.data_ptr(), T, B * C * S, S, C, RHO, 0.0 if soft else v_reset, detach, alpha,
                        math.pi / 2.0 * alpha, alpha / 2.0, gx, gy, blk, reverse)
    assert rc == 0, f"lk_stm_bwd returned {rc} (-2: a block's threads did not all reach the same barrier)"
    return gu, gv0, reduce_partials(partial, tau, B, decay_input)


def _inputs(shape, dtype, with_beta, with_gain, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, B, C, S = shape
    u = (torch.randn(shape, generator=g) * 1.5 + 0.6).to(dtype)
    v0 = torch.randn(B, C, S, generator=g) * 0.3
    gain = 0.6 + torch.rand(B, C, generator=g)
    tau = 1.5 + torch.rand(C, generator=g)
    theta0 = 0.8 + 0.4 * torch.rand(C, generator=g)
    beta = 0.2 + 0.5 * torch.rand(C, generator=g)
    return u, v0, gain if with_gain else None, tau, theta0, beta if with_beta else None


def check_case(lib, shape, opt, dtype, with_beta, with_gain, seed=0):
    """The kernels against the reference on one case; raises AssertionError naming what differs."""
    T, B, C, S, block = shape
    v_reset, decay_input, detach, sur, alpha = opt
    soft = v_reset is None
    u, v0, gain, tau, theta0, beta = _inputs((T, B, C, S), dtype, with_beta, with_gain, seed)
    got = kernel_forward(lib, u, v0, gain, tau, theta0, beta, v_reset, decay_input, block)
    ref = R.stm_forward(u, v0, gain, tau, theta0, beta, RHO, v_reset or 0.0, soft, decay_input)
    for name, a, b in zip(("s", "h", "v_last"), got, ref):
        # The fp32 arithmetic is the reference's and h is rounded once, to nearest even: equal in every dtype.
        assert a.dtype == b.dtype and torch.equal(a, b), f"forward {name}"
    s, h, _ = ref
    g = torch.Generator().manual_seed(seed + 1)
    gs, gv = torch.randn(s.shape, generator=g).to(dtype), torch.randn(v0.shape, generator=g)
    bargs = (tau, theta0, beta, v_reset, decay_input, detach, sur, alpha)
    full = kernel_backward(lib, gs, gv, u, v0, h, s, gain, *bargs, block=block)
    want = R.stm_backward(gs, gv, u, v0, h, s, gain, tau, theta0, beta, RHO, v_reset or 0.0, soft, decay_input,
                          detach, R.ATAN if sur == "atan" else R.SIGMOID, alpha)
    assert full[0].dtype == dtype and not full[0].isnan().any() and not full[1].isnan().any(), "backward NaN"
    assert not full[2].isnan().any(), "backward NaN in the parameter gradients (an unwritten partial?)"
    if sur == "atan":
        # No transcendental: the reference's operations in its order, so grad_u and grad_v0 are bit-identical.
        assert torch.equal(full[0], want[0]), "grad_u"
        assert torch.equal(full[1], want[1]), "grad_v0"
    else:
        tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
        assert err_ratio(full[0], want[0]) <= tol, "grad_u"
        assert err_ratio(full[1], want[1]) <= 1e-6, "grad_v0"
    for i, name in enumerate(("gain", "tau", "theta0", "beta")):
        # test_stm.py's bound; with atan the per-neuron sums are the reference's bits and only the float64 order of
        # the sum over space differs (the sums come out equal in these cases), so that bound is far tighter.
        bound = 1e-7 if sur == "atan" else 1e-5
        assert err_ratio(full[2][i], want[2][i]) <= bound, f"grad_{name}"
    if beta is None:
        assert not full[2][3].any(), "grad_beta without beta"
    # Each block's threads in reverse order between barriers: the same bits (a missing barrier shows here).
    rev = kernel_backward(lib, gs, gv, u, v0, h, s, gain, *bargs, block=block, reverse=True)
    for name, a, b in zip(("grad_u", "grad_v0", "grad_params"), rev, full):
        assert torch.equal(a, b), f"reverse thread order changed {name}"
    # Without u: no gain / tau gradient (zero rows), v0 never read, everything else the same bits.
    part = kernel_backward(lib, gs, gv, None, _poisoned(v0.shape, torch.float32), h, s, gain, *bargs, block=block)
    assert torch.equal(part[0], full[0]) and torch.equal(part[1], full[1]), "backward without u: grad_u / grad_v0"
    assert not part[2][:2].any() and torch.equal(part[2][2:], full[2][2:]), "backward without u: grad_params"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
@pytest.mark.parametrize("opt", OPTS, ids=OPT_IDS)
def test_kernels_match_the_reference(lib, opt, params, dtype):
    for shape in SHAPES:
        check_case(lib, shape, opt, dtype, *params)


def test_cases_fire_and_rest():
    """The inputs above make neurons both fire and stay silent, and the trace matters: a check that could fail."""
    u, v0, gain, tau, theta0, beta = _inputs((5, 2, 3, 35), torch.float32, True, True)
    s = R.stm_forward(u, v0, gain, tau, theta0, beta, RHO, 0.0, False, True)[0]
    assert 0.1 < s.mean().item() < 0.9
    assert not torch.equal(s, R.stm_forward(u, v0, gain, tau, theta0, None, RHO, 0.0, False, True)[0])


def test_fires_at_the_dynamic_threshold(lib):
    """Firing is the non-strict H >= theta0 + beta A (test_stm_triton.py's case): a float below does not fire."""
    on = 1.5
    below = torch.nextafter(torch.tensor(on), torch.tensor(0.0)).item()
    u = torch.tensor([[1.0, 1.0], [on, below]]).view(2, 1, 1, 2)
    params = (torch.zeros(1, 1, 2), None, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    for v_reset in (0.0, None):
        s, h, _ = kernel_forward(lib, u, *params, v_reset, True)
        want = R.stm_forward(u, *params, RHO, 0.0, v_reset is None, True)
        assert torch.equal(s, want[0]) and torch.equal(h, want[1])
        assert s.flatten().tolist() == [1.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------ broken kernels are caught

# (id, text in stm.cu, its replacement, what must catch it): each breaks one part of the kernels.
MUTATIONS = [
    ("forward-trace-without-decay", "if constexpr (BETA) a = __fadd_rn(__fmul_rn(rho, a), fire ? 1.0f : 0.0f);",
     "if constexpr (BETA) a = __fadd_rn(a, fire ? 1.0f : 0.0f);", r"forward s"),
    ("trace-rebuilt-one-step-late",
     "        trace[off] = a;\n        a = __fadd_rn(__fmul_rn(rho, a), lk_load(s + off));",
     "        a = __fadd_rn(__fmul_rn(rho, a), lk_load(s + off));\n        trace[off] = a;", r"grad_u"),
    ("trace-carry-without-beta", "ga = __fadd_rn(__fmul_rn(rho, ga), __fmul_rn(bc, gth));",
     "ga = __fadd_rn(__fmul_rn(rho, ga), gth);", r"grad_u"),
    ("soft-v-prev-with-theta0", "vp = fired ? __fsub_rn(hp, thp) : hp;", "vp = fired ? __fsub_rn(hp, th0) : hp;",
     r"grad_tau"),
    ("missing-barrier", "  red[3][tid] = acc_b;\n  __syncthreads();", "  red[3][tid] = acc_b;",
     r"grad_(gain|tau|theta0|beta)|reverse thread order"),
    ("early-return", "  const bool live = p < row_len;", "  const bool live = p < row_len;\n  if (!live) return;",
     r"returned -2"),
    ("partial-index", "const long long at_block = row * gridDim.y + blockIdx.y;",
     "const long long at_block = row + blockIdx.y;", r"NaN in the parameter gradients"),
]
# The cases the mutants run: soft and hard reset, beta and gain on and off, rows of several blocks.
MUTANT_CASES = [((4, 2, 2, 300, None), OPTS[2], (True, True)), ((6, 2, 2, 70, 32), OPTS[0], (True, False)),
                ((5, 2, 3, 35, None), OPTS[3], (False, True))]


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """{id: the fp32 CPU driver built from stm.cu with that mutation}, compiled two at a time."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    source = (CUDA_SRC / "stm.cu").read_text()
    jobs = []
    for mid, old, new, _ in MUTATIONS:
        assert source.count(old) == 1, f"mutation {mid}: its text is not in stm.cu exactly once"
        folder = tmp_path_factory.mktemp(f"mutant-{mid}")
        for name in ("cpu_shim.h", "cpu_driver.h", "stm_cpu_driver.cpp"):
            shutil.copy(CUDA_SRC / name, folder / name)
        (folder / "stm.cu").write_text(source.replace(old, new))
        jobs.append((mid, folder / "libmutant.so", folder / "stm_cpu_driver.cpp"))
    built, running = {}, []

    def finish(mid, out, proc):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"mutant {mid} does not compile: {err[-2000:]}"
        built[mid] = _load(out)

    for mid, out, driver in jobs:
        running.append((mid, out, _compile(out, driver, float_only=True)))
        if len(running) == 2:  # CI has two cores
            finish(*running.pop(0))
    for job in running:
        finish(*job)
    return built


def test_the_mutants_cases_pass_on_the_real_kernels(lib):
    for shape, opt, params in MUTANT_CASES:
        check_case(lib, shape, opt, torch.float32, *params)


@pytest.mark.parametrize("mid, expected", [(m[0], m[3]) for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_broken_kernels_are_caught(mutants, mid, expected):
    caught = []
    for shape, opt, params in MUTANT_CASES:
        try:
            check_case(mutants[mid], shape, opt, torch.float32, *params)
        except AssertionError as exc:
            caught.append(str(exc).splitlines()[0])
    assert caught, f"the mutant {mid} passed every check"
    assert all(re.search(expected, msg) for msg in caught), caught


# ------------------------------------------------------------------ the launcher, with its launch run on the CPU

_TYPES = {"float": 0, "lk_f16": 1, "lk_bf16": 2}


@pytest.fixture
def cpu_cuda_backend(lib, monkeypatch):
    """Makes the ``cuda`` backend run CPU tensors: the dispatcher's CuPy check passes, the launcher's device check
    is skipped, and each launch (template name, grid, block, argument tuple) goes to the CPU driver instead of
    CuPy."""
    from lrkern.kernels import cuda_stm

    launches = []

    def launch(name, device, grid, block, args):
        m = re.fullmatch(r"(stm_fwd|stm_bwd)<(\w+), (.*)>", name)
        assert m, name
        flags = [{"true": 1, "false": 0}[f] for f in m.group(3).split(", ")]
        for a in args:  # pointers are ints, sizes int64, every scalar already rounded to fp32 on the host
            assert isinstance(a, (int, np.int64, np.int32, np.float32)), (name, type(a))
        conv = [int(a) if isinstance(a, np.integer) else float(a) if isinstance(a, np.floating) else (a or None)
                for a in args]
        assert len(grid) == 2 and block & (block - 1) == 0 and block <= cuda_stm.MAX_BLOCK, (grid, block)
        fn = lib.lk_stm_fwd if m.group(1) == "stm_fwd" else lib.lk_stm_bwd
        assert fn(_TYPES[m.group(2)], *flags, *conv, *grid, block, False) == 0
        launches.append(name)

    monkeypatch.setattr(_dispatch, "cupy_unavailable", lambda device: None)
    monkeypatch.setattr(cuda_stm, "_launch", launch)
    monkeypatch.setattr(cuda_stm, "_check", lambda name, t, dtypes: None if t.dtype in dtypes else pytest.fail(name))
    return launches


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", OPTS[:4], ids=OPT_IDS[:4])
def test_launcher_through_the_op_and_autograd(cpu_cuda_backend, opt, dtype):
    v_reset, decay_input, detach, sur, alpha = opt
    u, v0, gain, tau, theta0, beta = _inputs((5, 2, 3, 300), dtype, True, True)
    u = u.view(5, 2, 3, 20, 15)
    v0 = v0.view(2, 3, 20, 15)
    leaves = [t.clone().requires_grad_(True) for t in (u, v0, gain, tau, theta0, beta)]
    outs, grads = {}, {}
    for backend in ("cuda", "reference"):
        with lrkern.use_backend(backend):
            s, v_last, h = torch.ops.lrkern.stm_multistep(*leaves, RHO, v_reset, sur, alpha, detach, decay_input)
            w = torch.arange(s[0].numel()).reshape(s.shape[1:]) % 7 - 3.0
            g = torch.autograd.grad((s.float() * w).sum() + v_last.sum(), leaves)
        outs[backend], grads[backend] = (s, v_last, h), g
    for a, b in zip(outs["cuda"], outs["reference"]):
        assert torch.equal(a, b)
    tol = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    for name, a, b in zip(("u", "v0", "gain", "tau", "theta0", "beta"), grads["cuda"], grads["reference"]):
        assert not a.isnan().any() and err_ratio(a, b) <= (tol if name == "u" else 1e-5), name
    ctype = {torch.float32: "float", torch.float16: "lk_f16", torch.bfloat16: "lk_bf16"}[dtype]
    flags = ", ".join("true" if f else "false" for f in (v_reset is None, decay_input))
    assert cpu_cuda_backend == [f"stm_fwd<{ctype}, {flags}, true>",
                                f"stm_bwd<{ctype}, {flags}, true, {str(sur == 'atan').lower()}, true>"]


def test_launcher_without_u_gain_or_beta(cpu_cuda_backend):
    """Only theta0 wants a gradient: autograd keeps no u, so the backward runs without PARAMS (and without beta)."""
    u, v0, _, tau, theta0, _ = _inputs((4, 2, 3, 35), torch.float32, False, False)
    theta0.requires_grad_(True)
    grads = []
    for backend in ("cuda", "reference"):
        with lrkern.use_backend(backend):
            s, v_last, _ = torch.ops.lrkern.stm_multistep(u, None, None, tau, theta0, None, RHO, None, "atan", 2.0,
                                                          False, True)
            grads.append(torch.autograd.grad(s.sum() + v_last.sum(), theta0)[0])
    assert err_ratio(grads[0], grads[1]) <= 1e-5 and grads[0].abs().sum() > 0
    assert cpu_cuda_backend == ["stm_fwd<float, true, true, false>", "stm_bwd<float, true, true, false, true, false>"]


def test_opcheck_on_the_cuda_backend(cpu_cuda_backend):
    u, v0, gain, tau, theta0, beta = _inputs((3, 2, 3, 6), torch.float32, True, True)
    with lrkern.use_backend("cuda"):
        s, _, h = torch.ops.lrkern.stm_multistep(u, None, gain, tau, theta0, beta, RHO, 0.0, "sigmoid", 4.0, False,
                                                 True)
        torch.library.opcheck(torch.ops.lrkern.stm_multistep.default,
                              (u.requires_grad_(True), None, gain, tau, theta0, beta, RHO, 0.0, "sigmoid", 4.0,
                               False, True))
        torch.library.opcheck(torch.ops.lrkern.stm_multistep_backward.default,
                              (torch.randn_like(s), torch.randn_like(v0), u.detach(), v0, h, s, gain, tau, theta0,
                               beta, RHO, None, "atan", 2.0, True, False))
    assert cpu_cuda_backend and all(n.startswith(("stm_fwd<float", "stm_bwd<float")) for n in cpu_cuda_backend)


def test_launcher_geometry_and_errors():
    from lrkern.kernels import cuda_stm

    assert [cuda_stm._block(s) for s in (1, 7, 32, 33, 36, 64, 65, 256, 257, 5000)] == [
        32, 32, 32, 64, 64, 64, 128, 256, 256, 256]
    assert cuda_stm._grid(6, 300) == ((6, 2), 256)
    with pytest.raises(ValueError, match=r"cuda_stm: rows of S = 16777217 neurons .* at most 16776960 per \(b, c\)"):
        cuda_stm._grid(1, 2**24 + 1)
    with pytest.raises(ValueError, match=r"surrogate_kind must be 0 \(sigmoid\) or 1 \(atan\), got 2"):
        cuda_stm.stm_backward(*[None] * 15, 2, 1.0)
    x = torch.zeros(2, 1, 1, 3)
    with pytest.raises(ValueError, match=r"cuda_stm: u must be a contiguous CUDA tensor of dtype torch.float32 or "
                                         r"torch.float16 or torch.bfloat16, got torch.float32 on cpu"):
        cuda_stm.stm_forward(x, x[0], None, x[0, 0, 0, :1], x[0, 0, 0, :1], None, RHO, 0.0, False, True)


# ------------------------------------------------------------------ the source, the registration, NVRTC

def test_helpers_shared_with_lif_are_verbatim():
    def common(name):
        text = (CUDA_SRC / name).read_text()
        return text[text.index("// lk-common begin"):text.index("// lk-common end")]

    assert common("stm.cu") == common("lif.cu")


def test_launcher_imports_without_cupy_and_finds_its_source():
    code = "import sys, lrkern.kernels.cuda_stm, lrkern.ops.stm; assert 'cupy' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]  # CuPy is imported only when a kernel launches
    from lrkern.kernels import cuda_stm

    assert cuda_stm.source_path() == CUDA_SRC / "stm.cu"
    assert "stm_fwd" in cuda_stm._code() and "stm_bwd" in cuda_stm._code()
    assert f"#define LK_STM_MAX_BLOCK {cuda_stm.MAX_BLOCK}\n" in cuda_stm._code()


def test_cuda_backend_is_registered_but_never_automatic(monkeypatch):
    from lrkern.kernels import cuda_stm
    from lrkern.ops import stm as stm_ops

    assert stm_ops._fwd.implementation("cuda") is cuda_stm.stm_forward
    assert stm_ops._bwd.implementation("cuda") is cuda_stm.stm_backward
    monkeypatch.delenv("LRKERN_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "cupy_unavailable", lambda device: None)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert lrkern.select_backend(torch.device("cuda")) == "triton"
    u, _, _, tau, theta0, _ = _inputs((2, 1, 1, 3), torch.float32, False, False)
    monkeypatch.undo()
    with lrkern.use_backend("cuda"), pytest.raises(RuntimeError, match=r"backend 'cuda' was forced but cannot run"):
        torch.ops.lrkern.stm_multistep(u, None, None, tau, theta0, None, RHO, 0.0, "sigmoid", 4.0, False, True)


def test_nvrtc_compiles_every_instantiation_for_sm90_without_spills(tmp_path):
    from lrkern.kernels import _cuda_c, cuda_stm

    nvrtc = nvrtc_library()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12 to compile stm.cu for sm_90 here)")
    names = instantiations("stm_fwd", "stm_bwd")
    text, lowered = compile_ptx(nvrtc, cuda_stm.source_path().read_bytes(), "stm.cu", names, _cuda_c.OPTIONS)
    # Every product and sum is rounded on its own, as in the reference: no fp32 FMA in the forward or the atan
    # backward. (The sigmoid backward has the FMAs of CUDA's expf, which --fmad=false does not touch.)
    entries = dict(re.findall(r"\.entry (_Z7stm_(?:fwd|bwd)\w+)\((.*?\n\})", text, flags=re.S))
    assert set(entries) == set(lowered)
    exact = [low for low, name in lowered.items() if name.startswith("stm_fwd") or name.split(", ")[4] == "true"]
    assert len(exact) == 24 + 48 and not any("fma.rn.f32" in entries[low] for low in exact)
    stats = ptxas_sm90(text, tmp_path, "stm")
    assert {lowered[name] for name, _, _ in stats} == set(names)
    # 256 threads of at most 64 registers: 4 blocks (half the threads an H100 SM holds) stay resident.
    assert all(spill == 0 and regs <= 64 for _, spill, regs in stats), stats
