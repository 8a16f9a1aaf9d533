"""Timing, metadata and recording shared by the benchmarks.

GPU timings: ``triton.testing.do_bench`` (median, 20th and 80th percentiles). CPU timings: the same quantiles over
repeated runs after a warm-up. Every measurement is one row; rows of one case share a baseline measured in the same
run, so ratios never compare numbers from different runs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def bench_ms(fn, device: torch.device, min_time_s: float = 0.25, max_reps: int = 200) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        return med, p20, p80
    fn()  # warm-up: first-touch page faults, thread pool start, lazy imports
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


@dataclass
class Row:
    bench: str
    op: str
    impl: str  # "lrkern[<backend>]" or a baseline's name
    shape: str
    dtype: str
    params: dict
    bytes: int  # bytes read + written by the op
    ms: float
    p20: float
    p80: float
    gbps: float = 0.0
    pct_memcpy: float | None = None  # memcpy of the same bytes: time(memcpy) / time(impl)
    vs_reference: float | None = None  # time(reference) / time(impl): > 1 means faster than the reference
    meta: dict = field(default_factory=dict)


class Case:
    """One shape of one op: measures each implementation, then fills the ratios against the shared baselines."""

    def __init__(self, bench: str, op: str, shape, dtype: torch.dtype, params: dict, nbytes: int, device):
        self.bench, self.op, self.shape, self.dtype = bench, op, "x".join(map(str, shape)), str(dtype)[6:]
        self.params, self.bytes, self.device = params, nbytes, device
        self.rows: list[Row] = []

    def measure(self, impl: str, fn) -> None:
        ms, p20, p80 = bench_ms(fn, self.device)
        self.rows.append(Row(self.bench, self.op, impl, self.shape, self.dtype, self.params, self.bytes, ms, p20, p80,
                             gbps=self.bytes / ms / 1e6))

    def finish(self, meta: dict) -> list[Row]:
        by = {r.impl: r for r in self.rows}
        for r in self.rows:
            if "memcpy" in by:
                r.pct_memcpy = by["memcpy"].ms / r.ms
            if "reference" in by:
                r.vs_reference = by["reference"].ms / r.ms
            r.meta = meta
        return self.rows


def memcpy_fn(nbytes: int, device):
    """A copy that reads and writes ``nbytes`` in total: the bandwidth ceiling of a memory-bound op."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def record(rows: list[Row], device: torch.device) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if device.type == "cuda" else "cpu"
    path = RESULTS / f"{kind}-{slug(device_name(device).split(' (')[0])}.jsonl"
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    return path


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    header = f"{'op':<11}{'impl':<22}{'shape':<16}{'dtype':<9}{'params':<22}{'median ms':>10}{'GB/s':>9}" \
             f"{'% memcpy':>10}{'vs ref':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r.params.items())
        pct = f"{100 * r.pct_memcpy:.0f}%" if r.pct_memcpy is not None else "-"
        ref = f"{r.vs_reference:.2f}x" if r.vs_reference is not None else "-"
        print(f"{r.op:<11}{r.impl:<22}{r.shape:<16}{r.dtype:<9}{params:<22}{r.ms:>10.3f}{r.gbps:>9.1f}{pct:>10}{ref:>9}")


def lrkern_backends(device: torch.device) -> list[str]:
    """Backends worth timing on ``device``: never the Triton interpreter, and the reference always (as baseline)."""
    import lrkern

    names = [b for b in lrkern.available_backends(device) if b != "reference"]
    if device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        names = [b for b in names if b != "triton"]
    return names
