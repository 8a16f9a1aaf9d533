"""Calibration of KVLinC's correction adapters on a model (spec section 3.3): capture post-RoPE q, k, v of every layer
from the full-precision model on calibration text, then fit each layer's phi and psi on the exact emulation of the
cache (``fit.py``), checking the fit on held-out sequences.

Defaults (SmolLM2-135M on 2 CPU cores: about 10 minutes in all): 16 sequences of 1024 tokens of WikiText-2 valid
for fitting (8 gave a perplexity of 37.61 where 16 give 37.07 on the first 8 eval windows), 2 more held out; per layer ``FitDefaults`` (200 AdamW steps, lr 0.02, 4 sequences per step, weight decay 2.0
on the weights: without it the maps memorise the calibration text); exp feature maps, D = 64, initialised near zero.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lrkern.kvlinc.adapters import KVLinCAdapters, model_fingerprint
from lrkern.kvlinc.cache import model_geometry
from lrkern.kvlinc.evaluate import read_text, text_windows
from lrkern.kvlinc.fit import (FitDefaults, correction_loss, emulate_layer, fit_emulation, init_feature_maps,
                              uncorrected_loss)
from lrkern.quantized_kv import KVConfig

CAPTURE_IMPLEMENTATION = "lrkern_capture"
_recorder: Optional[dict] = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, after recording this layer's post-RoPE q, k, v (on the CPU, fp32)."""
    if _recorder is not None:
        _recorder.setdefault(module.layer_idx, []).append(
            tuple(x.detach().to("cpu", torch.float32) for x in (query, key, value)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def _capturing(model):
    global _recorder
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    _recorder = {}
    try:
        yield _recorder
    finally:
        _recorder = None
        model.set_attn_implementation(previous)


def capture_qkv(model, sequences: torch.Tensor, batch: int = 2) -> dict[int, tuple[torch.Tensor, ...]]:
    """{layer: (q [N, Hq, T, d], k [N, Hkv, T, d], v)} post-RoPE, fp32 on the CPU, from full-precision forwards of
    ``sequences`` [N, T] (no cache: plain causal attention)."""
    device = next(model.parameters()).device
    with _capturing(model) as rec, torch.no_grad():
        for i in range(0, sequences.shape[0], batch):
            model(sequences[i:i + batch].to(device), use_cache=False, logits_to_keep=1)
    return {layer: tuple(torch.cat(parts, dim=0) for parts in zip(*chunks)) for layer, chunks in rec.items()}


def calibration_sequences(tokenizer, data: str | Path, n: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping token windows from the start of the text file."""
    return text_windows(tokenizer, read_text(data), seq_len, count=n)


def _out_proj(model, layer: int) -> torch.Tensor:
    """The o_proj weight [hidden, Hq*d] of decoder layer ``layer``, fp32 on the CPU (Llama / Qwen2 / Qwen3 layout)."""
    return model.model.layers[layer].self_attn.o_proj.weight.detach().to("cpu", torch.float32)


@dataclass(frozen=True)
class CalibrationSettings:
    bits: int = 2
    group_size: int = 128
    residual: int = 128
    feature_dim: int = 64
    activation: str = "exp"
    sequences: int = 16
    heldout: int = 2
    seq_len: int = 1024
    steps: int = FitDefaults.steps
    lr: float = FitDefaults.lr
    batch_size: int = FitDefaults.batch_size
    weight_decay: float = FitDefaults.weight_decay
    loss_space: str = "o_proj"  # "o_proj": error after the output projection; "attention": of the attention output
    seed: int = 0


def calibrate(model, tokenizer, data: str | Path, settings: CalibrationSettings = CalibrationSettings(),
              log: Callable[[str], None] = print) -> KVLinCAdapters:
    """Fit KVLinC adapters for ``model`` under ``settings``; returns them with a per-layer report in
    ``adapters.extra`` (held-out relative error without and with correction)."""
    from tqdm.auto import tqdm
    t0 = time.time()
    torch.manual_seed(settings.seed)
    _, _, kv_heads, head_dim = model_geometry(model.config)
    config = KVConfig.preset("kvlinc", kv_heads, head_dim, bits=settings.bits, group_size=settings.group_size,
                             residual=settings.residual, feature_dim=settings.feature_dim)
    if settings.seq_len <= settings.residual:
        raise ValueError(f"seq_len={settings.seq_len} must exceed residual={settings.residual}: shorter sequences "
                         "never quantize anything, so there is nothing to correct")
    adapters = KVLinCAdapters(model.config, config, activation=settings.activation,
                              fingerprint=model_fingerprint(model))
    gen = torch.Generator().manual_seed(settings.seed)
    for phi, psi in zip(adapters.phi, adapters.psi):
        init_feature_maps(phi, psi, generator=gen)  # a correction that starts near zero cannot hurt at step 0
    seqs = calibration_sequences(tokenizer, data, settings.sequences + settings.heldout, settings.seq_len)
    log(f"calibrate: capturing q, k, v on {seqs.shape[0]} x {settings.seq_len} tokens of {Path(data).name}")
    captured = capture_qkv(model, seqs)
    dtype = next(model.parameters()).dtype
    cache_dtype = dtype if dtype != torch.float32 else torch.float16  # what KVLinCCache stores by default
    fit_n = settings.sequences
    report = []
    bar = tqdm(sorted(captured), desc="calibrate layers", unit="layer")
    for layer in bar:
        q, k, v = captured.pop(layer)  # freed as we go
        phi, psi = adapters.phi[layer], adapters.psi[layer]
        em = emulate_layer(q[:fit_n], k[:fit_n], v[:fit_n], config, cache_dtype=cache_dtype)
        w_o = _out_proj(model, layer) if settings.loss_space == "o_proj" else None
        history = fit_emulation(em, phi, psi, steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                                weight_decay=settings.weight_decay, out_proj=w_o)
        del em
        held = emulate_layer(q[fit_n:], k[fit_n:], v[fit_n:], config, cache_dtype=cache_dtype)
        with torch.no_grad():
            before = uncorrected_loss(held, out_proj=w_o)
            after = correction_loss(held, phi, psi, out_proj=w_o).item()
        kept = after < before
        if not kept:
            # Validation decides: a correction that does not help on held-out text is switched off (near-zero maps).
            init_feature_maps(phi, psi, generator=gen)
        report.append(dict(layer=layer, train_first=round(history[0], 6), train_last=round(history[-1], 6),
                           heldout_uncorrected=round(before, 6), heldout_corrected=round(after, 6), kept=kept))
        bar.set_postfix(heldout=f"{before:.4f}->{after:.4f}")
    adapters.extra = dict(settings=asdict(settings), data=Path(data).name, layers=report,
                          seconds=round(time.time() - t0, 1), cache_dtype=str(cache_dtype).removeprefix("torch."))
    mean_b = sum(r["heldout_uncorrected"] for r in report) / len(report)
    mean_a = sum(min(r["heldout_corrected"], r["heldout_uncorrected"]) for r in report) / len(report)
    log(f"calibrate: {len(report)} layers in {adapters.extra['seconds']} s; held-out attention error (mean over "
        f"layers, relative MSE) {mean_b:.4f} uncorrected -> {mean_a:.4f} corrected; correction kept on "
        f"{sum(r['kept'] for r in report)} layers")
    return adapters
