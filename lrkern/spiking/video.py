"""The compressed-domain action-recognition model of spec ``spiking_video.md`` 3.4 (every layer choice here is an
**lrkern formulation**: the paper, arXiv 2503.13724, publishes only its abstract).

Inputs are the compressed-domain tensors of ``lrkern.data.compressed`` for a batch of B clips of K GOPs:

- ``iframes`` uint8 ``[B, K, 3, H, W]``: one decoded picture per GOP;
- ``mv`` float ``[B, T, 2 | 3, h, w]``: per-P-frame motion vectors on the 16x16 grid (h = H / 16), in units of 8 px;
- ``residual`` int8 ``[B, T, 1 | 3, H / 2, W / 2]``: per-P-frame motion-compensation residuals;
- ``gop_index`` int64 ``[T]`` or ``[B, T]``: the GOP each P-frame belongs to.

Model (``CompressedVideoNet``):

- **I-frame encoder** E_I: four stride-2 conv-BN-ReLU stages 3 -> 32 -> 64 -> 128 -> D, giving ``F_I [B, K, D, h, w]``.
- **P-frame encoder** E_P, frame-wise with T folded into the batch: an MV stem (two stride-1 3x3 convs, C_m
  channels) and a residual stem (three stride-2 convs down to 1/16 of the frame, C_r channels), concatenated and
  batch-normalised into U ``[T, B, C, h, w]``; then the **STM** (``lrkern.spiking.STM``: LIF with a spike-driven
  dynamic threshold), whose input is modulated by the I-frame of the same GOP, ``g[b, k, c] = 1 + tanh(W_g
  GAP(F_I[b, k]))`` (W_g starts at 0, so the STM starts as a plain SpikingJelly LIF); then L_s spiking
  conv-BN-LIF blocks. The per-GOP firing rate ``r_k = mean_{t in GOP k} S_t`` is linearly mapped to D: the P tokens.
- **Unified transformer**: [CLS] + K h w I tokens + K h w P tokens, learned type embeddings (I / P) and factorised
  position embeddings (GOP, y, x); L_u pre-norm blocks of global multi-head self-attention (SDPA) and an MLP.
- **Multi-Modal Mixer Block**: token mixing along the joint token axis (hidden 2L, shared over channels), channel
  mixing (hidden 4D), and a cross-modal gate ``X_I <- X_I + sigmoid(W_I mean(X_P)) X_I`` mirrored for X_P; then
  [CLS, mean of the tokens] -> LayerNorm -> linear classifier.

Variants (``variant``): ``"full"`` (both modalities), ``"iframe_only"`` and ``"pframe_only"``; ``p_neuron`` picks the
P path's first neuron: ``"stm"`` (default), ``"lif"`` (beta = 0, g = 1: plain LIF) or ``"relu"`` (a non-spiking P path:
every LIF of the P encoder becomes a ReLU).

Options (spec 3.2 and its ablations):

- ``reset_per_gop``: the P path's neurons (the STM, with its spike trace, and every LIF of the spiking blocks) restart
  from the reset state at the first P-frame of every GOP instead of carrying their state across GOPs (the default).
  Each GOP's run of P-frames is laid out as a clip of its own (``GopSegments``: a gather into ``[L_max, S, ...]``,
  S = number of GOP runs in the batch, shorter runs zero-padded at their end), so each neuron layer is still one fused
  multi-step call, and a call starting from v0 = None is exactly a reset. The convolutions and batch norms stay on
  the ``[T, B]`` layout, so their batch statistics are those of the default model. The GOP runs come from
  ``gop_index`` (a run starts wherever it changes along T), per clip, so clips with different GOP boundaries work.
  A ReLU P path (``p_neuron="relu"``) has no state, so the option changes nothing there.
- ``accumulate``: which P-frame inputs the model was built for: None (per-frame MVs and residuals) or ``"coviar"``
  (accumulated back to the GOP's I-frame, ``lrkern.data.compressed.decode_compressed(accumulate="coviar")``). The
  layers are the same; ``config_for`` checks that the data were decoded the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lrkern.spiking import LIF
from lrkern.spiking.stm import STM

VARIANTS = ("full", "iframe_only", "pframe_only")
P_NEURONS = ("stm", "lif", "relu")
ACCUMULATE = (None, "coviar")  # lrkern.data.compressed.ACCUMULATE


@dataclass(frozen=True)
class VideoNetConfig:
    """Shapes and widths. ``frame`` is (H, W) (multiples of 16), ``gops`` is K."""

    num_classes: int = 8
    frame: tuple[int, int] = (96, 96)
    gops: int = 3
    dim: int = 128              # D
    heads: int = 4
    depth: int = 2              # L_u transformer blocks
    spiking_blocks: int = 2     # L_s conv-BN-LIF blocks after the STM
    mv_channels: int = 16       # C_m
    res_channels: int = 16      # C_r
    mv_in: int = 2              # 2, or 3 with the validity mask
    res_in: int = 1             # 1 (luma) or 3 (RGB residual)
    variant: str = "full"
    p_neuron: str = "stm"
    dropout: float = 0.0
    reset_per_gop: bool = False  # restart the P path's neurons at every GOP (else their state carries across GOPs)
    accumulate: Optional[str] = None  # the P inputs: None (per frame) or "coviar" (accumulated to the I-frame)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; accepted: {', '.join(VARIANTS)}")
        if self.p_neuron not in P_NEURONS:
            raise ValueError(f"p_neuron={self.p_neuron!r}; accepted: {', '.join(P_NEURONS)}")
        if not isinstance(self.reset_per_gop, bool):
            raise ValueError(f"reset_per_gop={self.reset_per_gop!r} must be a bool")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate={self.accumulate!r}; accepted: None, "
                             + ", ".join(repr(a) for a in ACCUMULATE if a))
        H, W = self.frame
        if H % 16 or W % 16 or H <= 0 or W <= 0:
            raise ValueError(f"frame={self.frame} must be positive multiples of 16")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame[0] // 16, self.frame[1] // 16

    @property
    def uses_i(self) -> bool:
        return self.variant in ("full", "iframe_only")

    @property
    def uses_p(self) -> bool:
        return self.variant in ("full", "pframe_only")

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return 1 + self.gops * h * w * (int(self.uses_i) + int(self.uses_p))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


class IFrameEncoder(nn.Module):
    """Four stride-2 conv-BN-ReLU stages: uint8 RGB ``[N, 3, H, W]`` -> ``[N, D, H/16, W/16]``."""

    def __init__(self, dim: int):
        super().__init__()
        chans, layers = (3, 32, 64, 128, dim), []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += _conv_bn(cin, cout, 2) + [nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        # ImageNet-style normalisation of 0..255 pixels, as buffers so they follow .to(device).
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net((frames.float() - self.mean) / self.std)


class GopSegments:
    """Lays the P-frames of every (clip, GOP run) out as a clip of their own, for neurons that restart per GOP.

    ``gop_index`` ``[B, T]``: a run starts at t = 0 and wherever ``gop_index[b, t] != gop_index[b, t - 1]``. With S
    runs in the batch, the longest L_max steps long, ``split`` maps time-major ``[T, B, ...]`` to ``[L_max, S, ...]``
    (run s of the batch in column s, step l of the run in row l; shorter runs are zero-padded at their end) and
    ``merge`` maps a result back. A multi-step neuron is causal, so the padded steps never reach the real ones, and
    their outputs are dropped (their gradient is zero). Both are one index op, differentiable.
    """

    def __init__(self, gop_index: torch.Tensor):
        B, T = gop_index.shape
        start = torch.ones_like(gop_index, dtype=torch.bool)
        start[:, 1:] = gop_index[:, 1:] != gop_index[:, :-1]
        run = start.long().cumsum(1) - 1                                      # run of (b, t) inside clip b
        runs = run[:, -1] + 1                                                 # runs per clip
        first = runs.cumsum(0) - runs                                         # first run id of each clip
        t = torch.arange(T, device=gop_index.device).expand(B, T)
        step = t - torch.where(start, t, torch.zeros_like(t)).cummax(1).values  # step inside the run
        self.shape = (T, B)
        self.runs = int(runs.sum())
        self.steps = int(step.max()) + 1
        # q[t * B + b]: where (t, b) goes in the flattened [L_max, S] layout.
        self.index = (step * self.runs + first[:, None] + run).t().reshape(-1)
        self.identity = self.runs == B  # one run per clip, starting at t = 0: the layout is unchanged

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, ...]`` -> ``[L_max, S, ...]``."""
        if self.identity:
            return x
        rest = x.shape[2:]
        out = x.new_zeros((self.steps * self.runs, *rest)).index_copy(0, self.index, x.reshape(-1, *rest))
        return out.view(self.steps, self.runs, *rest)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """``[L_max, S, ...]`` -> ``[T, B, ...]``."""
        if self.identity:
            return y
        rest = y.shape[2:]
        return y.reshape(-1, *rest).index_select(0, self.index).view(*self.shape, *rest)


