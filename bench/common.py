"""Timing, environment capture, result recording and the table printer shared by the benchmarks.

Timing: CUDA with ``triton.testing.do_bench`` (which clears L2 before every repetition); CPU with
``time.perf_counter`` around single calls after a warm-up. Both report the median and the 20th / 80th percentiles.

Each op and shape is one ``Case``: the lrkern backends and the baselines (the reference backend, op-specific ones such
as an explicit-matrix matmul, and a memcpy of the same bytes) are all timed in the same run, and every row carries
its ratio against each baseline of its case, so no ratio ever compares numbers from different runs.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
# CPU cache state before each timed call: "cold" evicts the last-level cache first (as do_bench clears the GPU's L2),
# so kernels and memcpy alike are measured from DRAM; "warm" leaves the operands cached between repetitions.
CPU_CACHE_MODES = ("cold", "warm")
_cpu_cache = "cold"
_flush_buf: torch.Tensor | None = None

# Names of the baselines a case can hold; every other row is an lrkern backend under test.
REFERENCE, MATMUL, FHT, MEMCPY = "reference", "explicit matmul", "fast-hadamard-transform", "memcpy"
BASELINES = (REFERENCE, MATMUL, FHT, MEMCPY)
SHORT = {REFERENCE: "ref", MATMUL: "matmul", FHT: "fht", MEMCPY: "memcpy"}


# ---------------------------------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model with the number of threads torch (and the OpenMP kernels) use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File stem of a device's results: ``cpu-amd-epyc``, ``gpu-nvidia-h100-80gb-hbm3``."""
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    text = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60] or "unknown"
    return f"{'gpu' if device.type == 'cuda' else 'cpu'}-{text}"


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` when tracked files differ from it (recorded results under
    bench/results/ do not count: appending a run must not mark the next one dirty)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)bench/results"], cwd=ROOT, capture_output=True, text=True, check=True)
        return sha + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def set_cpu_cache(mode: str) -> None:
    global _cpu_cache
    if mode not in CPU_CACHE_MODES:
        raise ValueError(f"cpu cache mode {mode!r}: expected one of {CPU_CACHE_MODES}")
    _cpu_cache = mode


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])
    return max(sizes, default=32 * 2**20)


def _flush_cpu_cache() -> None:
    """Writes twice the last-level cache's size, evicting whatever the previous call left there."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.zeros(2 * llc_bytes(), dtype=torch.uint8)
    _flush_buf.fill_(1)


def cache_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "L2 cleared before each repetition (do_bench)"
    if _cpu_cache == "cold":
        return f"cold: last-level cache evicted before each timed call ({2 * llc_bytes() >> 20} MiB written, untimed)"
    return "warm: operands stay cached between repetitions"


def metadata(device: torch.device) -> dict:
    """What every recorded row carries about the run."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cache": "l2-cleared" if device.type == "cuda" else _cpu_cache,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def bench_backends(device: torch.device, cuda_c: bool = False) -> tuple[list[str], dict[str, str]]:
    """(lrkern backends to time on ``device``, {backend left out: why}). The reference is always there (it is also
    the baseline); the Triton interpreter never is (``TRITON_INTERPRET=1`` makes Triton run on the host); the CUDA C
    backend only for ops that have one (``cuda_c=True``)."""
    import lrkern
    from lrkern.ops import _dispatch

    names = list(lrkern.available_backends(device))
    if not cuda_c and "cuda" in names:
        names.remove("cuda")
    skipped = {b: _dispatch.why_unavailable(b, device) for b in _dispatch.BACKENDS if b not in names}
    if not cuda_c:
        skipped["cuda"] = "this op has no CUDA C implementation"
    if _dispatch.triton_interpret() and "triton" in names:
        names.remove("triton")
        skipped["triton"] = "TRITON_INTERPRET=1 is set: the interpreter is never benchmarked"
    if REFERENCE not in names:
        names.append(REFERENCE)
    # Kernels first, the reference last: the table then reads kernel, baselines.
    return sorted(names, key=lambda b: b == REFERENCE), skipped


# ---------------------------------------------------------------------------------------------------- timing

def bench_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.3, min_reps: int = 10,
             max_reps: int = 300) -> tuple[float, float, float, int]:
    """(median, p20, p80) milliseconds of one call of ``fn``, and the number of timed repetitions.

    CUDA: ``triton.testing.do_bench`` (its own warm-up; 100 ms of repetitions, L2 cleared before each). CPU: a
    warm-up (at least one call and ~50 ms), then single calls timed with ``time.perf_counter`` until ``min_time_s``
    has passed and at least ``min_reps`` calls were made (at most ``max_reps``). In the default "cold" CPU cache mode
    the last-level cache is evicted before each timed call (not timed), like do_bench's L2 clearing on the GPU.
    """
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        q = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        med, p20, p80 = (float(v) for v in q)
        return med, p20, p80, -1  # do_bench does not say how many repetitions it ran
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t_warm = time.perf_counter()
        fn()
        while time.perf_counter() - t_warm < 0.05:
            fn()
        cold = _cpu_cache == "cold"
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
            if cold:
                _flush_cpu_cache()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2]), len(times)


# ---------------------------------------------------------------------------------------------------- rows, cases

@dataclass
class Row:
    """One measurement: one implementation of one op at one shape. ``ms`` is the median."""
    bench: str
    op: str
    impl: str  # "lrkern[cpp]", "lrkern[triton]", or a baseline: "reference", "explicit matmul", ..., "memcpy"
    backend: str | None  # the lrkern backend timed ("cpp", "triton", "reference"), None for non-lrkern baselines
    role: str  # "kernel" (an lrkern backend under test) or "baseline"
    shape: str  # "32768x128"
    dtype: str
    params: dict
    bytes: int  # bytes read + written by the op: what a memcpy of the same cost moves
    ms: float  # median
    p20: float
    p80: float
    reps: int  # timed repetitions (-1: do_bench's own count)
    gbps: float  # bytes / median time
    baselines: list = field(default_factory=list)  # baselines measured in the same case
    ratios: dict = field(default_factory=dict)  # {baseline: time(baseline) / time(this)}: > 1 = faster than it
    pct_memcpy: float | None = None  # ratios["memcpy"]: the fraction of the memcpy bandwidth achieved
    vs_reference: float | None = None  # ratios["reference"]
    meta: dict = field(default_factory=dict)


class Case:
    """One op at one shape and dtype: ``measure`` each implementation, then ``finish`` fills the ratios."""

    def __init__(self, bench: str, op: str, shape, dtype: torch.dtype, params: dict, nbytes: int,
                 device: torch.device, log: Callable[[str], None] = print):
        self.bench, self.op, self.shape = bench, op, "x".join(map(str, shape))
        self.dtype = str(dtype).removeprefix("torch.")
        self.params, self.bytes, self.device, self.log = params, nbytes, device, log
        self.rows: list[Row] = []
        self.errors: list[str] = []  # failures of lrkern kernels (a failing baseline is only reported)

    def label(self) -> str:
        return f"{self.op} {self.shape} {self.dtype} {format_params(self.params)}"

    def measure(self, impl: str, fn: Callable[[], object], backend: str | None = None,
                check: Callable[[object], str | None] | None = None) -> object | None:
        """Times ``fn`` as ``impl``; returns one output of ``fn`` (None when it failed).

        ``check(output)`` returns None when the output agrees with the reference, else what differs: a kernel that
        computes something else is reported (and counted as an error) rather than silently timed.
        """
        role = "baseline" if impl in BASELINES else "kernel"
        try:
            out = fn()
            problem = check(out) if check is not None else None
            if problem:
                self._fail(impl, role, f"output differs from the reference: {problem}")
            ms, p20, p80, reps = bench_ms(fn, self.device)
        except Exception as exc:  # noqa: BLE001 -- one broken kernel or baseline must not end the run
            self._fail(impl, role, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        self.rows.append(Row(self.bench, self.op, impl, backend, role, self.shape, self.dtype, dict(self.params),
                             self.bytes, ms, p20, p80, reps, gbps=self.bytes / ms / 1e6))
        return out

    def _fail(self, impl: str, role: str, why: str) -> None:
        self.log(f"  error: {impl} on {self.label()}: {why}")
        if role == "kernel" or impl == REFERENCE:
            self.errors.append(f"{impl} on {self.label()}: {why}")

    def skip(self, impl: str, why: str) -> None:
        self.log(f"  skipped: {impl} on {self.label()}: {why}")

    def finish(self, meta: dict) -> list[Row]:
        times = {r.impl: r.ms for r in self.rows if r.role == "baseline"}
        for r in self.rows:
            r.baselines = list(times)
            r.ratios = {b: t / r.ms for b, t in times.items() if b != r.impl}
            r.pct_memcpy = times[MEMCPY] / r.ms if MEMCPY in times else None
            r.vs_reference = times[REFERENCE] / r.ms if REFERENCE in times else None
            r.meta = meta
        return self.rows


def memcpy_fn(nbytes: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """``out.copy_(src)`` into a preallocated tensor, reading nbytes/2 and writing nbytes/2: the bandwidth ceiling
    of a memory-bound op that moves ``nbytes`` in total."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    src.fill_(1)  # touch the pages, so the first timed copy does not pay for faulting them in
    out = torch.empty_like(src)
    out.fill_(0)
    return lambda: out.copy_(src)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32 (0 for an all-zero reference)."""
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / scale if scale else (out - ref).abs().max().item()


# ---------------------------------------------------------------------------------------------------- recording

def results_path(device: torch.device) -> Path:
    return RESULTS / f"{device_slug(device)}.jsonl"


def record(rows: list[Row], device: torch.device) -> Path:
    """Appends one JSON line per row to ``bench/results/<device-slug>.jsonl``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = results_path(device)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(asdict(r), sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- table

def merge_rows(rows: list[dict], new, key: tuple[str, ...]) -> list[dict]:
    """``rows`` with each row of ``new`` replacing the row with the same ``key`` fields (or appended); in place."""
    index = {tuple(r.get(k) for k in key): i for i, r in enumerate(rows)}
    for r in new:
        k = tuple(r.get(f) for f in key)
        if k in index:
            rows[index[k]] = r
        else:
            index[k] = len(rows)
            rows.append(r)
    return rows


def write_md_section(path: Path, begin: str, end: str, section: str, title: str) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of the Markdown file ``path`` by ``section`` (which
    carries the markers itself), or append it; a new file starts with ``title``."""
    text = path.read_text() if path.is_file() else title + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def format_params(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _ratio(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}x" if v >= 100 else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def table(rows: list[Row]) -> str:
    """Plain aligned text: one line per row, the baselines' speed-up columns as the rows' cases have them.

    ``% memcpy`` = time(memcpy of the same bytes) / time(row); ``vs X`` = time(X) / time(row) (> 1: faster than X).
    """
    others = [b for b in BASELINES if b != MEMCPY and any(b in r.ratios for r in rows)]
    header = ["op", "backend / baseline", "shape", "dtype", "params", "median ms", "p20-p80 ms", "GB/s", "% memcpy"]
    header += [f"vs {SHORT[b]}" for b in others]
    lines = []
    for r in rows:
        line = [r.op, r.impl, r.shape, r.dtype, format_params(r.params), f"{r.ms:.3f}", f"{r.p20:.3f}-{r.p80:.3f}",
                f"{r.gbps:.1f}", f"{100 * r.pct_memcpy:.1f}%" if r.pct_memcpy is not None else "-"]
        # The memcpy row's own speed-ups say nothing that the other rows' % memcpy does not.
        line += [_ratio(r.ratios.get(b)) if r.impl != MEMCPY else "-" for b in others]
        lines.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    left = 5  # the first five columns are text, the rest numbers

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), "-" * len(fmt(header))]
    prev = None
    for r, line in zip(rows, lines):
        key = (r.op, r.shape, r.dtype, format_params(r.params))
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt(line))
    return "\n".join(out)


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n== {title}")
    print(table(rows) if rows else "(no rows)")
    sys.stdout.flush()


def env_flag_warnings() -> list[str]:
    """Environment settings that change what gets measured."""
    notes = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        notes.append("TRITON_INTERPRET=1 is set: the Triton backend is left out (the interpreter is never timed)")
    if os.environ.get("LRKERN_BACKEND"):
        notes.append(f"LRKERN_BACKEND={os.environ['LRKERN_BACKEND']} is set: ignored here, every backend is forced "
                     "in turn")
    return notes
