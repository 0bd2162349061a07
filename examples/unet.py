"""A U-Net: long skip connections, the first of which spans almost the whole network.

A pipeline cut between the encoder and the decoder must carry every skip across it, and the
level-1 skip crosses every cut, so with 3+ stages it rides through stages that never read it.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBlock(nn.Module):
    """Two (3x3 conv, GroupNorm, ReLU) layers; keeps H and W, maps in_ch to out_ch channels."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        groups = max(1, out_ch // 4)  # GroupNorm, not BatchNorm: per-sample statistics
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, out_ch)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, out_ch, H, W) feature map."""
        x = self.relu(self.gn1(self.conv1(x)))
        return self.relu(self.gn2(self.conv2(x)))


class UNet(nn.Module):
    """Maps images (B, in_channels, H, W) to a (B, out_channels, H, W) map; H and W divisible by 8."""

    def __init__(self, in_channels: int, out_channels: int, base: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.down1 = ConvBlock(in_channels, c1)
        self.down2 = ConvBlock(c1, c2)
        self.down3 = ConvBlock(c2, c3)
        self.pool = nn.AvgPool2d(2)
        self.bottleneck = ConvBlock(c3, c4)
        # Each up block reads the upsampled map concatenated with the encoder map of its level.
        self.up3 = ConvBlock(c4 + c3, c3)
        self.up2 = ConvBlock(c3 + c2, c2)
        self.up1 = ConvBlock(c2 + c1, c1)
        self.head = nn.Conv2d(c1, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, out_channels, H, W) prediction."""
        skip1 = self.down1(x)                      # H
        skip2 = self.down2(self.pool(skip1))       # H/2
        skip3 = self.down3(self.pool(skip2))       # H/4
        y = self.bottleneck(self.pool(skip3))      # H/8
        y = self.up3(torch.cat([_upsample(y), skip3], dim=1))
        y = self.up2(torch.cat([_upsample(y), skip2], dim=1))
        y = self.up1(torch.cat([_upsample(y), skip1], dim=1))
        return self.head(y)


def _upsample(x: Tensor) -> Tensor:
    """Returns x with H and W doubled by nearest-neighbour copy."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
    """Returns the mean squared error over every pixel (equal micro-batches average to it)."""
    return F.mse_loss(pred, target)


def build(
    batch_size: int = 8,
    seed: int = 0,
    *,
    in_channels: int = 3,
    out_channels: int = 1,
    image_size: int = 32,
    base: int = 8,
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Returns (model, (images,), loss_fn, target): images (B, 3, 32, 32), target (B, 1, 32, 32).

    The same seed gives the same parameters and data.
    """
    torch.manual_seed(seed)
    model = UNet(in_channels, out_channels, base)
    images = torch.randn(batch_size, in_channels, image_size, image_size)
    # A smooth function of the input (a blurred channel mean) so the target is learnable.
    target = F.avg_pool2d(images.mean(dim=1, keepdim=True), 3, stride=1, padding=1)
    return model, (images,), loss_fn, target
