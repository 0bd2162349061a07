"""Seeded dropout: every dropout of the captured graph draws its mask from its own generator, seeded
by (seed, step, micro-batch, dropout index), so a micro-batch gets the same masks whatever the
partition, the number of ranks, or the order a schedule runs things in.

Semantics. Dropout number k (in the order the model calls them) on micro-batch i of step s keeps
an element when a uniform draw from torch.Generator seeded with mix(seed, s, i, k) is >= p, and
scales kept elements by 1/(1-p), as torch's dropout does. The front doors count steps (plan.run_local
and each runner count their own, from 0) and the executor names the micro-batch of every forward.
torch's global RNG is neither read nor advanced. To compare with the unpartitioned model, run it under
`seeded_dropout(seed, step, microbatch)` (pipecc.testing.reference_step(..., dropout_seed=) does).

Stages holding a seeded dropout keep autograd's backward split (make_fx would bake one step's seed
into the graph, so the graph-level split refuses them and the runtime splits with autograd).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import TorchFunctionMode

DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, torch.ops.aten.dropout.default)
MASK = (1 << 63) - 1


@dataclass(frozen=True)
class DropoutKey:
    """Which step and micro-batch the running forward belongs to."""

    seed: int
    step: int
    microbatch: int


_step: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("pipecc_dropout_step", default=None)
_microbatch: contextvars.ContextVar[int | None] = contextvars.ContextVar("pipecc_dropout_microbatch", default=None)


@contextlib.contextmanager
def dropout_step(seed: int, step: int) -> Iterator[None]:
    """Seeded dropouts inside draw for step `step` of seed `seed` (the front doors wrap each step)."""
    token = _step.set((seed, step))
    try:
        yield
    finally:
        _step.reset(token)


@contextlib.contextmanager
def dropout_microbatch(microbatch: int) -> Iterator[None]:
    """Seeded dropouts inside draw for `microbatch` (the executor wraps each forward)."""
    token = _microbatch.set(microbatch)
    try:
        yield
    finally:
        _microbatch.reset(token)


def mix(seed: int, step: int, microbatch: int, index: int) -> int:
    """One 63-bit generator seed per (seed, step, micro-batch, dropout index); splitmix64 steps."""
    value = 0
    for part in (seed, step, microbatch, index):
        value = (value ^ (part & MASK)) * 0x9E3779B97F4A7C15 & ((1 << 64) - 1)
        value ^= value >> 31
    return value & MASK


def dropout_mask(shape: torch.Size, p: float, key: DropoutKey, index: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The keep mask of dropout `index` under `key`, already scaled by 1/(1-p)."""
    generator = torch.Generator(device=device).manual_seed(mix(key.seed, key.step, key.microbatch, index))
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def seeded_dropout(x: torch.Tensor, p: float, training: bool, index: int) -> torch.Tensor:
    """x with dropout number `index` applied under the current step and micro-batch; without a
    pipecc step around it (fake-tensor shape propagation, a direct call), plain torch dropout."""
    if not training or p == 0.0:
        return x
    if get_proxy_mode() is not None:  # the split-backward pass tracing the stage: refuse, autograd splits it
        raise RuntimeError("seeded dropout reads its seed at run time; make_fx would bake in one step's masks")
    step, microbatch = _step.get(), _microbatch.get()
    if step is None or microbatch is None:
        return F.dropout(x, p, training)
    return x * dropout_mask(x.shape, p, DropoutKey(step[0], step[1], microbatch), index, x.device, x.dtype)


class SeededDropout(nn.Module):
    """Stands in for an nn.Dropout module of the model; follows that module's train()/eval() and p."""

    def __init__(self, original: nn.Module, index: int) -> None:
        super().__init__()
        self.original = original
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seeded_dropout(x, self.original.p, self.original.training, self.index)


def seed_dropouts(gm: fx.GraphModule) -> int:
    """Rewrite, in place, every dropout of `gm` (nn.Dropout modules and F.dropout calls) into a seeded
    one numbered in graph order; returns how many. Node names stay, so costs and partitions are unchanged."""
    index = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Dropout:
            name = f"pipecc_seeded_dropout_{index}"
            gm.add_submodule(name, SeededDropout(gm.get_submodule(str(node.target)), index))
            node.target = name
        elif node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
            x, p, training = _dropout_arguments(node.args, node.kwargs)
            node.target = seeded_dropout
            node.args, node.kwargs = (x, p, training, index), {}
        else:
            continue
        index += 1
    if index:
        gm.recompile()
    return index


def _dropout_arguments(args: tuple, kwargs: dict) -> tuple[object, float, bool]:
    """(input, p, training) of an F.dropout / torch.dropout / aten.dropout call, defaults filled in."""
    values = dict(zip(("input", "p", "training"), args))
    values.update((k if k != "train" else "training", v) for k, v in kwargs.items())
    return values["input"], float(values.get("p", 0.5)), bool(values.get("training", True))


class _SeededDropoutMode(TorchFunctionMode):
    """Eager F.dropout calls numbered in call order and drawn as seeded_dropout draws them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in (F.dropout, torch.dropout):
            x, p, training = _dropout_arguments(tuple(args), kwargs)
            self.count += 1
            return seeded_dropout(x, p, training, self.count - 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def seeded_eager_dropout(seed: int, step: int, microbatch: int) -> Iterator[None]:
    """Run an unpartitioned model with the masks pipecc draws for (seed, step, micro-batch)."""
    with dropout_step(seed, step), dropout_microbatch(microbatch), _SeededDropoutMode():
        yield
