"""WikiText-2 perplexity through the real cache and kernels, for fp16 / KIVI / QuaRot-style / KVLinC at 2 and 4 bits.

Protocol (lrkern's, stated with every result): the text is tokenised once and cut into non-overlapping windows of
``ctx`` tokens. Each window is run the way a server runs a long request: its first ``prefix`` tokens are one prefill
(full-precision attention, then written into the cache: every full block quantized), and the remaining tokens are
fed in chunks of ``chunk`` tokens, each attending to the quantized cache (``lrkern::kv_attention``, with the
correction) plus its own full-precision tokens, then appended. Only those remaining tokens are scored, so every
scored token sees a context that is mostly quantized. ``chunk = 1`` is token-by-token decode (slowest); the default
16 differs from it only in that a chunk's own tokens are full precision even right after a block flush. The fp16
baseline is transformers' own cache on the same windows and chunks.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from lrkern.kvlinc.cache import KVLinCCache, cache_kwarg, model_geometry
from lrkern.quantized_kv import KVConfig, QuantizedKV

METHODS = ("fp16", "kivi", "quarot", "kvlinc")


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 1024          # tokens per window
    prefix: int = 512        # prefilled, not scored
    chunk: int = 16          # scored tokens per forward
    batch: int = 4           # windows per forward
    max_windows: int = 32    # 0: the whole text
    group_size: int = 128
    residual: int = 128

    def __post_init__(self):
        if not 0 < self.prefix < self.ctx:
            raise ValueError(f"prefix={self.prefix} must be in (0, ctx={self.ctx})")
        for name in ("chunk", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def read_text(path: str | Path) -> str:
    """WikiText-2 raw as shipped in ../shared/data (one paragraph per line, blank rows dropped): rejoined with
    blank lines, the usual evaluation text."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line for line in lines if line.strip())


def text_windows(tokenizer, text: str, length: int, count: int = 0) -> torch.Tensor:
    """[n, length] int64: consecutive non-overlapping token windows from the start of ``text``; ``count`` > 0 asks for
    exactly that many (an error when the text is too short), 0 for as many as fit (at least one)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    fit = ids.numel() // length
    n = count or fit
    if n > fit or n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens: {max(n, 1)} window(s) of {length} need "
                         f"{max(n, 1) * length}")
    return ids[: n * length].view(n, length)


def token_windows(tokenizer, text: str, settings: EvalSettings) -> torch.Tensor:
    """[n_windows, ctx] int64: the evaluation windows (at most ``settings.max_windows``, 0: all)."""
    windows = text_windows(tokenizer, text, settings.ctx)
    return windows[: settings.max_windows] if settings.max_windows else windows


def kv_bytes_per_token(model_config, method: str, bits: int, settings: EvalSettings, feature_dim: int = 0,
                       tokens: int = 8192) -> float:
    """Bytes per token of the whole model's cache for one sequence holding ``tokens`` tokens (default 8k): for a
    quantized method everything a ``QuantizedKV`` allocates (codes, scales, zeros, the window, the correction
    state) over all layers; for fp16, K and V in 2 bytes."""
    num_layers, _, kv_heads, d = model_geometry(model_config)
    if method == "fp16":
        return 2.0 * num_layers * kv_heads * d * 2
    extra = {"feature_dim": feature_dim} if method == "kvlinc" else {}
    config = KVConfig.preset(method, kv_heads, d, bits=bits, group_size=settings.group_size,
                             residual=settings.residual, **extra)
    G, R = config.group_size, config.residual
    n_quant = G * ((tokens - R) // G + 1) if tokens >= R else 0  # the cache's flush rule
    layer = QuantizedKV(1, config, dtype=torch.float16, capacity=n_quant)
    return num_layers * layer.nbytes / tokens


def _window_nll(model, ids: torch.Tensor, make_cache: Callable, settings: EvalSettings) -> tuple[float, int]:
    """Summed negative log-likelihood of the scored tokens of a batch of windows, and how many were scored."""
    key = cache_kwarg(model)
    cache = make_cache()
    p = settings.prefix
    with torch.no_grad():
        logits = [model(ids[:, :p], **{key: cache}, logits_to_keep=1).logits.float()]
        for s in range(p, ids.shape[1] - 1, settings.chunk):
            e = min(s + settings.chunk, ids.shape[1] - 1)
            logits.append(model(ids[:, s:e], **{key: cache}).logits.float())
    logits = torch.cat(logits, dim=1)  # predictions for tokens p .. ctx-1
    targets = ids[:, p:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="sum")
    return nll.item(), targets.numel()


def perplexity(model, windows: torch.Tensor, make_cache: Callable, settings: EvalSettings,
               progress: Optional[Callable[[int], None]] = None) -> tuple[float, int]:
    """(perplexity, scored tokens) over all windows, ``settings.batch`` windows per forward."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], settings.batch):
        nll, n = _window_nll(model, windows[i:i + settings.batch], make_cache, settings)
        total, count = total + nll, count + n
        if progress:
            progress(windows[i:i + settings.batch].shape[0])
    return math.exp(total / count), count


