"""End-to-end decode throughput of a whole model: transformers' own cache with SDPA (the fp16 baseline) vs KVLinC-2.

    python bench/bench_kvlinc_decode.py [--model smollm2-135m] [--device cpu|cuda] [--batch 1,4] [--ctx 1024,8192]
                                        [--steps 32] [--record]

Each cache is filled to ``ctx`` tokens per row with random keys and values written straight into it (decode time
does not depend on their values, and an 8k-token prefill per configuration would dominate the run on a CPU), then
``steps`` greedy decode steps of the full model are timed (median step). The KVLinC cache carries the correction
(D = 64, random feature maps: same cost as calibrated ones). On CUDA the baseline model runs in fp16 with SDPA; on
the CPU the model runs in fp32 (fp16 GEMMs are slow there) and the baseline cache is fp32, while KVLinC stores fp16.
Rows go to bench/results/kvlinc_decode.jsonl: device, cache, B, ctx, tokens_per_s, ms_per_step, and the run metadata.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import DynamicCache

from bench.common import RESULTS, metadata
from lrkern.kvlinc import KVLinCAdapters, KVLinCCache
from lrkern.kvlinc.cache import cache_kwarg
from lrkern.kvlinc.models import load
from lrkern.quantized_kv import KVConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fill(cache, model, batch: int, ctx: int, dtype, device, gen: torch.Generator) -> None:
    """Write ctx random tokens per row into every layer of ``cache`` without running the model."""
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, ctx, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
        v = torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
        if isinstance(cache, KVLinCCache):
            layer = cache.layers[i]
            layer.lazy_initialization(k, v)
            layer.kv.reserve(ctx + 256)
            layer.kv.append(k.to(layer.kv.dtype), v.to(layer.kv.dtype))
            layer.cumulative_length = ctx
        else:
            cache.update(k, v, i)


def time_decode(model, cache, batch: int, steps: int, device) -> float:
    """Median seconds per decode step (one new token per row) over ``steps`` steps after 3 warm-up steps."""
    key = cache_kwarg(model)
    nxt = torch.randint(100, 1000, (batch, 1), device=device)
    times = []
    with torch.no_grad():
        for i in range(steps + 3):
            _sync(device)
            t = time.perf_counter()
            out = model(nxt, **{key: cache})
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--ctx", default="1024,8192")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--record", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, _ = load(args.model, dtype=dtype, device=str(device))
    cfg = model.config
    kvc = KVConfig.preset("kvlinc", cfg.num_key_value_heads, cfg.head_dim, bits=args.bits, feature_dim=64)
    adapters = KVLinCAdapters(cfg, kvc, activation="exp").to(device)
    gen = torch.Generator().manual_seed(0)
    meta = metadata(device)
    rows = []
    print(f"{'cache':>8} {'B':>3} {'ctx':>6} {'ms/step':>9} {'tokens/s':>9}  speed-up")
    for B in (int(x) for x in args.batch.split(",")):
        for ctx in (int(x) for x in args.ctx.split(",")):
            base = None
            for name in ("fp16", f"kvlinc-{args.bits}"):
                cache = (DynamicCache(config=cfg) if name == "fp16" else
                         KVLinCCache(cfg, "kvlinc", bits=args.bits, adapters=adapters))
                fill(cache, model, B, ctx, dtype, device, gen)
                s = time_decode(model, cache, B, args.steps, device)
                base = base or s
                rows.append(dict(meta, cache=name, B=B, ctx=ctx, tokens_per_s=round(B / s, 2),
                                 ms_per_step=round(1e3 * s, 3), model=args.model,
                                 model_dtype=str(dtype).removeprefix("torch."), speedup_vs_fp16=round(base / s, 3)))
                print(f"{name:>8} {B:>3} {ctx:>6} {1e3 * s:>9.2f} {B / s:>9.1f}  {base / s:.2f}x")
                del cache
    if args.record:
        path = RESULTS / "kvlinc_decode.jsonl"
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"recorded {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
