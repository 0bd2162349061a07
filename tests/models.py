"""The models every equivalence test runs: the bundled examples at their default (small) sizes."""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

MODEL_NAMES = ("mlp", "gpt", "resnet", "unet", "bert")


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], torch.Tensor]:
    """(model, inputs, loss_fn, target) of example `name`, batch 8, seed 0."""
    return importlib.import_module(f"examples.{name}").build(batch_size=8, seed=0)
