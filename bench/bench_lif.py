"""Multi-step LIF, forward + backward: ``torch.ops.lrkern.lif_multistep`` on each backend that can run here against a
PyTorch time loop (eager per-step ops with autograd through the loop, the way an unfused SNN layer runs; its spike
function is a surrogate-gradient autograd.Function, as in SpikingJelly's ``torch`` backend).

One timed call = forward over T steps of x [T, N] + backward of sum(spikes * g) to x. Rows are appended to
``bench/results/lif.jsonl`` with ``device, provider, T, N, dtype, ms_fwd_bwd`` (+ p20/p80, commit, date), and the
speed-up against the loop is printed. Issue targets: CPU C++ >= 3x the loop at T = 16; GPU >= 10x at T = 16,
N = 2^22, and faster than SpikingJelly (a ``spikingjelly ...`` row when it imports: its fastest backend here).
lrkern's ``cuda`` backend (CUDA C via CuPy) gets rows where CuPy works.

STM (``--op stm``; spec 3.2 with a hard reset, the sigmoid surrogate, a gain and beta != 0, the same maths in the op
and the loop): one timed call = forward over u [T, B, C, h, w] + backward of sum(spikes * g) to u, gain, tau, theta0
and beta, at T = 16 on a video-like shape [16, 8, 128, 6, 6] and a big one [16, 16, 64, 32, 32]. Its rows carry
``op: "stm"`` and ``shape`` besides the fields above, and their providers are ``stm torch loop`` /
``stm lrkern <backend>``.

    python bench/bench_lif.py [--device cpu|cuda|auto] [--op all|lif|stm] [--quick] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrkern
from bench.common import RESULTS, bench_backends, bench_ms, metadata
from lrkern.reference.lif import SIGMOID, surrogate

OUT = RESULTS / "lif.jsonl"


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * surrogate(z, SIGMOID, 4.0)


def torch_loop(x: torch.Tensor, tau: float = 2.0, vth: float = 1.0) -> torch.Tensor:
    """SpikingJelly LIFNode defaults (hard reset to 0, decay_input) as an eager time loop."""
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        h = v + (x[t] - v) / tau
        s = _Spike.apply(h - vth)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


def lrkern_lif(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.lrkern.lif_multistep(x, None, 2.0, 1.0, 0.0, "sigmoid", 4.0, False, True, False)[0]


def spikingjelly_lif(device: torch.device):
    """(provider label, fn) for SpikingJelly's multi-step LIFNode (same defaults) at its fastest backend here, or
    None when SpikingJelly does not import. Versions with a ``backend`` argument (0.0.0.0.x) get 'cupy' where
    CuPy works (else 'torch'); 2.x picks its own kernels. Its state is reset before every call, as between batches."""
    try:
        import importlib.metadata
        import inspect

        from spikingjelly.activation_based import functional, neuron
    except Exception:  # not installed, or broken: the row is left out
        return None
    from lrkern.ops import _dispatch

    try:
        version = importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:  # on sys.path without being installed
        version = ""
    kw, label = {}, f"spikingjelly {version}".strip()
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        supported = neuron.LIFNode(step_mode="m").supported_backends
        kw["backend"] = next((b for b in ("triton", "cupy") if b in supported and
                              (b != "cupy" or _dispatch.cupy_unavailable(device) is None)), "torch")
        label += f" {kw['backend']}"
    node = neuron.LIFNode(step_mode="m", **kw).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(node)
        return node(x)
    return label, run


def fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor):
    def run():
        xr = x.detach().requires_grad_(True)
        (fn(xr) * g).sum().backward()
        return xr.grad
    return run


RHO = math.exp(-0.25)


def stm_torch_loop(u: torch.Tensor, gain: torch.Tensor, tau: torch.Tensor, theta0: torch.Tensor,
                   beta: torch.Tensor) -> torch.Tensor:
    """The STM (spec 3.2: hard reset to 0, decay_input, dynamic threshold, gain) as an eager time loop."""
    tail = (1,) * (u.dim() - 3)
    g, tc = gain.view(*gain.shape, *tail), tau.view(-1, *tail)
    th0, b = theta0.view(-1, *tail), beta.view(-1, *tail)
    v = torch.zeros_like(u[0], dtype=torch.float32)
    a = torch.zeros_like(v)
    out = []
    for t in range(u.shape[0]):
        h = v + (g * u[t] - v) / tc
        s = _Spike.apply(h - (th0 + b * a))
        v = h * (1 - s)
        a = RHO * a + s
        out.append(s)
    return torch.stack(out).to(u.dtype)


def lrkern_stm(u, gain, tau, theta0, beta) -> torch.Tensor:
    return torch.ops.lrkern.stm_multistep(u, None, gain, tau, theta0, beta, RHO, 0.0, "sigmoid", 4.0, False, True)[0]


def stm_fwd_bwd(fn, u: torch.Tensor, params, g: torch.Tensor):
    """One call: forward, then backward to u and every parameter; returns the gradients."""
    def run():
        leaves = [u.detach().requires_grad_(True)] + [p.detach().requires_grad_(True) for p in params]
        (fn(*leaves) * g).sum().backward()
        return [t.grad for t in leaves]
    return run


def bench_stm(device, backends, meta, quick: bool) -> list[dict]:
    """STM rows (``op: "stm"``, providers ``stm torch loop`` / ``stm lrkern <backend>``): the eager loop and each
    backend that implements the op, at a video-like shape and a big one (T = 16)."""
    from lrkern.ops import stm as stm_ops

    backends = [b for b in backends if stm_ops._fwd._targets.get(b) is not None]  # those the op has
    shapes = [(16, 8, 128, 6, 6)] if quick else [(16, 8, 128, 6, 6), (16, 16, 64, 32, 32)]
    dtypes = [torch.float32, torch.float16] if device.type == "cuda" else [torch.float32]
    rows = []
    for shape in shapes:
        T, B, C = shape[:3]
        N = math.prod(shape[1:])
        for dtype in dtypes:
            u = (torch.randn(shape, device=device) * 1.5 + 0.5).to(dtype)
            g = torch.randn(shape, device=device).to(dtype)
            params = [1.0 + 0.5 * torch.rand(B, C, device=device), torch.full((C,), 2.0, device=device),
                      torch.ones(C, device=device), torch.full((C,), 0.3, device=device)]
            base = dict(meta, op="stm", T=T, N=N, shape=list(shape), dtype=str(dtype).removeprefix("torch."))
            loop_ms = bench_ms(stm_fwd_bwd(stm_torch_loop, u, params, g), device)[0]
            rows.append(dict(base, provider="stm torch loop", ms_fwd_bwd=loop_ms))
            ref = stm_fwd_bwd(stm_torch_loop, u, params, g)()
            for b in backends:
                with lrkern.use_backend(b):
                    got = stm_fwd_bwd(lrkern_stm, u, params, g)()
                    err = max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(got, ref))
                    med, p20, p80, _ = bench_ms(stm_fwd_bwd(lrkern_stm, u, params, g), device)
                rows.append(dict(base, provider=f"stm lrkern {b}", ms_fwd_bwd=med, p20=p20, p80=p80,
                                 grad_err_vs_loop=err, speedup_vs_loop=loop_ms / med))
                print(f"STM {list(shape)} {dtype}: lrkern {b} {med:.2f} ms vs torch loop {loop_ms:.2f} ms = "
                      f"{loop_ms / med:.1f}x (max grad error vs loop over u, gain, tau, theta0, beta {err:.1e})",
                      flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--op", default="all", choices=["all", "lif", "stm"], help="which neuron to time")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    backends, skipped = bench_backends(device, cuda_c=True)
    backends = [b for b in backends if b != "reference"]  # the reference is itself a Python time loop
    if device.type == "cuda":
        # (32, 2^22) is SpikingJelly's benchmark shape [32, 64, 64*32*32].
        shapes = [(16, 1 << 22)] if args.quick else [(8, 1 << 22), (16, 1 << 22), (32, 1 << 22)]
        dtypes = [torch.float32, torch.float16]
    else:
        shapes = [(16, 1 << 18)] if args.quick else [(16, 1 << 18), (16, 1 << 20)]
        dtypes = [torch.float32]
    meta = metadata(device)
    rows = []
    # Peers timed like the lrkern backends (lrkern's "cuda" backend is among those when CuPy works here).
    peers = [p for p in (spikingjelly_lif(device),) if p is not None]
    for T, N in shapes if args.op in ("all", "lif") else []:
        for dtype in dtypes:
            x = (torch.randn(T, N, device=device) * 1.5).to(dtype)
            g = torch.randn(T, N, device=device).to(dtype)
            loop_ms = bench_ms(fwd_bwd(torch_loop, x, g), device)[0]
            rows.append(dict(meta, provider="torch loop", T=T, N=N, dtype=str(dtype).removeprefix("torch."),
                             ms_fwd_bwd=loop_ms))
            ref = fwd_bwd(torch_loop, x, g)()
            for b in backends:
                with lrkern.use_backend(b):
                    got = fwd_bwd(lrkern_lif, x, g)()
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    med, p20, p80, _ = bench_ms(fwd_bwd(lrkern_lif, x, g), device)
                rows.append(dict(meta, provider=f"lrkern {b}", T=T, N=N, dtype=str(dtype).removeprefix("torch."),
                                 ms_fwd_bwd=med, p20=p20, p80=p80, grad_err_vs_loop=err,
                                 speedup_vs_loop=loop_ms / med))
                print(f"T={T} N={N} {dtype}: lrkern {b} {med:.2f} ms vs torch loop {loop_ms:.2f} ms = "
                      f"{loop_ms / med:.1f}x (grad error vs loop {err:.1e})", flush=True)
            for label, peer in peers:
                got = fwd_bwd(peer, x, g)()
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                med, p20, p80, _ = bench_ms(fwd_bwd(peer, x, g), device)
                rows.append(dict(meta, provider=label, T=T, N=N, dtype=str(dtype).removeprefix("torch."),
                                 ms_fwd_bwd=med, p20=p20, p80=p80, grad_err_vs_loop=err,
                                 speedup_vs_loop=loop_ms / med))
                print(f"T={T} N={N} {dtype}: {label} {med:.2f} ms vs torch loop {loop_ms:.2f} ms = "
                      f"{loop_ms / med:.1f}x (grad error vs loop {err:.1e})", flush=True)
    if args.op in ("all", "stm"):
        rows += bench_stm(device, backends, meta, args.quick)
    for b, why in skipped.items():
        print(f"skipped {b}: {why}")
    if not args.no_record:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"appended {len(rows)} rows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
