"""NVRTC + ptxas compilation of lrkern's CUDA C sources for sm_90 without a GPU (optional tests: they need the
``nvidia-cuda-nvrtc-cu12`` wheel for NVRTC, and Triton's bundled ptxas for the register / spill report). Shared by
tests/test_lif_cuda_source.py and tests/test_stm_cuda_source.py."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

FLAGS = ("false", "true")
STORAGE_TYPES = ("float", "lk_f16", "lk_bf16")


def nvrtc_library():
    """The NVRTC shared library (ctypes), or None when it is not installed."""
    try:
        import nvidia.cuda_nvrtc as pkg  # the nvidia-cuda-nvrtc-cu12 wheel
        libs = sorted(Path(list(pkg.__path__)[0], "lib").glob("libnvrtc.so*"))
    except ImportError:
        libs = []
    found = ctypes.util.find_library("nvrtc")
    for path in [str(p) for p in libs if "alt" not in p.name] + ([found] if found else []):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def instantiations(fwd: str, bwd: str) -> list[str]:
    """Every ``fwd<type, 3 flags>`` and ``bwd<type, 5 flags>`` template instantiation of a neuron source."""
    f = FLAGS
    return ([f"{fwd}<{t}, {a}, {b}, {c}>" for t in STORAGE_TYPES for a in f for b in f for c in f]
            + [f"{bwd}<{t}, {a}, {b}, {c}, {d}, {e}>" for t in STORAGE_TYPES for a in f for b in f for c in f
               for d in f for e in f])


def compile_ptx(nvrtc, source: bytes, filename: str, names: list[str], options) -> tuple[str, dict[str, str]]:
    """NVRTC-compile ``source`` for compute_90 with ``options`` and every template in ``names``: (PTX text,
    {lowered (mangled) name: name})."""
    prog = ctypes.c_void_p()
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(rc, what):
        assert rc == 0, f"{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}"

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, filename.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), name)
        opts = [o.encode() for o in options] + [b"--gpu-architecture=compute_90"]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode()
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            check(nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), name)
            lowered[out.value.decode()] = name
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(ctypes.c_void_p(prog.value)))
    return ptx.value.decode(), lowered


def ptxas_sm90(ptx: str, tmp_path: Path, stem: str) -> list[tuple[str, int, int]]:
    """Assemble ``ptx`` for sm_90 with Triton's ptxas: [(mangled entry name, spill store bytes, registers)]. Skips the
    calling test when Triton's ptxas is missing."""
    spec = importlib.util.find_spec("triton")
    ptxas = Path(spec.origin if spec else ".").parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"NVRTC compiled {stem}.cu; Triton's ptxas ({ptxas}) is missing for the sm_90 assembly")
    (tmp_path / f"{stem}.ptx").write_text(ptx)
    run = subprocess.run([str(ptxas), "-arch=sm_90", "-v", str(tmp_path / f"{stem}.ptx"), "-o",
                          str(tmp_path / f"{stem}.cubin")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                       run.stderr, flags=re.S)
    return [(name, int(spill), int(regs)) for name, spill, regs in stats]
