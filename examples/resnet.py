"""A small residual CNN: a chain of blocks, each with a short skip that stays inside one block."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _group_norm(channels: int) -> nn.GroupNorm:
    """Returns a GroupNorm with groups of 4 channels; per-sample, so micro-batching cannot change it."""
    return nn.GroupNorm(max(1, channels // 4), channels)


class ResidualBlock(nn.Module):
    """Returns relu(x + gn2(conv2(relu(gn1(conv1(x)))))); shape-preserving, identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = _group_norm(channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, C, H, W) block output."""
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return self.relu(x + y)


class ResNet(nn.Module):
    """Maps images (B, in_channels, H, W) to class logits (B, num_classes)."""

    def __init__(self, in_channels: int, width: int, num_blocks: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_gn = _group_norm(width)
        self.relu = nn.ReLU()
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(num_blocks))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, num_classes) logits."""
        x = self.relu(self.stem_gn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))  # global average pool


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """Returns the cross-entropy averaged over the batch (equal micro-batches average to it)."""
    return F.cross_entropy(logits, target)


def build(
    batch_size: int = 8,
    seed: int = 0,
    *,
    in_channels: int = 3,
    image_size: int = 16,
    width: int = 32,
    num_blocks: int = 4,
    num_classes: int = 10,
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Returns (model, (images,), loss_fn, target): images (B, 3, 16, 16) float, target (B,) int64.

    The same seed gives the same parameters and data.
    """
    torch.manual_seed(seed)
    model = ResNet(in_channels, width, num_blocks, num_classes)
    images = torch.randn(batch_size, in_channels, image_size, image_size)
    target = torch.randint(0, num_classes, (batch_size,))
    return model, (images,), loss_fn, target
