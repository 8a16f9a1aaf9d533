"""Backend selection: the one place where an op chooses its implementation.

Default: CUDA tensors -> Triton, CPU tensors -> C++ when ``lrkern._C`` is built, else the reference.
``LRKERN_BACKEND=reference|triton|cpp`` forces one for every op, and ``lrkern.use_backend(name)`` does the same
inside a ``with`` block (it wins over the variable, and reaches threads that do not inherit the caller's context,
such as autograd's device threads, while the block is active). A forced backend that cannot run the given tensor raises
instead of falling back, so a benchmark or test never measures something other than what it asked for.

Triton runs CPU tensors only under ``TRITON_INTERPRET=1``, which must be set before Triton is first imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Iterator

import torch

from lrkern import _ext

BACKENDS = ("reference", "triton", "cpp")
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


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run tensors on ``device``, else the reason."""
    if name == "reference":
        return None
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
        return "triton"
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

    def __init__(self, op: str, *, reference: str, triton: str | None = None, cpp: str | None = None):
        self.op = op
        self._targets = {"reference": reference, "triton": triton, "cpp": cpp}
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
