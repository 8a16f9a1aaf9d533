"""The transformers attention function ``"lrkern_kvlinc"``: routes a layer's attention to ``lrkern`` when its cache is
a ``KVLinCCache``, and to transformers' own SDPA otherwise (so one model serves both the full-precision baseline and
the quantized cache).

With a ``KVLinCCache`` layer (spec section 3.4):
- first prefill (the cache is empty): SDPA over the prompt's full-precision keys and values with transformers' own
  causal/padding mask, then the prompt goes into the quantized cache (left padding dropped per row);
- decode (one new token per row): append, then ``lrkern.decode_attention`` over codes + window + correction;
- a chunk over a non-empty cache (multi-turn, chunked prefill): ``lrkern.prefill_attention``, then append.

The mask is transformers' ``sdpa_mask`` (registered under the same name), so padding follows transformers exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lrkern.attention import decode_attention, prefill_attention
from lrkern.kvlinc.cache import ATTN_IMPLEMENTATION, LAYER_TAG, KVLinCLayer


def _valid_keys(mask: torch.Tensor, t: int) -> torch.Tensor:
    """Which of the chunk's t keys the chunk's last query may see, [B] x t bool (the padding pattern)."""
    last = mask[:, 0, -1, -t:]
    return last == 0 if last.is_floating_point() else last.bool()  # additive float masks use 0 for "attend"


def left_padding_lengths(mask: Optional[torch.Tensor], t: int) -> Optional[list[int]]:
    """Real tokens per row of a left-padded first chunk, or None when no row is padded."""
    if mask is None:
        return None
    valid = _valid_keys(mask, t)
    lengths = valid.sum(-1)
    suffix = torch.arange(t, device=valid.device)[None, :] >= (t - lengths)[:, None]
    if not torch.equal(valid, suffix):
        raise ValueError("KVLinCCache supports left padding only (tokenizer.padding_side = 'left', as generate() "
                         "expects for decoder-only models); this attention mask pads elsewhere")
    out = lengths.tolist()
    return None if all(n == t for n in out) else out


def _check_unpadded_chunk(mask: Optional[torch.Tensor], t: int) -> None:
    if mask is not None and not bool(_valid_keys(mask, t).all()):
        raise ValueError("KVLinCCache: a chunk appended to a non-empty cache must not contain padding (pad only the "
                         "first prompt, on the left)")


def kvlinc_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, Hq, t, d], key/value [B, Hkv, t, d] (post-RoPE, as returned by
    the cache's ``update``). Returns ([B, t, Hq, d], None)."""
    layer: Optional[KVLinCLayer] = getattr(key, LAYER_TAG, None)
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k_new, v_new = layer.take_pending()
    kv = layer.kv
    t = query.shape[2]
    phi = layer.phi if kv.config.feature_dim else None
    cd = kv.dtype
    if all(n == 0 for n in kv.lengths):
        out, _ = sdpa_attention_forward(module, query, k_new, v_new, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        kv.append(k_new.to(cd), v_new.to(cd), lengths=left_padding_lengths(attention_mask, t), padding_side="left")
        return out, None
    if t == 1:
        kv.append(k_new.to(cd), v_new.to(cd))
        out = decode_attention(query.to(cd), kv, scaling, phi)
    else:
        _check_unpadded_chunk(attention_mask, t)
        out = prefill_attention(query.to(cd), k_new.to(cd), v_new.to(cd), kv, scaling, phi)
        kv.append(k_new.to(cd), v_new.to(cd))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="lrkern_kvlinc"`` known to transformers (idempotent; done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvlinc_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
