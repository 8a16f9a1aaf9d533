"""Per-head feature maps for the linear correction of a quantized KV cache (``phi`` for queries, ``psi`` for keys).

lrkern formulation: ``f(x) = softplus(x @ W_h + b_h)`` per head h, a map R^d -> R^D with positive outputs. Positive
features keep the correction's denominator ``phi(q)^T z`` >= 0 (so ``den > 0``, spec 3.3) without clamping in
practice, and make the correction a kernel-smoothed estimate of the missing softmax mass, which is what it stands
in for. The calibration issue owns the ablation of this choice; any callable with the same shapes can be used.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class FeatureMap(nn.Module):
    """``x [B, H, t, d] -> softplus(x @ W_h + b_h) [B, H, t, D]`` in fp32, one (W_h, b_h) per head.

    Example:
        >>> psi = FeatureMap(num_heads=3, head_dim=64, feature_dim=32)
        >>> psi(torch.randn(2, 3, 5, 64)).shape
        torch.Size([2, 3, 5, 32])
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.randn(num_heads, head_dim, feature_dim) / math.sqrt(head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"FeatureMap expects x [B, {self.num_heads}, t, {self.head_dim}], got {tuple(x.shape)}")
        # [B, H, t, d] @ [H, d, D] broadcasts over B: half the per-call cost of the equivalent einsum at decode sizes.
        y = torch.matmul(x.float(), self.weight.float()) + self.bias.float()[:, None, :]
        return nn.functional.softplus(y)
