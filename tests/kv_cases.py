"""Builders shared by the KV-cache tests: caches filled through ``QuantizedKV.append``, and the op arguments they
give."""
from __future__ import annotations

import torch

import lrkern

FEATURES = 16


def make_cache(preset: str, B: int, Hkv: int, d: int, lengths, *, dtype=torch.float32, device="cpu", G: int = 32,
               bits: int = 2, feature_dim: int = FEATURES, **overrides):
    """A cache whose row b holds lengths[b] random tokens (appended as one right-padded chunk), and the raw k, v."""
    psi = None
    if preset == "kvlinc":
        overrides["feature_dim"] = feature_dim
        psi = lrkern.FeatureMap(Hkv, d, feature_dim).to(device)
    kv = lrkern.QuantizedKV.preset(preset, B, Hkv, d, group_size=G, bits=bits, dtype=dtype, device=device, psi=psi,
                                   **overrides)
    t = max(lengths)
    k = (torch.randn(B, Hkv, t, d, device=device) + torch.randn(1, Hkv, 1, d, device=device) * 2).to(dtype)
    v = torch.randn(B, Hkv, t, d, device=device).to(dtype)
    with torch.no_grad():
        if t:
            kv.append(k, v, lengths=list(lengths))
    return kv, k, v


def op_args(kv: lrkern.QuantizedKV, q: torch.Tensor, phi_q: torch.Tensor | None, scale: float | None = None):
    """Positional arguments of ``torch.ops.lrkern.kv_attention`` for query q over cache kv."""
    c = kv.config
    cache = kv.kernel_args()
    if phi_q is None:
        cache = cache[:-2] + (None, None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q, *cache, phi_q, c.bits, c.group_size, c.key_per_channel, c.cgroup, c.rotate_keys, c.value_rotation,
            float(scale))


def phi_features(kv: lrkern.QuantizedKV, q: torch.Tensor) -> torch.Tensor | None:
    if not kv.config.feature_dim:
        return None
    phi = lrkern.FeatureMap(q.shape[1], q.shape[-1], kv.config.feature_dim).to(q.device)
    with torch.no_grad():
        return phi(q).contiguous()
