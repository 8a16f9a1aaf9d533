"""The small ResNet-style CNN of the ASM experiments (spec ``asm.md`` section 7), for 1x28x28 (Fashion-)MNIST inputs.

    stem: conv3x3 (in -> 16) -> BN -> ReLU
    stage1: blocks_per_stage basic blocks, 16 channels, stride 1
    stage2: ... 32 channels, stride 2 in the first block (28 -> 14)
    stage3: ... 64 channels, stride 2 in the first block (14 -> 7)
    global average pool -> linear 64 -> num_classes

A basic block is conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (identity, or a 1x1 stride-s conv -> BN
where the shape changes), then ReLU. Convolutions have no bias (BN follows each). Every convolution input is a ReLU
output (non-negative), except the stem's (the normalised image), so unsigned activation quantization fits every layer
that ``lrkern.asm.convert`` constrains by default (the stem and ``fc`` stay float). One block per stage on CPU
(the default), two on a GPU.

Submodule names are fixed (``stem``, ``stem_bn``, ``stages.i.j.conv1`` ...); ``bn_pairs()`` lists the (conv, BN)
pairs for ``lrkern.asm.fold_bn_pairs``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """``x [B, c_in, H, W] -> [B, c_out, H / stride, W / stride]``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(c_out)
        else:
            self.shortcut = None
            self.shortcut_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(out + sc)


class ResNetCNN(nn.Module):
    """``x [B, in_channels, H, W] -> logits [B, num_classes]`` (see the module docstring).

    Example:
        >>> ResNetCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 1, in_channels: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage={blocks_per_stage} must be >= 1")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.blocks_per_stage = blocks_per_stage
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages = []
        c_in = widths[0]
        for i, c in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, c, stride))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))

    def bn_pairs(self) -> list[tuple[str, str]]:
        """(conv name, BN name) of every convolution followed by a BatchNorm."""
        pairs = [("stem", "stem_bn")]
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                p = f"stages.{i}.{j}"
                pairs += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2")]
                if block.shortcut is not None:
                    pairs.append((f"{p}.shortcut", f"{p}.shortcut_bn"))
        return pairs
