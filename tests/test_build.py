"""The test command declares which backends it expects (LRKERN_EXPECT_BACKENDS); a missing one fails loudly here
instead of its tests being skipped."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import lrkern

EXPECTED = [b for b in os.environ.get("LRKERN_EXPECT_BACKENDS", "").split(",") if b]


@pytest.mark.parametrize("name", EXPECTED or ["reference"])
def test_expected_backend_is_available(name):
    device = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
    reason = lrkern.ops._dispatch.why_unavailable(name, device)
    assert reason is None, f"backend {name!r} expected by the test command but unavailable: {reason}"


def test_kernels_is_not_a_top_level_module():
    # transformers probes for the unrelated PyPI project `kernels`; lrkern's Triton package must live under lrkern.
    # The test runs with the repo root on sys.path, which is exactly where a shadowing folder would be found.
    repo = str(Path(__file__).resolve().parent.parent)
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not (spec.origin or "").startswith(repo + "/kernels"), spec
    import lrkern.kernels  # noqa: F401
