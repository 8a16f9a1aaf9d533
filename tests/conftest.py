"""Test configuration: CPU-first. On a machine without CUDA, Triton kernels run on CPU under the interpreter."""
import os

import torch

# Both must be set before anything imports triton or allocates outputs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LRKERN_POISON_EMPTY", "1")

import pytest  # noqa: E402

import lrkern  # noqa: E402
from lrkern.ops._dispatch import BACKENDS, why_unavailable  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """Each backend that can run on ``device``; forced for the duration of the test. The ``cuda`` backend (CUDA C
    through CuPy) exists for a few ops only: it runs in test modules that set ``CUDA_C_OPS = True``."""
    if request.param == "cuda" and not getattr(request.module, "CUDA_C_OPS", False):
        pytest.skip("this module's ops have no CUDA C implementation")
    reason = why_unavailable(request.param, device)
    if reason is not None:
        pytest.skip(reason)  # test_build.py fails the run when an expected backend is missing
    with lrkern.use_backend(request.param):
        yield request.param


@pytest.fixture
def kdevice(device):
    """``device`` for tests that call Triton launchers directly: skipped where Triton cannot run (CPU without
    TRITON_INTERPRET=1); test_build.py fails the run when Triton was expected."""
    reason = why_unavailable("triton", device)
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
