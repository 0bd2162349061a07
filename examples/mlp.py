"""A plain MLP regressor: the simplest chain a partitioner can cut anywhere."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Maps (B, in_features) to (B, out_features) through `num_layers` Linear+GELU layers."""

    def __init__(self, in_features: int, hidden: int, out_features: int, num_layers: int) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = nn.GELU()
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, out_features) prediction."""
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
    """Returns the mean squared error; a mean over the batch, so equal micro-batches average to it."""
    return F.mse_loss(pred, target)


def build(
    batch_size: int = 8,
    seed: int = 0,
    *,
    in_features: int = 32,
    hidden: int = 64,
    out_features: int = 8,
    num_layers: int = 6,
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Returns (model, (x,), loss_fn, target) with x (B, in_features) and target (B, out_features).

    The same seed gives the same parameters and data.
    """
    torch.manual_seed(seed)
    model = MLP(in_features, hidden, out_features, num_layers)
    x = torch.randn(batch_size, in_features)
    # A fixed random "teacher" makes the target a learnable function of x, not pure noise.
    teacher = torch.randn(in_features, out_features) / in_features**0.5
    target = torch.tanh(x @ teacher)
    return model, (x,), loss_fn, target
