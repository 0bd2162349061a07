"""The models every equivalence test runs: the bundled examples at their default (small) sizes, and
TwoTowers, a branchy model whose best partition needs another topological order than its own."""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

MODEL_NAMES = ("mlp", "gpt", "resnet", "unet", "bert")


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], torch.Tensor]:
    """(model, inputs, loss_fn, target) of example `name`, batch 8, seed 0."""
    return importlib.import_module(f"examples.{name}").build(batch_size=8, seed=0)


class TwoTowers(nn.Module):
    """Two towers of the same shape over one input, `width` -> `hidden` -> ... -> `width`, joined by a
    linear head, written layer by layer *interleaved* (tower a's layer k, then tower b's): in the
    graph's own order every cut between the towers carries a `hidden`-wide tensor of each, while
    running tower a, then tower b, lets a cut carry only a's `width`-wide output."""

    def __init__(self, width: int = 8, hidden: int = 512, depth: int = 3) -> None:
        super().__init__()
        sizes = [width] + [hidden] * (depth - 1) + [width]
        self.a = nn.ModuleList(nn.Linear(m, n) for m, n in zip(sizes, sizes[1:]))
        self.b = nn.ModuleList(nn.Linear(m, n) for m, n in zip(sizes, sizes[1:]))
        self.head = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x, x
        for layer_a, layer_b in zip(self.a, self.b):
            a = torch.tanh(layer_a(a))
            b = torch.tanh(layer_b(b))
        return self.head(torch.cat([a, b], dim=-1))


def build_two_towers(batch_size: int = 8, seed: int = 0) -> tuple[TwoTowers, tuple[torch.Tensor, ...],
                                                                   Callable[..., torch.Tensor], torch.Tensor]:
    """(model, inputs, loss_fn, target) of a TwoTowers, seeded."""
    torch.manual_seed(seed)
    model = TwoTowers()
    return model, (torch.randn(batch_size, 8),), nn.functional.mse_loss, torch.randn(batch_size, 8)
