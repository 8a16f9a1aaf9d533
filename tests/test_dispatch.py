import importlib

import pytest
import torch

import lrkern
from lrkern import _ext
from lrkern.ops import _dispatch


def test_default_cpu_backend_is_cpp_when_built(monkeypatch):
    monkeypatch.delenv("LRKERN_BACKEND", raising=False)
    expected = "cpp" if _ext.cpp() is not None else "reference"
    assert lrkern.select_backend(torch.device("cpu")) == expected


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("LRKERN_BACKEND", "reference")
    assert lrkern.select_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("LRKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"LRKERN_BACKEND='fastest' is not a backend"):
        lrkern.hadamard(torch.randn(2, 8))


def test_context_manager_wins_over_env(monkeypatch):
    monkeypatch.setenv("LRKERN_BACKEND", "reference")
    with lrkern.use_backend("triton"):
        assert _dispatch.forced_backend() == "triton"
    assert _dispatch.forced_backend() == "reference"
    with pytest.raises(ValueError, match=r"backend='cupy' is not a backend"):
        with lrkern.use_backend("cupy"):
            pass


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with lrkern.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"backend 'triton' was forced but cannot run here: .*TRITON_INTERPRET"):
            lrkern.hadamard(torch.randn(2, 8))
    monkeypatch.setattr(_ext, "_C", None)
    with lrkern.use_backend("cpp"):
        with pytest.raises(RuntimeError, match=r"backend 'cpp' was forced .* not built"):
            lrkern.quant_pack(torch.randn(2, 8), 2, 4, -1)


def test_dispatch_really_calls_the_selected_backend(monkeypatch):
    calls = []
    disp = importlib.import_module("lrkern.ops.hadamard")._impl  # the attribute lrkern.ops.hadamard is the op
    for name in lrkern.available_backends("cpu"):
        real = disp.implementation(name)
        monkeypatch.setitem(disp._resolved, name, lambda x, _n=name, _f=real: calls.append(_n) or _f(x))
        with lrkern.use_backend(name):
            lrkern.hadamard(torch.randn(2, 8))
    assert calls == lrkern.available_backends("cpu")


def test_poisoned_allocation_is_active():
    from lrkern import _alloc

    assert _alloc.poisoning()
    assert torch.isnan(_alloc.empty((4,), torch.float32, torch.device("cpu"))).all()
    assert (_alloc.empty((4,), torch.uint8, torch.device("cpu")) == 0xA5).all()


def test_forced_backend_reaches_threads_that_do_not_inherit_the_context(monkeypatch):
    """Autograd runs CUDA backward on its own threads; a forced backend must still apply there."""
    import threading

    monkeypatch.delenv("LRKERN_BACKEND", raising=False)
    seen = []
    with lrkern.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(_dispatch.forced_backend()))
        t.start()
        t.join()
    assert seen == ["reference"]
    assert _dispatch.forced_backend() is None  # and nothing is left behind after the block
