"""Multi-step LIF, forward + backward: ``torch.ops.lrkern.lif_multistep`` on each backend that can run here against a
PyTorch time loop (eager per-step ops with autograd through the loop, the way an unfused SNN layer runs; its spike
function is a surrogate-gradient autograd.Function, as in SpikingJelly's ``torch`` backend).

One timed call = forward over T steps of x [T, N] + backward of sum(spikes * g) to x. Rows are appended to
``bench/results/lif.jsonl`` with ``device, provider, T, N, dtype, ms_fwd_bwd`` (+ p20/p80, commit, date), and the
speed-up against the loop is printed. Issue targets: CPU C++ >= 3x the loop at T = 16; GPU >= 10x at T = 16,
N = 2^22 (and faster than SpikingJelly, not installed here).

    python bench/bench_lif.py [--device cpu|cuda|auto] [--quick] [--no-record]
"""
from __future__ import annotations

import argparse
import json
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


def fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor):
    def run():
        xr = x.detach().requires_grad_(True)
        (fn(xr) * g).sum().backward()
        return xr.grad
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    backends, skipped = bench_backends(device)
    backends = [b for b in backends if b != "reference"]  # the reference is itself a Python time loop
    if device.type == "cuda":
        # (32, 2^22) is SpikingJelly's benchmark shape [32, 64, 64*32*32].
        shapes = [(16, 1 << 22)] if args.quick else [(16, 1 << 22), (32, 1 << 22)]
        dtypes = [torch.float32, torch.float16]
    else:
        shapes = [(16, 1 << 18)] if args.quick else [(16, 1 << 18), (16, 1 << 20)]
        dtypes = [torch.float32]
    meta = metadata(device)
    rows = []
    for T, N in shapes:
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
