"""What the CUDA C launchers (``cuda_lif``, ``cuda_stm``) share: finding a kernel source, compiling a template
instantiation with CuPy's NVRTC (cached), and launching on torch's current stream.

Sources are ``csrc/cuda/<name>.cu`` in the source tree (editable installs, the repo), else the copy that setup.py's
build_py ships as ``lrkern/_cuda/<name>.cu``. Each is self-contained (no includes), so NVRTC needs no include path.
Every instantiation is compiled on first use with ``OPTIONS`` and cached in memory here (CuPy also caches binaries on
disk under ``~/.cupy/kernel_cache``). CuPy is imported only when a kernel is compiled or launched, so the launchers
import without it.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

# NVRTC options: no FMA contraction (the kernels also use the *_rn intrinsics), C++17 for `if constexpr`.
OPTIONS = ("--fmad=false", "-std=c++17")
# torch dtype -> the kernels' storage type (16-bit types are structs of their bits, see lk-common in the sources).
CTYPES = {torch.float32: "float", torch.float16: "lk_f16", torch.bfloat16: "lk_bf16"}

_lock = threading.Lock()
_sources: dict[str, str] = {}
_kernels: dict[tuple[str, str], object] = {}  # (file, name expression) -> cupy.RawKernel (binary cached per device)
_streams: dict[tuple[int, int], object] = {}


def source_path(filename: str) -> Path:
    """``filename`` (e.g. ``"lif.cu"``) in ``csrc/cuda`` of the source tree, else in the package's ``_cuda``."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "csrc" / "cuda" / filename, here.parents[1] / "_cuda" / filename]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the CUDA C source {filename} was not found; looked in "
                            + ", ".join(map(str, candidates)))


def code(filename: str) -> str:
    text = _sources.get(filename)
    if text is None:
        text = _sources[filename] = source_path(filename).read_text()
    return text


def flag(b: bool) -> str:
    """A bool as a template argument."""
    return "true" if b else "false"


def kernel(filename: str, name: str):
    """The RawKernel for template instantiation ``name`` of ``filename`` (compiled for the current device on its
    first launch)."""
    key = (filename, name)
    found = _kernels.get(key)
    if found is None:
        import cupy

        with _lock:
            found = _kernels.get(key)
            if found is None:
                module = cupy.RawModule(code=code(filename), options=OPTIONS, name_expressions=[name])
                found = _kernels[key] = module.get_function(name)
    return found


def _stream(index: int):
    """torch's current stream on device ``index`` as a CuPy stream (call with that device current in CuPy)."""
    import cupy

    ptr = torch.cuda.current_stream(index).cuda_stream
    stream = _streams.get((index, ptr))
    if stream is None:
        stream = _streams[(index, ptr)] = cupy.cuda.ExternalStream(ptr)
    return stream


def launch(filename: str, name: str, device: torch.device, grid: tuple, block: tuple, args: tuple) -> None:
    """Launches instantiation ``name`` of ``filename`` over ``grid`` x ``block`` on torch's current stream of
    ``device``: ordered with the torch work around it, and no synchronisation."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        fn = kernel(filename, name)
        with _stream(index):  # the launch goes to CuPy's current stream, which is now torch's
            fn(grid, block, args)


def check(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    """Raises ValueError unless ``t`` is a contiguous CUDA tensor of one of ``dtypes``."""
    if t.device.type != "cuda" or not t.is_contiguous() or t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor of dtype "
                         f"{' or '.join(map(str, dtypes))}, got {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (non-contiguous)'}")
