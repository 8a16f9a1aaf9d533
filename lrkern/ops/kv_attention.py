"""``torch.ops.lrkern.kv_attention``: softmax attention over a quantized KV cache plus its residual window, with the
optional linear correction. The maths and shapes are specified in ``lrkern/reference/kv_attention.py``.

Most users call ``lrkern.decode_attention`` / ``lrkern.prefill_attention`` with a ``lrkern.QuantizedKV``, which
supply these arguments; the op is the unit that is dispatched, traced by ``torch.compile`` and tested.
"""
from __future__ import annotations

from typing import Optional

import torch

from lrkern.ops import _checks
from lrkern.ops._dispatch import Dispatcher
from lrkern.reference.hadamard import rotation_block

KV_BITS = (2, 4)
MAX_HEAD_DIM = 256

_impl = Dispatcher(
    "kv_attention",
    reference="lrkern.reference.kv_attention:kv_attention",
    triton="lrkern.kernels.kv_attention:kv_attention",
    cpp="lrkern.ops._cpp:kv_attention",
)


def _shape(name: str, t: torch.Tensor, want) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(want)}")


def _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s, corr_z,
           phi_q, bits, group_size, key_per_channel, channel_group, rotate_keys, value_rotation, scale) -> None:
    _checks.tensor("q", q, min_dim=4)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, t, d], got shape {tuple(q.shape)}")
    B, Hq, t, d = q.shape
    if t < 1:
        raise ValueError(f"q has t={t} queries per row; at least 1 is needed")
    _checks.integer("bits", bits, accepted=KV_BITS)
    _checks.integer("group_size", group_size, minimum=1)
    _checks.integer("channel_group", channel_group, minimum=1)
    for name, flag in (("key_per_channel", key_per_channel), ("rotate_keys", rotate_keys),
                       ("value_rotation", value_rotation)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    if not isinstance(scale, float):
        raise TypeError(f"scale must be a float, got {type(scale).__name__} {scale!r}")
    _checks.tensor("k_win", k_win, min_dim=4)
    if k_win.dim() != 4:
        raise ValueError(f"k_win must be [B, Hkv, W, d], got shape {tuple(k_win.shape)}")
    Hkv, W = k_win.shape[1], k_win.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q has Hq={Hq} heads, which is not a multiple of the cache's Hkv={Hkv} KV heads")
    _shape("k_win", k_win, (B, Hkv, W, d))
    _checks.tensor("v_win", v_win, min_dim=4)
    _shape("v_win", v_win, (B, Hkv, W, d))
    per = 8 // bits
    if d > MAX_HEAD_DIM or d % per:
        raise ValueError(f"head dim d={d} is not supported: it must be <= {MAX_HEAD_DIM} and a multiple of {per} "
                         f"(codes per byte at bits={bits})")
    if (rotate_keys or value_rotation) and rotation_block(d) < 2:
        raise ValueError(f"head dim d={d} is odd: the Hadamard rotation (rotate_keys / value_rotation) needs an even d")
    if d % channel_group or channel_group % per:
        raise ValueError(f"channel_group={channel_group} must divide the head dim d={d} and be a multiple of {per}")
    _checks.tensor("k_codes", k_codes, dtypes=(torch.uint8,), min_dim=4)
    Tq = k_codes.shape[2] if k_codes.dim() == 4 else -1
    _shape("k_codes", k_codes, (B, Hkv, Tq, d // per))
    _checks.tensor("v_codes", v_codes, dtypes=(torch.uint8,), min_dim=4)
    _shape("v_codes", v_codes, (B, Hkv, Tq, d // per))
    if key_per_channel:
        if group_size % 16:
            raise ValueError(f"group_size={group_size} must be a multiple of 16 for per-channel keys (the kernels "
                             "tile each token group in blocks of at least 16 tokens)")
        if Tq % group_size:
            raise ValueError(f"k_codes holds Tq={Tq} tokens, not a multiple of group_size={group_size}")
        k_scale_shape = (B, Hkv, Tq // group_size, d)
    else:
        k_scale_shape = (B, Hkv, Tq, d // channel_group)
    for name, s, want in (("k_scale", k_scale, k_scale_shape), ("k_zero", k_zero, k_scale_shape),
                          ("v_scale", v_scale, (B, Hkv, Tq, d // channel_group)),
                          ("v_zero", v_zero, (B, Hkv, Tq, d // channel_group))):
        _checks.tensor(name, s, min_dim=4)
        _shape(name, s, want)
    for name, x in (("k_win", k_win), ("v_win", v_win), ("k_scale", k_scale), ("k_zero", k_zero),
                    ("v_scale", v_scale), ("v_zero", v_zero)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; the cache and the queries must share "
                            "one dtype")
    for name, n in (("n_quant", n_quant), ("n_win", n_win)):
        _checks.tensor(name, n, dtypes=(torch.int32,))
        _shape(name, n, (B,))
    corr = [corr_s is None, corr_z is None, phi_q is None]
    if any(corr) and not all(corr):
        raise ValueError("the linear correction needs corr_s, corr_z and phi_q together (or none of them)")
    tensors = dict(q=q, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes, v_scale=v_scale,
                   v_zero=v_zero, k_win=k_win, v_win=v_win, n_quant=n_quant, n_win=n_win)
    if corr_s is not None:
        _checks.tensor("corr_s", corr_s, dtypes=(torch.float32,), min_dim=4)
        D = corr_s.shape[2]
        _shape("corr_s", corr_s, (B, Hkv, D, d))
        _checks.tensor("corr_z", corr_z, dtypes=(torch.float32,))
        _shape("corr_z", corr_z, (B, Hkv, D))
        _checks.tensor("phi_q", phi_q, dtypes=(torch.float32,))
        _shape("phi_q", phi_q, (B, Hq, t, D))
        tensors.update(corr_s=corr_s, corr_z=corr_z, phi_q=phi_q)
    _checks.same_device(**tensors)


def _check_lengths(n_quant, n_win, Tq: int, W: int, group_size: int, key_per_channel: bool) -> None:
    if n_quant.device.type != "cpu":
        return  # a check would cost a device synchronisation; QuantizedKV maintains these invariants itself
    nq, nw = n_quant.tolist(), n_win.tolist()  # one host copy each: cheaper than several tiny tensor reductions
    if any(n < 0 or n > Tq or (key_per_channel and n % group_size) for n in nq):
        raise ValueError(f"n_quant={nq} must lie in [0, Tq={Tq}]"
                         + (f" and be multiples of group_size={group_size}" if key_per_channel else ""))
    if any(n < 0 or n > W for n in nw):
        raise ValueError(f"n_win={nw} must lie in [0, W={W}]")


@torch.library.custom_op("lrkern::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                 v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, k_win: torch.Tensor,
                 v_win: torch.Tensor, n_quant: torch.Tensor, n_win: torch.Tensor, corr_s: Optional[torch.Tensor],
                 corr_z: Optional[torch.Tensor], phi_q: Optional[torch.Tensor], bits: int, group_size: int,
                 key_per_channel: bool, channel_group: int, rotate_keys: bool, value_rotation: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, t, d] over every token of a quantized KV cache (codes + residual window).

    Returns (out [B, Hq, t, d] in q's dtype, lse [B, Hq, t] fp32: log of the softmax denominator, correction
    included, -inf for an empty row). Argument shapes and the maths: ``lrkern/reference/kv_attention.py``.
    """
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s, corr_z,
            phi_q, bits, group_size, key_per_channel, channel_group, rotate_keys, value_rotation, scale)
    _check(*args)
    _check_lengths(n_quant, n_win, k_codes.shape[2], k_win.shape[2], group_size, key_per_channel)
    contiguous = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    return _impl(q.device, *contiguous)


def kv_attention_trusted(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_attention`` without its per-call validation and without torch.library's dispatch, for callers whose cache
    arguments come from a ``QuantizedKV`` (consistent by construction) and whose q and phi_q were checked against that
    cache (``lrkern.attention`` does both). Together the two cost ~0.1 ms per call on CPU, a third of a decode step
    at 8k tokens. Backend selection is the same ``Dispatcher``; q and phi_q must be contiguous."""
    return _impl(args[0].device, *args)


@kv_attention.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s, corr_z, phi_q,
      bits, group_size, key_per_channel, channel_group, rotate_keys, value_rotation, scale):
    _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, n_quant, n_win, corr_s, corr_z,
           phi_q, bits, group_size, key_per_channel, channel_group, rotate_keys, value_rotation, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)