class PerGop(nn.Module):
    """``per_gop(neuron, x, segments)``: the multi-step ``neuron`` run on every GOP run of ``x [T, B, ...]`` from the
    reset state (``segments`` None: on the whole sequence). It owns no parameters, so a model's state dict does not
    change; it is a module so that ``lrkern.spiking.energy.OpCounter`` sees its output as spikes (``emits_spikes``)."""

    emits_spikes = True

    def forward(self, neuron: nn.Module, x: torch.Tensor, segments: Optional[GopSegments]) -> torch.Tensor:
        if segments is None:
            return neuron(x)
        return segments.merge(neuron(segments.split(x)))


def _neuron(neuron: nn.Module, x: torch.Tensor, segments: Optional[GopSegments],
            per_gop: Optional[PerGop]) -> torch.Tensor:
    # ReLU has no state: nothing to reset, so it keeps the plain call.
    if segments is None or per_gop is None or not isinstance(neuron, (LIF, STM)):
        return neuron(x)
    return per_gop(neuron, x, segments)


class SpikingConvBlock(nn.Module):
    """conv3x3-BN on every time step (T folded into the batch), then a multi-step LIF (or ReLU) over ``[T, B, ...]``
    (per GOP run when ``segments`` is given)."""

    def __init__(self, channels: int, spiking: bool, reset_per_gop: bool = False):
        super().__init__()
        self.conv, self.bn = _conv_bn(channels, channels, 1)
        self.neuron = LIF() if spiking else nn.ReLU()
        self.per_gop = PerGop() if reset_per_gop and spiking else None

    def forward(self, s: torch.Tensor, segments: Optional[GopSegments] = None) -> torch.Tensor:
        T, B = s.shape[:2]
        y = self.bn(self.conv(s.flatten(0, 1)))
        return _neuron(self.neuron, y.view(T, B, *y.shape[1:]), segments, self.per_gop)


