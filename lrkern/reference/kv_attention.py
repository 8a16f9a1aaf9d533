"""Reference attention over a quantized KV cache (``lrkern::kv_attention``): the executable specification.

Every query attends to all tokens its batch row holds in the cache: the quantized blocks, then the full-precision
residual window. One call serves decode (t = 1 query per row) and the cache half of chunked prefill (t new queries,
all of which come after every cached token).

Shapes (B batch, Hq query heads, Hkv KV heads, g = Hq / Hkv, t queries, d head dim, Tq quantized capacity, W window
capacity, D correction features; the float tensors share one dtype):

    q        [B, Hq, t, d]                     original space (rotated here when rotate_keys)
    k_codes  [B, Hkv, Tq, d*bits/8] uint8      per channel: scale/zero [B, Hkv, Tq/G, d]
                                               per token:   scale/zero [B, Hkv, Tq, d/Gc]
    v_codes  [B, Hkv, Tq, d*bits/8] uint8      scale/zero [B, Hkv, Tq, d/Gc] (rotated space when value_rotation)
    k_win, v_win [B, Hkv, W, d]                as stored: keys rotated when rotate_keys, values when value_rotation
    n_quant, n_win [B] int32                   tokens of each row in use (n_quant a multiple of G)
    corr_s [B, Hkv, D, d] fp32, corr_z [B, Hkv, D] fp32, phi_q [B, Hq, t, D] fp32   (all three, or none)

Maths, per query (s_j = scale * q.k_hat_j over the row's valid tokens, m = max_j s_j, L = sum_j e^{s_j - m},
A = sum_j e^{s_j - m} v_hat_j, and the linear correction c_n = phi^T S, c_d = max(phi^T z, 0)):

    M   = max(m, log c_d)                           (a common scale: every term below is <= 1 in magnitude order)
    num = A e^{m - M} + c_n e^{-M}                  (the c_n term only where c_d > 0)
    den = L e^{m - M} + c_d e^{-M}
    out = num / den  (0 where den == 0, i.e. an empty row without correction);  lse = M + log den
    out = rotate(out) when value_rotation (the rotation is its own inverse), cast to q's dtype.

This is softmax attention with one extra "virtual token" of weight c_d and value c_n / c_d, i.e. spec section 3.3's
num / den written so that neither e^{-m} nor e^{m} can overflow for scores of any magnitude.
"""
from __future__ import annotations

import torch

from lrkern.reference.hadamard import rotate
from lrkern.reference.quant import dequant


def dequant_keys(k_codes, k_scale, k_zero, bits: int, group_size: int, key_per_channel: bool,
                 channel_group: int) -> torch.Tensor:
    """fp32 keys of the quantized region [B, Hkv, Tq, d], in the stored (possibly rotated) space."""
    if key_per_channel:
        return dequant(k_codes, k_scale.float(), k_zero.float(), bits, group_size, -2)
    return dequant(k_codes, k_scale.float(), k_zero.float(), bits, channel_group, -1)


def dequant_values(v_codes, v_scale, v_zero, bits: int, channel_group: int) -> torch.Tensor:
    return dequant(v_codes, v_scale.float(), v_zero.float(), bits, channel_group, -1)


def kv_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win,
                 corr_s, corr_z, phi_q, bits: int, group_size: int, key_per_channel: bool, channel_group: int,
                 rotate_keys: bool, value_rotation: bool, scale: float):
    """Returns (out [B, Hq, t, d] in q's dtype, lse [B, Hq, t] fp32). See the module docstring."""
    B, Hq, t, d = q.shape
    Hkv, Tq, W = k_win.shape[1], k_codes.shape[2], k_win.shape[2]
    g = Hq // Hkv
    q32 = q.float()
    if rotate_keys:
        q32 = rotate(q32)
    k = torch.cat([dequant_keys(k_codes, k_scale, k_zero, bits, group_size, key_per_channel, channel_group),
                   k_win.float()], dim=2)
    v = torch.cat([dequant_values(v_codes, v_scale, v_zero, bits, channel_group), v_win.float()], dim=2)
    pos_q = torch.arange(Tq, device=q.device)
    pos_w = torch.arange(W, device=q.device)
    valid = torch.cat([pos_q[None, :] < n_quant[:, None].long(), pos_w[None, :] < n_win[:, None].long()], dim=1)
    # Capacity past a row's length holds whatever the buffer held: keep it out of the products (0 * NaN = NaN).
    k = k.masked_fill(~valid[:, None, :, None], 0.0)
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    valid = valid[:, None, None, :]  # [B, 1, 1, Tq + W]

    # Query rows of one KV head: the g heads of its group times the t queries, head-major ([B, Hkv, g*t, d]).
    qg = q32.reshape(B, Hkv, g * t, d)
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    # -inf for an empty row (amax refuses an empty dim, which a cache with no window and no codes has)
    m = s.amax(dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe[..., None])  # exactly 0 at masked tokens
    L = p.sum(-1)
    A = torch.matmul(p, v)
    if phi_q is not None:
        phi = phi_q.float().reshape(B, Hkv, g * t, -1)
        c_n = torch.matmul(phi, corr_s.float())
        c_d = torch.matmul(phi, corr_z.float()[..., None])[..., 0].clamp_min(0.0)
    else:
        c_n = torch.zeros_like(A)
        c_d = torch.zeros_like(L)
    M = torch.maximum(m, torch.log(c_d))  # -inf only for an empty row without correction
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    a = torch.where(torch.isfinite(m), torch.exp(m - M_safe), torch.zeros_like(m))
    f = torch.where(c_d > 0, torch.exp(-M_safe), torch.zeros_like(M_safe))
    num = A * a[..., None] + c_n * f[..., None]
    den = L * a + c_d * f
    pos = den > 0
    out = torch.where(pos[..., None], num / torch.where(pos, den, torch.ones_like(den))[..., None],
                      torch.zeros_like(num))
    lse = torch.where(pos, M_safe + torch.log(torch.where(pos, den, torch.ones_like(den))),
                      torch.full_like(den, float("-inf")))
    if value_rotation:
        out = rotate(out)
    return out.reshape(B, Hq, t, d).to(q.dtype), lse.reshape(B, Hq, t)
