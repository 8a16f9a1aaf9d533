"""``lrkern kvlinc demo`` (``make demo``): the packaged SmolLM2-135M answers a question about a WikiText-2 article,
with transformers' own full-precision cache, with a 2-bit ``KVLinCCache`` carrying the adapters that
``lrkern kvlinc calibrate`` fitted (shipped in ``lrkern/kvlinc/assets/``) and with KIVI-2 at the same settings, then a
short perplexity comparison."""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

ADAPTERS = "smollm2-135m-kvlinc-2bit.safetensors"
QUESTION = "Who wrote the play Herons, and in which theatre was it performed in 2001?"


def shipped_adapters() -> Path:
    return Path(str(resources.files("lrkern.kvlinc") / "assets" / ADAPTERS))


def _article(path: Path, max_lines: int = 3) -> tuple[str, str]:
    """(title, text) of the first article of the WikiText-2 test file."""
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    title = lines[0].strip("= ").strip()
    body = []
    for line in lines[1:]:
        if line.startswith("= ") and not line.startswith("= ="):
            break
        if not line.startswith("="):
            body.append(line)
        if len(body) == max_lines:
            break
    return title, "\n\n".join(body)


class _Clock:
    """A generate() streamer that timestamps tokens: decode speed excludes the prompt's prefill."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def decode_tokens_per_s(self) -> float:
        s = self.stamps[1:]  # the first put() is the prompt
        return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else float("nan")


def _reply(model, tok, ids, cache, max_new_tokens):
    from lrkern.kvlinc.cache import cache_kwarg
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False,
                             streamer=clock, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), clock.decode_tokens_per_s()


def run_demo(args) -> int:
    from transformers import DynamicCache

    from lrkern.data import data_file
    from lrkern.kvlinc.adapters import KVLinCAdapters
    from lrkern.kvlinc.cache import KVLinCCache
    from lrkern.kvlinc.evaluate import EvalSettings, evaluate, kv_bytes_per_token
    from lrkern.kvlinc.models import load

    t0 = time.time()
    model, tok = load(args.model, device=args.device)
    adapters = KVLinCAdapters.load(args.adapters or shipped_adapters(), model)
    c = adapters.config
    test = data_file("wikitext2-raw-test.txt")
    title, article = _article(test)
    messages = [{"role": "user", "content": f"{article}\n\n{QUESTION}"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"].to(args.device)
    print(f"lrkern KVLinC demo: {args.model} on {args.device} ({torch.get_num_threads()} threads)")
    print(f"prompt: the WikiText-2 article \"{title}\" ({ids.shape[1]} tokens) + \"{QUESTION}\"\n")

    runs = [("fp16 cache (transformers DynamicCache)", "fp16", lambda: DynamicCache(config=model.config)),
            (f"KVLinC-{c.bits} (G={c.group_size}, R={c.residual}, D={c.feature_dim} correction)", "kvlinc",
             lambda: KVLinCCache(model.config, "kvlinc", bits=c.bits, group_size=c.group_size, residual=c.residual,
                                 adapters=adapters)),
            (f"KIVI-{c.bits} (same G and R, for reference)", "kivi",
             lambda: KVLinCCache(model.config, "kivi", bits=c.bits, group_size=c.group_size, residual=c.residual))]
    settings = EvalSettings(ctx=1024, prefix=512, chunk=16, batch=args.ppl_windows, max_windows=args.ppl_windows,
                            group_size=c.group_size, residual=c.residual)
    fp16_per_token = kv_bytes_per_token(model.config, "fp16", 16, settings)
    for label, method, make in runs:
        cache = make()
        text, tps = _reply(model, tok, ids, cache, args.max_new_tokens)
        tokens = cache.get_seq_length()
        if isinstance(cache, KVLinCCache):
            nbytes = cache.nbytes
            fixed = sum(t.numel() * t.element_size() for layer in cache.layers
                        for t in (layer.kv.k_win, layer.kv.v_win, layer.kv.corr_s, layer.kv.corr_z) if t is not None)
            at_8k = fp16_per_token / kv_bytes_per_token(
                model.config, method, c.bits, settings, c.feature_dim)
            fp_same = fp16_per_token * tokens  # fp16 K and V for as many tokens as this cache holds
            size = (f"{nbytes / 2**10:.0f} KiB allocated ({fp_same / nbytes:.1f}x smaller than fp16), of which "
                    f"{fixed / 2**10:.0f} KiB is the fixed {c.residual}-token window"
                    f"{' and correction state' if method == 'kvlinc' else ''}; at 8k tokens it is {at_8k:.2f}x "
                    "smaller than fp16")
        else:
            size = f"{fp16_per_token * tokens / 2**10:.0f} KiB at fp16"
        print(f"[{label}]\n{text}\n  -> KV cache for {tokens} tokens: {size}; decode {tps:.1f} tokens/s\n")

    print(f"perplexity, WikiText-2 test ({args.ppl_windows} windows of 1024 tokens, the last 512 scored after a "
          "512-token prefill):")
    evaluate(model, tok, test, ["fp16", "kivi", "kvlinc"], [c.bits], settings,
             adapters_for=lambda b: adapters if b == c.bits else None, model_name=args.model,
             log=lambda s: print("  " + s))
    print(f"\n(full table: `lrkern kvlinc eval`, bench/results/kvlinc_ppl.md)  demo took {time.time() - t0:.0f} s")
    return 0
