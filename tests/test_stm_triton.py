"""Triton STM launchers (``lrkern.kernels.stm``) against ``lrkern.reference.stm``, at the launch-geometry edges.

The op-level comparison of every backend is in test_stm.py; here: the block size rule, a row split over two programs
(S = 1030 at BLOCK 1024: the second program has 6 live lanes, and the per-program parameter sums are added on the
host), firing exactly at a dynamic threshold, and an empty time axis. The reference runs on CPU (see
test_lif_triton.py: on CUDA torch divides by a scalar as a reciprocal multiply).
"""
import math

import pytest
import torch

from lrkern.reference import stm as ref
from tests.helpers import assert_close

RHO = math.exp(-0.25)


def test_block_sizes():
    from lrkern.kernels.stm import _block, _num_warps

    assert [_block(s) for s in (1, 7, 16, 35, 36, 1024, 1030, 5000)] == [16, 16, 16, 64, 64, 1024, 1024, 1024]
    assert _num_warps(16) == 1 and _num_warps(1024) == 4


def _inputs(shape, dtype):
    t, b, c, s = shape
    u = (torch.randn(shape) * 1.5 + 0.6).to(dtype)
    v0 = torch.randn(b, c, s) * 0.3
    gain = 0.6 + torch.rand(b, c)
    tau, theta0, beta = 1.5 + torch.rand(c), 0.8 + 0.4 * torch.rand(c), 0.2 + 0.5 * torch.rand(c)
    return u, v0, gain, tau, theta0, beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_over_two_programs(kdevice, dtype):
    from lrkern.kernels.stm import stm_backward, stm_forward

    u, v0, gain, tau, theta0, beta = _inputs((3, 1, 2, 1030), dtype)
    args = (RHO, -0.2, False, True)
    want = ref.stm_forward(u, v0, gain, tau, theta0, beta, *args)
    dev = [t.to(kdevice) for t in (u, v0, gain, tau, theta0, beta)]
    got = stm_forward(*dev, *args)
    for name, g, w in zip(("s", "h", "v_last"), got, want):
        assert torch.equal(g.cpu(), w), name
    s, h, _ = want
    gs, gv = torch.randn_like(u), torch.randn_like(v0)
    bargs = (RHO, -0.2, False, True, False, ref.SIGMOID, 4.0)
    want = ref.stm_backward(gs, gv, u, v0, h, s, gain, tau, theta0, beta, *bargs)
    cpu = (gs, gv, u, v0, h, s, gain, tau, theta0, beta)
    got = stm_backward(*[t.to(kdevice) for t in cpu], *bargs)
    assert_close(got[0].cpu(), want[0], dtype)
    assert_close(got[1].cpu(), want[1], torch.float32)
    assert_close(got[2].cpu(), want[2], torch.float32)


@pytest.mark.parametrize("soft_reset", [False, True], ids=["hard", "soft"])
def test_fires_at_the_dynamic_threshold(kdevice, soft_reset):
    from lrkern.kernels.stm import stm_forward

    # tau = 2, v0 = 0, decay_input, no gain: t = 0: H = u / 2 = 0.5 = theta0 fires (non-strict) on both lanes, trace 1.
    # Hard reset: V = 0, so at t = 1 H = u / 2 against theta = 0.5 + 0.25 * 1 = 0.75: 1.5 fires, the float below
    # does not. Soft reset: V = 0, the same.
    on = 1.5
    below = torch.nextafter(torch.tensor(on), torch.tensor(0.0)).item()
    u = torch.tensor([[1.0, 1.0], [on, below]]).view(2, 1, 1, 2)
    params = (torch.zeros(1, 1, 2), None, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    args = (0.5, 0.0, soft_reset, True)
    s, h, _ = stm_forward(u.to(kdevice), *[None if p is None else p.to(kdevice) for p in params], *args)
    want = ref.stm_forward(u, *params, *args)
    assert torch.equal(s.cpu(), want[0]) and torch.equal(h.cpu(), want[1])
    assert s.flatten().tolist() == [1.0, 1.0, 1.0, 0.0] and h[1, 0, 0, 0].item() == 0.75


def test_empty_time_axis(kdevice):
    from lrkern.kernels.stm import stm_backward

    h = torch.empty(0, 2, 3, 4, device=kdevice)
    g = torch.randn(2, 3, 4, device=kdevice)
    c = torch.ones(3, device=kdevice)
    grad_u, grad_v0, grad_params = stm_backward(h, g, h, g, h, h, None, c, c, c, RHO, 0.0, False, True, False,
                                                ref.SIGMOID, 4.0)
    assert grad_u.shape == (0, 2, 3, 4) and torch.equal(grad_v0, g)
    assert grad_params.shape == (4, 2, 3) and not grad_params.any()