def cache_factory(model, method: str, bits: int, settings: EvalSettings, adapters=None) -> Callable:
    if method == "fp16":
        from transformers import DynamicCache
        return lambda: DynamicCache(config=model.config)
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; accepted: {', '.join(METHODS)}")
    return lambda: KVLinCCache(model.config, method, bits=bits, group_size=settings.group_size,
                               residual=settings.residual, adapters=adapters if method == "kvlinc" else None)


def evaluate(model, tokenizer, data: str | Path, methods, bits_list, settings: EvalSettings,
             adapters_for: Callable[[int], object] = lambda bits: None, model_name: str = "",
             log: Callable[[str], None] = print) -> list[dict]:
    """One result row per (method, bits); fp16 once. ``adapters_for(bits)`` gives the KVLinC adapters for that bit
    width, or None (then the kvlinc row runs without correction and says so)."""
    from tqdm.auto import tqdm
    windows = token_windows(tokenizer, read_text(data), settings)
    runs = [(m, b) for m in methods for b in ((16,) if m == "fp16" else bits_list)]
    rows = []
    for method, bits in runs:
        adapters = adapters_for(bits) if method == "kvlinc" else None
        make = cache_factory(model, method, bits, settings, adapters)
        label = method if method == "fp16" else f"{method}-{bits}"
        t0 = time.time()
        with tqdm(total=windows.shape[0], desc=f"eval {label}", unit="window", leave=False) as bar:
            ppl, n = perplexity(model, windows, make, settings, bar.update)
        D = adapters.config.feature_dim if adapters is not None else 0
        rows.append(dict(model=model_name, method=method, bits=bits, group_size=settings.group_size,
                         residual=settings.residual, ctx=settings.ctx, tokens=n, ppl=round(ppl, 4),
                         kv_bytes_per_token=round(kv_bytes_per_token(model.config, method, bits, settings, D), 1),
                         corrected=adapters is not None, prefix=settings.prefix, chunk=settings.chunk,
                         seconds=round(time.time() - t0, 1)))
        log(f"{label:>10}: ppl {ppl:.3f} over {n} tokens ({rows[-1]['seconds']} s)")
    return rows


def markdown_table(rows: list[dict]) -> str:
    fp = next((r for r in rows if r["method"] == "fp16"), None)
    fp_bytes = fp["kv_bytes_per_token"] if fp else None
    out = ["| method | bits | ppl | gap to fp16 closed vs KIVI | KV bytes/token @8k | vs fp16 |",
           "|---|---|---|---|---|---|"]
    kivi = {r["bits"]: r["ppl"] for r in rows if r["method"] == "kivi"}
    for r in rows:
        closed = ""
        if fp and r["method"] != "kivi" and r["bits"] in kivi and kivi[r["bits"]] != fp["ppl"] and r["method"] != "fp16":
            closed = f"{(kivi[r['bits']] - r['ppl']) / (kivi[r['bits']] - fp['ppl']):+.0%}"
        ratio = f"{fp_bytes / r['kv_bytes_per_token']:.2f}x" if fp_bytes else ""
        name = r["method"] + (" (uncorrected)" if r["method"] == "kvlinc" and not r.get("corrected") else "")
        out.append(f"| {name} | {r['bits']} | {r['ppl']:.3f} | {closed} | {r['kv_bytes_per_token']:.0f} | {ratio} |")
    s = rows[0]
    out.append("")
    out.append(f"{s['model']}: WikiText-2 test, {s['tokens']} scored tokens, windows of {s['ctx']} tokens (first "
               f"{s['prefix']} prefilled, then chunks of {s['chunk']}), G={s['group_size']}, R={s['residual']}.")
    return "\n".join(out)


def write_results(rows: list[dict], json_path: str | Path, md_path: Optional[str | Path] = None) -> None:
    """Replace the rows of the same (model, method, bits, group_size, residual, ctx) in the JSON list, keep the rest;
    the Markdown table shows every recorded row of this run's model and settings, so a partial re-run (one method)
    still writes the whole table."""
    path = Path(json_path)
    old = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r["model"], r["method"], r["bits"], r["group_size"], r["residual"], r["ctx"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    order = lambda r: (r["model"], METHODS.index(r["method"]), r["bits"])  # noqa: E731
    merged = sorted([r for r in old if key(r) not in new_keys] + rows, key=order)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    if md_path:
        same = lambda r: key(r)[0] == key(rows[0])[0] and key(r)[3:] == key(rows[0])[3:]  # noqa: E731
        Path(md_path).write_text(markdown_table([r for r in merged if same(r)]) + "\n")


__all__ = ["EvalSettings", "METHODS", "evaluate", "perplexity", "kv_bytes_per_token", "markdown_table",
           "write_results", "read_text", "token_windows"]
