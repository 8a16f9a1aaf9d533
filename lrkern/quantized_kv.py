"""``lrkern.QuantizedKV``: one attention layer's 2- or 4-bit KV cache with a full-precision residual window and the
state of the linear correction (spec ``kvlinc.md`` sections 3.1-3.3).

Storage for batch B, KV heads Hkv, head dim d (the buffers ``lrkern.decode_attention`` hands to the kernels):

    k_codes, v_codes   [B, Hkv, cap, d*bits/8] uint8     quantized tokens, cap a multiple of G, grown in chunks
    k_scale, k_zero    per channel: [B, Hkv, cap/G, d]   per token: [B, Hkv, cap, d/Gc]       (the cache dtype)
    v_scale, v_zero    [B, Hkv, cap, d/Gc]                                                   (the cache dtype)
    k_win, v_win       [B, Hkv, R, d]                    the newest tokens in the cache dtype, as stored (below)
    corr_s, corr_z     [B, Hkv, D, d], [B, Hkv, D] fp32  S = sum psi(k_j) v_j^T, z = sum psi(k_j) over quantized j

Row b holds n_quant[b] quantized tokens followed by n_win[b] window tokens; rows may differ in length. Whenever a
row's window reaches R tokens, its oldest G tokens are quantized as one block (KIVI's residual scheme), so after
every append 0 <= n_win < R and n_quant is a multiple of G. Nothing already quantized is ever re-quantized.

Stored spaces: keys are rotated when ``rotate_keys`` (QuaRot-style; queries are rotated alike), values when
``value_rotation`` (KVLinC; the attention output is rotated back once). S lives in the stored value space, so the
correction adds to the same accumulator as the values. psi sees each key in the original space, in full precision
(the window's dtype) at the moment its block is quantized.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from lrkern.ops.hadamard import hadamard, hadamard_trusted
from lrkern.ops.kv_attention import KV_BITS, MAX_HEAD_DIM
from lrkern.ops.quant import quant_pack
from lrkern.reference.hadamard import rotation_block
from lrkern.reference.kv_attention import dequant_keys, dequant_values

KEY_MODES = ("channel", "token")
PRESETS = ("kvlinc", "kivi", "quarot")
# Geometric growth of the quantized storage: amortised O(1) copies per token at most 25% unused capacity.
_GROWTH = 1.25


def rotate(x: torch.Tensor) -> torch.Tensor:
    """The cache's orthonormal head-dim rotation (block-diagonal Hadamard, see ``reference.hadamard.rotate``) through
    the ``lrkern::hadamard`` op; it is its own inverse."""
    d = x.shape[-1]
    b = rotation_block(d)
    blocks = x.reshape(*x.shape[:-1], d // b, b)
    if x.numel() == 0 or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return hadamard(blocks).reshape(x.shape)
    # The cache's own tensors: already valid for the op, so skip its per-call checks (a decode step rotates one token).
    return hadamard_trusted(blocks).reshape(x.shape)


@dataclass(frozen=True)
class KVConfig:
    """Everything that fixes the meaning of a cache's bytes; caches and adapters are only compatible when equal."""

    num_kv_heads: int
    head_dim: int
    bits: int = 2
    group_size: int = 128
    residual: int = 128
    key_mode: str = "channel"
    channel_group: int = 0  # 0 stands for head_dim
    value_rotation: bool = True
    rotate_keys: bool = False
    feature_dim: int = 0  # 0: no linear correction

    def __post_init__(self):
        for name in ("num_kv_heads", "head_dim", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.bits not in KV_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; accepted: {', '.join(map(str, KV_BITS))}")
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode={self.key_mode!r} is not supported; accepted: {', '.join(KEY_MODES)}")
        d, per = self.head_dim, 8 // self.bits
        if d > MAX_HEAD_DIM or d % per:
            raise ValueError(f"head_dim={d} must be <= {MAX_HEAD_DIM} and a multiple of {per} at bits={self.bits}")
        if self.key_mode == "channel" and self.group_size % 16:
            raise ValueError(f"group_size={self.group_size} must be a multiple of 16 for per-channel keys")
        if not isinstance(self.residual, int) or self.residual < self.group_size:
            raise ValueError(f"residual={self.residual!r} must be an int >= group_size={self.group_size}: the "
                             "window flushes whole blocks of group_size tokens")
        cg = self.channel_group or d
        if d % cg or cg % per:
            raise ValueError(f"channel_group={self.channel_group} must divide head_dim={d} and be a multiple of {per}")
        if (self.value_rotation or self.rotate_keys) and rotation_block(d) < 2:
            raise ValueError(f"head_dim={d} is odd: value_rotation / rotate_keys need an even head dim")
        if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim < 0:
            raise ValueError(f"feature_dim={self.feature_dim!r} must be an int >= 0 (0: no correction)")

    @property
    def key_per_channel(self) -> bool:
        return self.key_mode == "channel"

    @property
    def cgroup(self) -> int:
        return self.channel_group or self.head_dim

    @classmethod
    def preset(cls, name: str, num_kv_heads: int, head_dim: int, **overrides) -> "KVConfig":
        """KVLinC: per-channel keys, rotated per-token values, correction (D = 64). KIVI: per-channel keys, per-token
        values, nothing else. QuaRot-style: keys and values rotated, both per token, no correction."""
        flags = {
            "kvlinc": dict(key_mode="channel", value_rotation=True, rotate_keys=False, feature_dim=64),
            "kivi": dict(key_mode="channel", value_rotation=False, rotate_keys=False, feature_dim=0),
            "quarot": dict(key_mode="token", value_rotation=True, rotate_keys=True, feature_dim=0),
        }
        if name not in flags:
            raise ValueError(f"preset {name!r} is unknown; accepted: {', '.join(PRESETS)}")
        settings = {**flags[name], **overrides}
        if "residual" not in settings:
            settings["residual"] = settings.get("group_size", cls.group_size)
        return cls(num_kv_heads=num_kv_heads, head_dim=head_dim, **settings)


FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class QuantizedKV:
    """A per-layer quantized KV store. See the module docstring for the layout.

    Example:
        >>> kv = QuantizedKV(batch_size=2, config=KVConfig.preset("kivi", num_kv_heads=3, head_dim=64))
        >>> kv.append(torch.randn(2, 3, 300, 64, dtype=torch.float16), torch.randn(2, 3, 300, 64,
        ...           dtype=torch.float16))
        >>> kv.lengths, kv.n_quant_list, kv.n_win_list
        ([300, 300], [256, 256], [44, 44])
    """

    def __init__(self, batch_size: int, config: KVConfig, *, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu", psi: Optional[FeatureFn] = None, capacity: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype={dtype} is not supported; accepted: float32, float16, bfloat16")
        self.config, self.batch_size, self.dtype = config, batch_size, dtype
        # Resolved through an allocation so "cuda" becomes "cuda:0" and compares equal to the tensors' devices.
        self.device = torch.empty(0, device=device).device
        self.psi = psi
        c = config
        B, H, d, per = batch_size, c.num_kv_heads, c.head_dim, 8 // c.bits
        self._nq = [0] * B
        self._nw = [0] * B
        self._lengths_dev: tuple[torch.Tensor, torch.Tensor] | None = None
        # Zero-initialised, so capacity past a row's length never holds NaN (the kernels never read it anyway).
        self.k_win = torch.zeros(B, H, c.residual, d, dtype=dtype, device=self.device)
        self.v_win = torch.zeros_like(self.k_win)
        self._cap = 0
        self.k_codes = torch.zeros(B, H, 0, d // per, dtype=torch.uint8, device=self.device)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_scale = torch.zeros(self._k_scale_shape(0), dtype=dtype, device=self.device)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(B, H, 0, d // c.cgroup, dtype=dtype, device=self.device)
        self.v_zero = torch.zeros_like(self.v_scale)
        if c.feature_dim:
            self.corr_s = torch.zeros(B, H, c.feature_dim, d, dtype=torch.float32, device=self.device)
            self.corr_z = torch.zeros(B, H, c.feature_dim, dtype=torch.float32, device=self.device)
        else:
            self.corr_s = self.corr_z = None
        if capacity:
            self.reserve(capacity)

    @classmethod
    def preset(cls, name: str, batch_size: int, num_kv_heads: int, head_dim: int, *, dtype=torch.float16,
               device="cpu", psi: Optional[FeatureFn] = None, capacity: int = 0, **overrides) -> "QuantizedKV":
        """A cache with ``KVConfig.preset(name, ...)`` settings (``"kvlinc"``, ``"kivi"``, ``"quarot"``)."""
        config = KVConfig.preset(name, num_kv_heads, head_dim, **overrides)
        return cls(batch_size, config, dtype=dtype, device=device, psi=psi, capacity=capacity)

    # ------------------------------------------------------------------------------------------------ sizes

    def _k_scale_shape(self, cap: int) -> tuple[int, ...]:
        c = self.config
        if c.key_per_channel:
            return (self.batch_size, c.num_kv_heads, cap // c.group_size, c.head_dim)
        return (self.batch_size, c.num_kv_heads, cap, c.head_dim // c.cgroup)

    @property
    def lengths(self) -> list[int]:
        """Tokens held per row (quantized + window)."""
        return [a + b for a, b in zip(self._nq, self._nw)]

    @property
    def n_quant_list(self) -> list[int]:
        return list(self._nq)

    @property
    def n_win_list(self) -> list[int]:
        return list(self._nw)

    def lengths_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_quant, n_win) as int32 tensors on the cache's device, kept in step with the host-side lengths."""
        if self._lengths_dev is None:
            self._lengths_dev = (torch.tensor(self._nq, dtype=torch.int32, device=self.device),
                                 torch.tensor(self._nw, dtype=torch.int32, device=self.device))
        return self._lengths_dev

    def _buffers(self) -> list[torch.Tensor]:
        bufs = [self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.k_win,
                self.v_win]
        return bufs + ([self.corr_s, self.corr_z] if self.corr_s is not None else [])

    @property
    def nbytes(self) -> int:
        """Every byte the cache holds: codes, scales, zeros and the window at their allocated capacity, and the
        correction state."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` quantized tokens per row (rounded up to G), so appends up to there never copy.

        The GPU kernel splits its work over this capacity, so reserving far more than the rows will hold leaves the
        later splits idle; reserve what the sequence will reach."""
        g = self.config.group_size
        cap = -(-tokens // g) * g
        if cap <= self._cap:
            return

        def grow(t: torch.Tensor, dim: int, new: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new
            out = torch.zeros(shape, dtype=t.dtype, device=t.device)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self.k_codes = grow(self.k_codes, 2, cap)
        self.v_codes = grow(self.v_codes, 2, cap)
        ks = self._k_scale_shape(cap)[2]
        self.k_scale = grow(self.k_scale, 2, ks)
        self.k_zero = grow(self.k_zero, 2, ks)
        self.v_scale = grow(self.v_scale, 2, cap)
        self.v_zero = grow(self.v_zero, 2, cap)
        self._cap = cap

    def _ensure(self, tokens: int) -> None:
        if tokens > self._cap:
            self.reserve(max(tokens, int(self._cap * _GROWTH)))

    # ----------------------------------------------------------------------------------------------- append

    def append(self, k: torch.Tensor, v: torch.Tensor, psi: Optional[FeatureFn] = None,
               lengths: Optional[Sequence[int] | torch.Tensor] = None, padding_side: str = "right") -> None:
        """Append t new tokens per row: k, v [B, Hkv, t, d] in the cache's dtype and device.

        ``lengths`` (optional, [B] ints <= t) is how many of the t tokens of each row are real; the others are padding
        on ``padding_side`` (``"right"``: the real tokens come first; ``"left"``: they come last) and are not stored.
        ``psi`` (default: the cache's own) maps full-precision keys [n, Hkv, m, d] (fp32) to features [n, Hkv, m, D];
        a cache with correction (feature_dim > 0) needs one. Blocks that fill up leave the window as codes.
        """
        c = self.config
        B, H, d = self.batch_size, c.num_kv_heads, c.head_dim
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != d:
                raise ValueError(f"{name} has shape {tuple(x.shape)}; this cache holds [B={B}, Hkv={H}, t, d={d}]")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the cache stores {self.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache lives on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
        t = k.shape[2]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; accepted: 'left', 'right'")
        if lengths is None:
            lens = [t] * B
        else:
            lens = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
            if len(lens) != B or any(n < 0 or n > t for n in lens):
                raise ValueError(f"lengths={lens} must hold {B} ints in [0, t={t}]")
        psi = psi if psi is not None else self.psi
        if c.feature_dim and psi is None:
            raise ValueError(f"this cache carries the linear correction (feature_dim={c.feature_dim}): append needs "
                             "psi, the key feature map (pass psi= here or to the constructor)")
        if t == 0:
            return
        # Rotate into the stored spaces once, for the whole chunk.
        k_st = rotate(k) if c.rotate_keys else k
        v_st = rotate(v) if c.value_rotation else v
        if lengths is None and t == 1:
            self._append_one(k_st, v_st, psi)
            return
        # Rows in the same state (quantized length, window length, new tokens) are appended together.
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for b in range(B):
            if lens[b]:
                groups[(self._nq[b], self._nw[b], lens[b])].append(b)
        for (nq, nw, n), rows in groups.items():
            lo = 0 if padding_side == "right" else t - n
            self._append_rows(rows, nq, nw, k_st[:, :, lo:lo + n], v_st[:, :, lo:lo + n], psi)
        self._lengths_dev = None

    def _append_one(self, k_st: torch.Tensor, v_st: torch.Tensor, psi) -> None:
        """Decode step: one token per row written in place into the window; full windows flush one block.

        Without a flush the step stays on the device: the window position comes from the cached n_win tensor, which
        is then incremented in place, so a decode step issues no host-to-device copy (nor a sync)."""
        B = self.batch_size
        n_win = self.lengths_tensors()[1]
        rows = torch.arange(B, device=self.device)
        pos = n_win.long()
        self.k_win[rows, :, pos] = k_st[:, :, 0]
        self.v_win[rows, :, pos] = v_st[:, :, 0]
        full: dict[int, list[int]] = defaultdict(list)
        for b in range(B):
            self._nw[b] += 1
            if self._nw[b] == self.config.residual:
                full[self._nq[b]].append(b)
        if not full:
            n_win.add_(1)
            return
        g = self.config.group_size
        for nq, rs in full.items():
            idx = torch.tensor(rs, device=self.device)
            self._flush(rs, idx, nq, self.k_win[idx, :, :g], self.v_win[idx, :, :g], psi)
            r = self.config.residual
            self.k_win[idx, :, :r - g] = self.k_win[idx, :, g:r].clone()
            self.v_win[idx, :, :r - g] = self.v_win[idx, :, g:r].clone()
            for b in rs:
                self._nw[b] = r - g
        self._lengths_dev = None

    def _append_rows(self, rows: list[int], nq: int, nw: int, k_new: torch.Tensor, v_new: torch.Tensor, psi) -> None:
        """Rows sharing (n_quant, n_win): window + new tokens, full blocks flushed, the rest kept as the window."""
        c = self.config
        idx = torch.tensor(rows, device=self.device)
        seq_k = torch.cat([self.k_win[idx, :, :nw], k_new[idx]], dim=2)
        seq_v = torch.cat([self.v_win[idx, :, :nw], v_new[idx]], dim=2)
        total = seq_k.shape[2]
        nf = (total - c.residual) // c.group_size + 1 if total >= c.residual else 0
        m = nf * c.group_size
        if nf:
            self._flush(rows, idx, nq, seq_k[:, :, :m], seq_v[:, :, :m], psi)
        rest = total - m
        self.k_win[idx, :, :rest] = seq_k[:, :, m:]
        self.v_win[idx, :, :rest] = seq_v[:, :, m:]
        for b in rows:
            self._nw[b] = rest

    def _flush(self, rows: list[int], idx: torch.Tensor, nq: int, k_blk: torch.Tensor, v_blk: torch.Tensor,
               psi) -> None:
        """Quantize m = n*G tokens (stored spaces) of ``rows`` (all at n_quant = nq) into the codes at [nq, nq+m)."""
        c = self.config
        m = k_blk.shape[2]
        self._ensure(nq + m)
        if c.key_per_channel:
            kc, ks, kz = quant_pack(k_blk, c.bits, c.group_size, -2)
            g0 = nq // c.group_size
            self.k_scale[idx, :, g0:g0 + m // c.group_size] = ks
            self.k_zero[idx, :, g0:g0 + m // c.group_size] = kz
        else:
            kc, ks, kz = quant_pack(k_blk, c.bits, c.cgroup, -1)
            self.k_scale[idx, :, nq:nq + m] = ks
            self.k_zero[idx, :, nq:nq + m] = kz
        self.k_codes[idx, :, nq:nq + m] = kc
        vc, vs, vz = quant_pack(v_blk, c.bits, c.cgroup, -1)
        self.v_codes[idx, :, nq:nq + m] = vc
        self.v_scale[idx, :, nq:nq + m] = vs
        self.v_zero[idx, :, nq:nq + m] = vz
        if c.feature_dim:
            k_orig = rotate(k_blk) if c.rotate_keys else k_blk
            feats = psi(k_orig.float())
            want = (len(rows), c.num_kv_heads, m, c.feature_dim)
            if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != want:
                got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ValueError(f"psi returned {got}; expected features {want} (feature_dim={c.feature_dim})")
            feats = feats.float()
            self.corr_s[idx] += torch.matmul(feats.transpose(-1, -2), v_blk.float())
            self.corr_z[idx] += feats.sum(dim=2)
        for b in rows:
            self._nq[b] += m

    # ---------------------------------------------------------------------------------------------- readers

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_hat, v_hat) [B, Hkv, T, d] fp32 in the original (unrotated) space, T = the longest row: what attention
        sees. Row b's tokens sit at [0, lengths[b]) (quantized first, then the window); the rest is zero."""
        c = self.config
        k_q = dequant_keys(self.k_codes, self.k_scale, self.k_zero, c.bits, c.group_size, c.key_per_channel,
                           c.cgroup)
        v_q = dequant_values(self.v_codes, self.v_scale, self.v_zero, c.bits, c.cgroup)
        T = max(self.lengths)
        B, H, d = self.batch_size, c.num_kv_heads, c.head_dim
        k_hat = torch.zeros(B, H, T, d, dtype=torch.float32, device=self.device)
        v_hat = torch.zeros_like(k_hat)
        for b in range(B):
            nq, nw = self._nq[b], self._nw[b]
            k_hat[b, :, :nq] = k_q[b, :, :nq]
            v_hat[b, :, :nq] = v_q[b, :, :nq]
            k_hat[b, :, nq:nq + nw] = self.k_win[b, :, :nw].float()
            v_hat[b, :, nq:nq + nw] = self.v_win[b, :, :nw].float()
        if c.rotate_keys:
            k_hat = rotate(k_hat)
        if c.value_rotation:
            v_hat = rotate(v_hat)
        return k_hat, v_hat

    def kernel_args(self) -> tuple:
        """The cache arguments of ``lrkern::kv_attention`` in order, from ``k_codes`` to ``corr_z``."""
        n_quant, n_win = self.lengths_tensors()
        return (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.k_win,
                self.v_win, n_quant, n_win, self.corr_s, self.corr_z)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): every buffer and length is gathered along the batch dim."""
        picked = [int(i) for i in index.tolist()]  # host copy first: index usually comes from the host already
        idx = torch.tensor(picked, dtype=torch.long, device=self.device)
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_win", "v_win", "corr_s",
                     "corr_z"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
        self._nq = [self._nq[i] for i in picked]
        self._nw = [self._nw[i] for i in picked]
        self.batch_size = len(picked)
        self._lengths_dev = None

    def crop(self, tokens: int) -> None:
        """Drop the newest ``tokens`` tokens of every row (speculative decoding rolls back rejected drafts).

        Exact as long as those tokens are still in the full-precision window: codes and the correction state are
        never touched. (A block that the dropped tokens pushed out of the window stays quantized: the cache is then
        the one that would have flushed that block a little early.) Reaching into quantized blocks would need the original keys back (psi saw them), so it is
        refused; a residual window R > G keeps at least R - G tokens croppable after every flush."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens={tokens!r} must be an int >= 0")
        if tokens == 0:
            return
        if tokens > min(self._nw):
            raise ValueError(f"cannot crop {tokens} tokens: only the residual window can be cropped exactly and the "
                             f"shortest window holds {min(self._nw)} (n_win per row: {self._nw}); build the cache "
                             "with a larger residual (R > group_size) to keep a croppable slack")
        self._nw = [n - tokens for n in self._nw]
        self._lengths_dev = None

    def __repr__(self) -> str:
        return (f"QuantizedKV(batch_size={self.batch_size}, dtype={self.dtype}, device={self.device}, "
                f"lengths={self.lengths}, {', '.join(f'{k}={v}' for k, v in asdict(self.config).items())})")
