"""Attention over a ``QuantizedKV``: ``decode_attention`` (one new query per row) and ``prefill_attention`` (a chunk
of new queries over the cache plus the chunk's own full-precision keys and values, causal).

Both run ``torch.ops.lrkern.kv_attention`` for the cached part; the feature map ``phi`` of the linear correction is
evaluated here (it is a small learned module, not kernel work).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from lrkern.ops.kv_attention import kv_attention, kv_attention_trusted
from lrkern.quantized_kv import QuantizedKV

PhiFn = Callable[[torch.Tensor], torch.Tensor]


def _check_q(name: str, q: torch.Tensor, kv: QuantizedKV) -> None:
    if not isinstance(kv, QuantizedKV):
        raise TypeError(f"kv must be a lrkern.QuantizedKV, got {type(kv).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [B, Hq, t, d], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    c = kv.config
    B, Hq, _, d = q.shape
    if B != kv.batch_size:
        raise ValueError(f"{name} has batch {B} but the cache kv holds {kv.batch_size} rows")
    if d != c.head_dim:
        raise ValueError(f"{name} has head dim {d} but the cache kv was built for head_dim={c.head_dim}")
    if Hq % c.num_kv_heads:
        raise ValueError(f"{name} has Hq={Hq} heads, not a multiple of the cache's num_kv_heads={c.num_kv_heads}")
    if q.dtype != kv.dtype:
        raise TypeError(f"{name} has dtype {q.dtype} but the cache kv stores {kv.dtype}")
    if q.device != kv.device:
        raise ValueError(f"{name} is on {q.device} but the cache kv lives on {kv.device}")


def _phi_features(phi, q: torch.Tensor, kv: QuantizedKV) -> Optional[torch.Tensor]:
    if phi is None:
        return None
    D = kv.config.feature_dim
    if not D:
        raise ValueError("phi was given but the cache kv has no linear correction (feature_dim=0); build it with "
                         "feature_dim > 0 (the 'kvlinc' preset) or drop phi")
    feats = phi(q) if callable(phi) else phi
    want = (*q.shape[:3], D)
    if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != want:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"phi(q) gave {got}; expected query features {want} (the cache's feature_dim={D})")
    if feats.device != q.device:
        raise ValueError(f"phi(q) is on {feats.device} but q is on {q.device}")
    return feats.float().contiguous()


def _cache_attention(q: torch.Tensor, kv: QuantizedKV, scale: float, phi) -> tuple[torch.Tensor, torch.Tensor]:
    c = kv.config
    phi_q = _phi_features(phi, q, kv)
    args = kv.kernel_args()
    if phi_q is None:
        args = args[:-2] + (None, None)
    full = (q.contiguous(), *args, phi_q, c.bits, c.group_size, c.key_per_channel, c.cgroup, c.rotate_keys,
            c.value_rotation, float(scale))
    # The registered op wherever it matters: under torch.compile (it traces through the fake implementation) and
    # when a gradient is asked for (the op refuses a backward instead of silently returning a detached result).
    # Otherwise, everything kv_attention would check is guaranteed by the cache and by _check_q / _phi_features.
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or (phi_q is not None and phi_q.requires_grad))
    if torch.compiler.is_compiling() or wants_grad:
        return kv_attention(*full)
    return kv_attention_trusted(*full)


def decode_attention(q: torch.Tensor, kv: QuantizedKV, scale: Optional[float] = None,
                     phi: Optional[PhiFn | torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention of one new query per row over everything ``kv`` holds, plus the linear correction when
    ``phi`` is given.

    q: [B, Hq, 1, d] in the cache's dtype (Hq a multiple of the cache's KV heads; the current token's k/v must
    already be appended). scale: default 1/sqrt(d). phi: the query feature map, a callable q [B, Hq, 1, d] ->
    [B, Hq, 1, D], or those features as a tensor. Returns [B, Hq, 1, d] in q's dtype.

    Example:
        >>> kv = lrkern.QuantizedKV.preset("kivi", batch_size=1, num_kv_heads=3, head_dim=64)
        >>> kv.append(k, v)  # [1, 3, T, 64] fp16
        >>> out = lrkern.decode_attention(q, kv)  # q [1, 9, 1, 64]
    """
    _check_q("q", q, kv)
    if q.shape[2] != 1:
        raise ValueError(f"q has {q.shape[2]} queries per row; decode_attention takes exactly 1 "
                         "(use prefill_attention for a chunk)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _cache_attention(q, kv, scale, phi)[0]


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv: QuantizedKV,
                      scale: Optional[float] = None, phi: Optional[PhiFn | torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of a chunk of t new queries over the cache plus the chunk itself (chunked prefill,
    multi-turn chats). ``kv`` is read, not changed: append k_new, v_new afterwards.

    q: [B, Hq, t, d]; k_new, v_new: [B, Hkv, t, d] full precision, the same dtype (query i sees new tokens 0..i and
    every cached token). Returns [B, Hq, t, d] in q's dtype. The two parts are merged exactly through their
    log-sum-exps: the cached part from the quantized kernel (with the correction when ``phi`` is given), the chunk's
    own part in fp32 (at most t x t scores per head).
    """
    _check_q("q", q, kv)
    c = kv.config
    B, Hq, t, d = q.shape
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        want = (B, c.num_kv_heads, t, d)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {got}; expected {want} (one key/value per new query)")
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} ({x.dtype}, {x.device}) must match q ({q.dtype}, {q.device})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = Hq // c.num_kv_heads
    if max(kv.lengths) == 0:
        # Nothing cached (a first prefill; S and z are zero too): plain causal attention on the chunk.
        k, v = k_new.repeat_interleave(g, dim=1), v_new.repeat_interleave(g, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out_c, lse_c = _cache_attention(q, kv, scale, phi)
    out_n, lse_n = _causal_chunk_attention(q, k_new, v_new, g, scale)
    lse = torch.maximum(lse_c, lse_n)
    w_c = torch.exp(lse_c - lse)  # 0 where the cache row is empty (lse_c = -inf)
    w_n = torch.exp(lse_n - lse)
    out = (out_c.float() * w_c[..., None] + out_n * w_n[..., None]) / (w_c + w_n)[..., None]
    return out.to(q.dtype)


def _causal_chunk_attention(q, k_new, v_new, g: int, scale: float, block: int = 512):
    """(out fp32, lse) of causal attention of q [B, Hq, t, d] over the chunk's own keys, in fp32, in blocks of
    ``block`` queries so that at most block x t scores per head exist at once."""
    t = q.shape[2]
    k = k_new.float().repeat_interleave(g, dim=1)
    v = v_new.float().repeat_interleave(g, dim=1)
    outs, lses = [], []
    for i0 in range(0, t, block):
        i1 = min(t, i0 + block)
        s = torch.matmul(q[:, :, i0:i1].float(), k[:, :, :i1].transpose(-1, -2)) * scale
        future = torch.arange(i1, device=q.device)[None, :] > torch.arange(i0, i1, device=q.device)[:, None]
        s = s.masked_fill(future, float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1))  # finite: query i always sees new token i
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v[:, :, :i1]))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
