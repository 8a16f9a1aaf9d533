"""Per-head feature maps for the linear correction of a quantized KV cache (``phi`` for queries, ``psi`` for keys).

lrkern formulation: ``f(x) = act(x @ W_h + b_h)`` per head h, a map R^d -> R^D with positive outputs. Positive
features keep the correction's denominator ``phi(q)^T z`` >= 0 (so ``den > 0``, spec 3.3) without clamping in
practice, and make the correction a kernel-smoothed estimate of the missing softmax mass, which is what it stands
in for. Two activations:

- ``"softplus"`` (the default): ``log(1 + e^y)``; grows linearly, so ``phi(q).psi(k)`` grows only quadratically in
  the pre-activations.
- ``"exp"``: ``e^min(y, EXP_MAX_PREACT)``; ``phi(q).psi(k) = sum_f e^{y_f(q) + y'_f(k)}`` follows the exponential of
  a bilinear-plus-bias form, like the softmax weights e^{s_j} whose quantization error it replaces (positive random
  features of Performer / Hedgehog-style maps have this form too). The clamp keeps every feature <= e^20 (~5e8), so
  ``phi.S`` and ``phi.z`` stay far from fp32 overflow for any realistic sequence length.

Initialisation: ``"softplus"`` keeps its original one (W ~ N(0, 1/d), b = 0). ``"exp"`` starts near zero (b =
``EXP_INIT_BIAS``, W ~ N(0, (EXP_INIT_WEIGHT_SCALE)^2 / d)): each feature ~e^-10, so the correction weighs ~1e-7 per
query-key pair, the cache starts as the uncorrected one, and calibration grows the correction where it helps. With
softplus' init, exp features of real queries and keys (norms ~13-15 in SmolLM2-135M: pre-activations of std ~2)
would add a correction of order D e^{+-4} per pair from step 0, a guess that calibration then has to undo.
``lrkern.kvlinc.fit.init_feature_maps`` applies the near-zero init to any FeatureMap.

The calibration ablation (``bench/ablate_kvlinc_features.py``) compares the two; any callable with the same shapes
can be used instead.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = ("softplus", "exp")
# Largest pre-activation of the "exp" features: e^20 * e^20 * D stays below 1e20 per query-key pair (fp32: 3e38).
EXP_MAX_PREACT = 20.0
# Near-zero start of the "exp" features (see the module docstring); also lrkern.kvlinc.fit.init_feature_maps' default.
EXP_INIT_BIAS = -10.0
EXP_INIT_WEIGHT_SCALE = 0.1


class FeatureMap(nn.Module):
    """``x [B, H, t, d] -> act(x @ W_h + b_h) [B, H, t, D]`` in fp32, one (W_h, b_h) per head; ``act`` is
    ``activation`` (``"softplus"`` or ``"exp"``, see the module docstring for both and their initialisations), kept
    as ``self.activation``.

    Example:
        >>> psi = FeatureMap(num_heads=3, head_dim=64, feature_dim=32)
        >>> psi(torch.randn(2, 3, 5, 64)).shape
        torch.Size([2, 3, 5, 32])
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, activation: str = "softplus"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; accepted: {', '.join(ACTIVATIONS)}")
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.activation = activation
        weight = torch.randn(num_heads, head_dim, feature_dim) / math.sqrt(head_dim)
        bias = torch.zeros(num_heads, feature_dim)
        if activation == "exp":
            weight, bias = weight * EXP_INIT_WEIGHT_SCALE, bias + EXP_INIT_BIAS
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"FeatureMap expects x [B, {self.num_heads}, t, {self.head_dim}], got {tuple(x.shape)}")
        # [B, H, t, d] @ [H, d, D] broadcasts over B: half the per-call cost of the equivalent einsum at decode sizes.
        y = torch.matmul(x.float(), self.weight.float()) + self.bias.float()[:, None, :]
        if self.activation == "exp":
            return torch.exp(y.clamp(max=EXP_MAX_PREACT))
        return nn.functional.softplus(y)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
                f"activation={self.activation!r}")
