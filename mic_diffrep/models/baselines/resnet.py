"""The small ResNet encoder of MoCo v2 and BYOL, their MLP heads, and momentum (EMA) targets."""

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style encoder for one-channel images: a stem, one basic block per stage, global average pooling."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.output_dim = widths[-1]

    def feature_map(self, x):
        """The last stage's activations `(B, C, H, W)`, before pooling."""
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.feature_map(x).mean(dim=(2, 3))


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, out_dim))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that takes no gradients (a momentum / EMA target)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """`target = momentum * target + (1 - momentum) * online`, parameter by parameter (buffers copied)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)
