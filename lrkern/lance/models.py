"""The small vision models of the LANCE experiments (spec ``lance.md`` section 6), for 1x28x28 inputs.

- ``SmallCNN``: three conv-(BN)-ReLU-maxpool stages (28 -> 14 -> 7 -> 3) and a two-layer classifier, the model of the
  quality check (with BN) and of the continual-learning check (``batchnorm=False``: BN running statistics would drift
  from task to task).
- ``SmallViT``: a pre-norm ViT on 4x4 patches. Every ``nn.Linear`` inside its blocks sees a 3-D input ``[B, L, F]``
  (tokens are never flattened into the batch), the input layout the LANCE compression layer expects when it wraps
  those Linear modules.

Submodules have fixed names (``conv1``..``conv3``, ``fc1``, ``head``; ``blocks.i.attn.qkv`` ...) because experiments
select the layers to fine-tune or wrap by name. ``new_head`` swaps in a freshly initialised, seeded classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """``x [B, 1, 28, 28] -> logits [B, num_classes]``.

    conv1 (1->32) -> bn1 -> ReLU -> maxpool2 (28 -> 14), conv2 (32->64) -> bn2 -> ReLU -> maxpool2 (14 -> 7),
    conv3 (64->128) -> bn3 -> ReLU -> maxpool2 (7 -> 3), flatten (128*3*3 = 1152), fc1 (1152->256) -> ReLU, head
    (256->num_classes). Convolutions are 3x3 with padding 1. With ``batchnorm=False`` there are no BN layers (``bn1``..
    ``bn3`` are ``nn.Identity``).

    Example:
        >>> SmallCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, batchnorm: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.batchnorm = batchnorm
        chans = [1, 32, 64, 128]
        for i in range(3):
            # Default Conv2d (with bias) in both variants, like the spec's prototype; before BN the bias is redundant
            # but harmless, and wrapped layers see the same conv either way.
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1]) if batchnorm else nn.Identity())
        self.fc1 = nn.Linear(128 * 3 * 3, 256)
        self.head = nn.Linear(256, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 1, 28, 28] -> [B, 256]``: everything before the head."""
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"x must be [B, 1, 28, 28], got {tuple(x.shape)}")
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention on ``x [B, L, dim] -> [B, L, dim]``; ``qkv`` and ``proj`` see 3-D inputs."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # [B, L, 3, H, d_h] -> three [B, H, L, d_h]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``x [B, L, dim] -> fc2(GELU(fc1(x))) [B, L, dim]`` with hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; ``x [B, L, dim]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """``x [B, 1, 28, 28] -> logits [B, num_classes]``: a small pre-norm ViT.

    Patches of ``patch x patch`` pixels are embedded by a stride-``patch`` convolution (``patch_embed``) into
    ``(28 / patch)^2`` tokens of width ``dim``; a learned ``cls_token`` is prepended and a learned ``pos_embed``
    [1, L, dim] added (L = tokens + 1). Then ``depth`` blocks ``blocks.0``..``blocks.{depth-1}`` (each with
    ``attn.qkv`` dim->3dim, ``attn.proj``, ``mlp.fc1`` dim->mlp_ratio*dim, GELU, ``mlp.fc2``, LayerNorms ``norm1`` and
    ``norm2``), a final LayerNorm ``norm`` and ``head`` on the cls token. Every Linear in the blocks gets ``[B, L, F]``.

    Example:
        >>> SmallViT()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2,
                 patch: int = 4, image_size: int = 28):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        if num_classes < 1 or depth < 1:
            raise ValueError(f"num_classes={num_classes} and depth={depth} must be positive")
        self.image_size, self.patch, self.dim = image_size, patch, dim
        self.num_tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        # Small random start (as in ViT/DeiT): zero position embeddings would make all patches look alike at step 0.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 1, H, W] -> [B, dim]``: the normalised cls token."""
        if x.dim() != 4 or x.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(f"x must be [B, 1, {self.image_size}, {self.image_size}], got {tuple(x.shape)}")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)                         # [B, L-1, dim]
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed  # [B, L, dim]
        for block in self.blocks:
            t = block(t)
        return self.norm(t[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def new_head(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Linear:
    """Replace ``model.head`` with a fresh ``nn.Linear(in_features, num_classes)`` and return it.

    The new layer has PyTorch's default Linear initialisation drawn under ``torch.manual_seed(seed)`` inside a forked
    RNG, so it is the same for a given seed whatever ran before, and the caller's global RNG stream is untouched. It is
    placed on the old head's device and dtype.
    """
    old = getattr(model, "head", None)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"model must have an nn.Linear `head`; {type(model).__name__}.head is {type(old).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be positive")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, num_classes)
    head = head.to(device=old.weight.device, dtype=old.weight.dtype)
    model.head = head
    return head
