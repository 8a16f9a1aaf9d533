"""Backend selection: the one place where an op chooses its implementation.

Default: CUDA tensors -> Triton, CPU tensors -> C++ when ``lrkern._C`` is built, else the reference.
``LRKERN_BACKEND=reference|triton|cpp|cuda`` forces one for every op, and ``lrkern.use_backend(name)`` does the same
inside a ``with`` block (it wins over the variable, and reaches threads that do not inherit the caller's context,
such as autograd's device threads, while the block is active). A forced backend that cannot run the given tensor raises
instead of falling back, so a benchmark or test never measures something other than what it asked for.

Triton runs CPU tensors only under ``TRITON_INTERPRET=1``, which must be set before Triton is first imported.

``cuda`` is CUDA C from the project's sources (``csrc/cuda``), compiled at run time by CuPy (an optional dependency);
only some ops have it (``lif_multistep``, ``stm_multistep``), and automatic selection never picks it: it runs
only when forced.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator

import torch

from lrkern import _ext

BACKENDS = ("reference", "triton", "cpp", "cuda")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("lrkern_backend", default=None)
# The innermost active ``use_backend`` for threads that do not inherit the caller's context: autograd runs CUDA
# backward passes on its own device threads, where the contextvar above reads its default.
_forced_stack: list[str] = []


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``LRKERN_BACKEND``, or None for automatic selection."""
    name = _forced.get()
    if name is not None:
        return name
    if _forced_stack:
        return _forced_stack[-1]
    env = os.environ.get("LRKERN_BACKEND", "").strip()
    return _check_name(env, "LRKERN_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every lrkern op called inside the block (also in threads it spawns via contextvars)."""
    token = _forced.set(_check_name(name, "backend"))
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()
        _forced.reset(token)


def forced_scope(name: str | None):
    """``use_backend(name)``, or no-op for None: autograd backward functions re-enter the backend their forward was
    forced to (saved in ctx), so a module that forces a backend around its forward call gets it for backward too."""
    return use_backend(name) if name is not None else contextlib.nullcontext()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_ok: bool | None = None


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


# A kernel that needs nothing: compiling and launching it shows that CuPy, NVRTC and the driver work together.
_CUPY_PROBE = 'extern "C" __global__ void lrkern_cupy_probe(float* p) { if (p) p[threadIdx.x] = 1.0f; }'
_cupy_reasons: dict[int, str | None] = {}  # device index -> why CuPy cannot run CUDA C there (None: it can)


def cupy_unavailable(device: torch.device) -> str | None:
    """None when CuPy imports and can compile and launch CUDA C on ``device`` (checked once per device), else the
    reason, with the real error message."""
    if device.type != "cuda":
        return f"the CUDA C backend runs CUDA tensors only (got {device})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _cupy_reasons:
        return _cupy_reasons[index]
    wheel = f"cupy-cuda{torch.version.cuda.split('.')[0]}x" if torch.version.cuda else "cupy-cuda12x"
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA failing at import
        reason = (f"CuPy does not import ({type(exc).__name__}: {exc}); install the wheel for torch's CUDA, e.g. "
                  f"`pip install {wheel}`")
    else:
        try:
            with cupy.cuda.Device(index):
                kernel = cupy.RawKernel(_CUPY_PROBE, "lrkern_cupy_probe", options=("--fmad=false", "-std=c++17"))
                kernel((1,), (1,), (0,))
                cupy.cuda.Device(index).synchronize()
            reason = None
        except Exception as exc:  # NVRTC missing or too old for the driver, no kernel image, ...
            version = getattr(cupy, "__version__", "?")
            reason = (f"CuPy {version} cannot compile and launch CUDA C on cuda:{index} ({type(exc).__name__}: "
                      f"{exc}); check that the CuPy wheel matches torch's CUDA ({wheel})")
    _cupy_reasons[index] = reason
    return reason


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run tensors on ``device``, else the reason."""
    if name == "reference":
        return None
    if name == "cuda":
        return cupy_unavailable(device)
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors only (got {device})"
        if _ext.cpp() is None:
            return f"the C++ extension lrkern._C is not built ({_ext.load_error()})"
        return None
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"the Triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors (got {device})"


def select_backend(device: torch.device) -> str:
    """The backend an op will use for tensors on ``device``."""
    name = forced_backend()
    if name is not None:
        reason = why_unavailable(name, device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} was forced but cannot run here: {reason}")
        return name
    if device.type == "cuda" and why_unavailable("triton", device) is None:
        return "triton"  # never "cuda": that one runs only when forced
    if device.type == "cpu" and _ext.cpp() is not None:
        return "cpp"
    return "reference"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


class Dispatcher:
    """Maps one op to its implementations, named as ``"module:function"`` and imported on first use.

    Every implementation takes the op's (validated, contiguous) arguments and returns freshly allocated outputs.
    """

    def __init__(self, op: str, *, reference: str, triton: str | None = None, cpp: str | None = None,
                 cuda: str | None = None):
        self.op = op
        self._targets = {"reference": reference, "triton": triton, "cpp": cpp, "cuda": cuda}
        self._resolved: dict[str, Callable] = {}

    def implementation(self, backend: str) -> Callable:
        fn = self._resolved.get(backend)
        if fn is None:
            target = self._targets[backend]
            if target is None:
                raise NotImplementedError(f"lrkern::{self.op} has no {backend} implementation")
            module, attr = target.split(":")
            fn = getattr(importlib.import_module(module), attr)
            self._resolved[backend] = fn
        return fn

    def __call__(self, device: torch.device, *args):
        return self.implementation(select_backend(device))(*args)