class PFrameEncoder(nn.Module):
    """MV and residual stems, STM, L_s spiking blocks: -> spikes ``[T, B, C, h, w]`` (rates for the ReLU variant)."""

    def __init__(self, cfg: VideoNetConfig):
        super().__init__()
        cm, cr = cfg.mv_channels, cfg.res_channels
        self.mv_stem = nn.Sequential(*_conv_bn(cfg.mv_in, cm, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(cm, cm, 3, 1, 1, bias=False))
        self.res_stem = nn.Sequential(*_conv_bn(cfg.res_in, 16, 2), nn.ReLU(inplace=True),
                                      *_conv_bn(16, 32, 2), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, cr, 3, 2, 1, bias=False))
        self.channels = cm + cr
        self.bn = nn.BatchNorm2d(self.channels)
        self.p_neuron = cfg.p_neuron
        self.stm = STM(self.channels) if cfg.p_neuron == "stm" else (LIF() if cfg.p_neuron == "lif" else nn.ReLU())
        spiking = cfg.p_neuron != "relu"
        self.per_gop = PerGop() if cfg.reset_per_gop and spiking else None
        self.blocks = nn.ModuleList(SpikingConvBlock(self.channels, spiking, cfg.reset_per_gop)
                                    for _ in range(cfg.spiking_blocks))

    def forward(self, mv: torch.Tensor, residual: torch.Tensor, gain_t: Optional[torch.Tensor],
                segments: Optional[GopSegments] = None) -> torch.Tensor:
        """mv ``[B, T, 2|3, h, w]``, residual int8 / int16 ``[B, T, 1|3, H/2, W/2]``, gain_t ``[T, B, C]`` or None;
        segments: restart every neuron at each GOP run (``GopSegments``), or None (state carries over)."""
        B, T = mv.shape[:2]
        # Time-major frames: [T, B, ...] folded to [T*B, ...] for the frame-wise stems.
        m = self.mv_stem(mv.transpose(0, 1).flatten(0, 1).float())
        r = self.res_stem(residual.transpose(0, 1).flatten(0, 1).float() / 32.0)
        if r.shape[-2:] != m.shape[-2:]:
            raise ValueError(f"residual frames give a {tuple(r.shape[-2:])} grid but mv has {tuple(m.shape[-2:])}; "
                             "the residual must be at half the frame size")
        u = self.bn(torch.cat([m, r], 1)).view(T, B, self.channels, *m.shape[-2:])
        if gain_t is not None:
            # The gain varies with the GOP, so it is applied here rather than through the op's per-call [B, C] gain.
            u = u * gain_t[..., None, None]
        s = _neuron(self.stm, u, segments, self.per_gop)
        for block in self.blocks:
            s = block(s, segments)
        return s


def _gop_rows(gop_index: torch.Tensor, B: int, T: int, K: int, device) -> torch.Tensor:
    """``gop_index`` ``[T]`` or ``[B, T]`` checked and expanded to ``[B, T]`` on ``device``."""
    gi = gop_index.to(device)
    gi = gi.expand(B, T) if gi.dim() == 1 else gi
    if gi.shape != (B, T):
        raise ValueError(f"gop_index must be [T] or [B, T] = [{B}, {T}], got {tuple(gop_index.shape)}")
    if int(gi.min()) < 0 or int(gi.max()) >= K:
        raise ValueError(f"gop_index values must lie in [0, {K}) (K = number of I-frames), got "
                         f"[{int(gi.min())}, {int(gi.max())}]")
    return gi


def _gop_average(gop_index: torch.Tensor, B: int, T: int, K: int, dtype, device) -> torch.Tensor:
    """``[B, K, T]`` averaging weights: row k holds 1/|GOP k| on the P-frames of GOP k."""
    gi = _gop_rows(gop_index, B, T, K, device)
    onehot = F.one_hot(gi, K).to(dtype).transpose(1, 2)  # [B, K, T]
    return onehot / onehot.sum(-1, keepdim=True).clamp_min(1)


class Attention(nn.Module):
    """Global multi-head self-attention through SDPA (every token attends to both modalities)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    @staticmethod
    def attention_macs(x: torch.Tensor) -> int:
        """MACs of the two attention matmuls (Q K^T and A V) for x ``[B, L, D]`` (for ``lrkern.spiking.energy``)."""
        B, L, D = x.shape
        return 2 * B * L * L * D


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), _mlp(dim, 4 * dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixerBlock(nn.Module):
    """Token mixing over the joint token axis, channel mixing, and the cross-modal gate between I and P tokens."""

    def __init__(self, tokens: int, dim: int, n_i: int, n_p: int, dropout: float):
        super().__init__()
        self.n_i, self.n_p = n_i, n_p
        self.norm_tok, self.token_mlp = nn.LayerNorm(dim), _mlp(tokens, 2 * tokens, dropout)
        self.norm_ch, self.channel_mlp = nn.LayerNorm(dim), _mlp(dim, 4 * dim, dropout)
        self.gate_i = nn.Linear(dim, dim) if n_i and n_p else None
        self.gate_p = nn.Linear(dim, dim) if n_i and n_p else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm_tok(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.norm_ch(x))
        if self.gate_i is None:
            return x
        cls, xi, xp = x[:, :1], x[:, 1:1 + self.n_i], x[:, 1 + self.n_i:]
        # Both gates read the tokens before either update, so the I and P updates are symmetric.
        gi = torch.sigmoid(self.gate_i(xp.mean(1, keepdim=True)))
        gp = torch.sigmoid(self.gate_p(xi.mean(1, keepdim=True)))
        return torch.cat([cls, xi + gi * xi, xp + gp * xp], 1)


class CompressedVideoNet(nn.Module):
    """``forward(iframes, mv, residual, gop_index) -> logits [B, num_classes]`` (see the module docstring)."""

    def __init__(self, cfg: VideoNetConfig = VideoNetConfig()):
        super().__init__()
        self.cfg = cfg
        D, (h, w), K = cfg.dim, cfg.grid, cfg.gops
        self.i_enc = IFrameEncoder(D) if cfg.uses_i else None
        self.p_enc = PFrameEncoder(cfg) if cfg.uses_p else None
        self.p_token = nn.Linear(self.p_enc.channels, D) if cfg.uses_p else None
        # Cross-domain modulation of the STM input by the same GOP's I-frame (full model with the STM only).
        self.gain = None
        if cfg.uses_i and cfg.uses_p and cfg.p_neuron == "stm":
            self.gain = nn.Linear(D, self.p_enc.channels)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.type_emb = nn.Parameter(torch.zeros(2, D))
        self.pos_gop = nn.Parameter(torch.zeros(K, 1, 1, D))
        self.pos_y = nn.Parameter(torch.zeros(1, h, 1, D))
        self.pos_x = nn.Parameter(torch.zeros(1, 1, w, D))
        for p in (self.cls, self.type_emb, self.pos_gop, self.pos_y, self.pos_x):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        n = K * h * w
        self.mixer = MixerBlock(cfg.tokens, D, n if cfg.uses_i else 0, n if cfg.uses_p else 0, cfg.dropout)
        self.norm = nn.LayerNorm(2 * D)
        self.head = nn.Linear(2 * D, cfg.num_classes)

    def _check(self, iframes, mv, residual) -> tuple[int, int]:
        cfg, (h, w) = self.cfg, self.cfg.grid
        B, K = iframes.shape[:2]
        if iframes.dim() != 5 or tuple(iframes.shape[1:]) != (cfg.gops, 3, *cfg.frame):
            raise ValueError(f"iframes must be [B, {cfg.gops}, 3, {cfg.frame[0]}, {cfg.frame[1]}], "
                             f"got {tuple(iframes.shape)}")
        if mv.dim() != 5 or mv.shape[0] != B or tuple(mv.shape[2:]) != (cfg.mv_in, h, w):
            raise ValueError(f"mv must be [B={B}, T, {cfg.mv_in}, {h}, {w}], got {tuple(mv.shape)}")
        T = mv.shape[1]
        H2, W2 = cfg.frame[0] // 2, cfg.frame[1] // 2
        if tuple(residual.shape) != (B, T, cfg.res_in, H2, W2):
            raise ValueError(f"residual must be [B, T, {cfg.res_in}, {H2}, {W2}] = "
                             f"{(B, T, cfg.res_in, H2, W2)}, got {tuple(residual.shape)}")
        return B, T

    def _tokens(self, grid: torch.Tensor, kind: int) -> torch.Tensor:
        """``[B, K, h, w, D]`` -> ``[B, K h w, D]`` with the type and factorised position embeddings added."""
        return (grid + self.pos_gop + self.pos_y + self.pos_x + self.type_emb[kind]).flatten(1, 3)

    def forward(self, iframes: torch.Tensor, mv: torch.Tensor, residual: torch.Tensor,
                gop_index: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T = self._check(iframes, mv, residual)
        K, D, (h, w) = cfg.gops, cfg.dim, cfg.grid
        tokens = [self.cls.expand(B, 1, D)]
        f_i = None
        if self.i_enc is not None:
            f_i = self.i_enc(iframes.flatten(0, 1)).view(B, K, D, h, w)
            tokens.append(self._tokens(f_i.permute(0, 1, 3, 4, 2), 0))
        if self.p_enc is not None:
            avg = _gop_average(gop_index, B, T, K, torch.float32, mv.device)
            gain_t = None
            if self.gain is not None:
                g = 1 + torch.tanh(self.gain(f_i.mean((-2, -1))))           # [B, K, C]
                gain_t = torch.einsum("bkt,bkc->tbc", (avg > 0).to(g.dtype), g)  # the gain of each P-frame's GOP
            segments = GopSegments(_gop_rows(gop_index, B, T, K, mv.device)) if cfg.reset_per_gop else None
            s = self.p_enc(mv, residual, gain_t, segments)                  # [T, B, C, h, w]
            rates = torch.einsum("bkt,tbchw->bkhwc", avg.to(s.dtype), s)    # per-GOP firing rate
            tokens.append(self._tokens(self.p_token(rates), 1))
        x = torch.cat(tokens, 1)
        for block in self.blocks:
            x = block(x)
        x = self.mixer(x)
        return self.head(self.norm(torch.cat([x[:, 0], x[:, 1:].mean(1)], -1)))


# The experiment's named models (bench/video_model.py, ``lrkern video``): variant and P-path neuron.
MODELS = {
    "full": dict(variant="full", p_neuron="stm"),
    "full_lif": dict(variant="full", p_neuron="lif"),
    "full_relu": dict(variant="full", p_neuron="relu"),
    "iframe_only": dict(variant="iframe_only"),
    "pframe_only": dict(variant="pframe_only", p_neuron="stm"),
    # Ablations of spec 3.2 (not in the default experiment): neurons restarted at every GOP; CoViAR-accumulated inputs.
    "full_reset_gop": dict(variant="full", p_neuron="stm", reset_per_gop=True),
    "full_coviar": dict(variant="full", p_neuron="stm", accumulate="coviar"),
}


def config_for(name: str, data, **overrides) -> VideoNetConfig:
    """The config of model ``name`` (a key of ``MODELS``) for a dataset's shapes (``VideoTensors``-like).

    ``accumulate`` defaults to the data's (``data.meta["accumulate"]``, None when absent); a model or override that
    asks for other inputs than the data hold raises ValueError."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {', '.join(MODELS)}")
    K, _, H, W = data.iframes.shape[1:]
    data_acc = (getattr(data, "meta", None) or {}).get("accumulate")
    cfg = VideoNetConfig(**{"num_classes": len(data.classes), "frame": (H, W), "gops": K, "mv_in": data.mv.shape[2],
                            "res_in": data.residual.shape[2], "accumulate": data_acc, **MODELS[name], **overrides})
    if cfg.accumulate != data_acc:
        raise ValueError(f"model {name!r} takes accumulate={cfg.accumulate!r} inputs but the data were decoded with "
                         f"accumulate={data_acc!r}; load them with the same accumulate (e.g. "
                         f"synth_motion.load_split(root, split, accumulate={cfg.accumulate!r}))")
    return cfg
