"""Testing helpers: the unpartitioned reference step, gradient comparison, and local gloo launches.

Used by pipecc's own tests and meant for users checking their own models the same way.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pipecc.passes.rng import seeded_eager_dropout
from pipecc.runtime.launch import free_port, spawn_local

if TYPE_CHECKING:
    from pipecc.plan import Plan

__all__ = ["reference_step", "assert_same_grads", "assert_same_step", "run_ranks", "rank_step", "free_port"]

RTOL = 1e-5
ATOL = 1e-6  # gradients near zero: summation order alone moves them by ~1e-8


def reference_step(model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                   target: torch.Tensor, num_microbatches: int = 1, *, dropout_seed: int = 0,
                   step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one unpartitioned step on a copy of `model`, over the same
    micro-batches a plan uses (the loss is their mean).

    Dropout draws the masks a plan draws for step `step` (its first is 0) with `dropout_seed`
    (plan.dropout_seed, 0 unless set): see pipecc.passes.rng. BatchNorm sees the same micro-batches
    in the same order as a plan's stages do, so its batch statistics and running stats agree too.

    The micro-batching matters at float32 round-off only: the unpartitioned model itself moves
    conv weight gradients by ~7e-5 of their largest element between 1 and 8 micro-batches
    (summation order), so comparing at rtol 1e-5 needs the same micro-batches."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    micro_inputs = [t.chunk(num_microbatches) for t in inputs]
    losses = []
    for mb, mb_target in enumerate(target.chunk(num_microbatches)):
        with seeded_eager_dropout(dropout_seed, step, mb):
            loss = loss_fn(ref(*(chunks[mb] for chunks in micro_inputs)), mb_target)
        (loss / num_microbatches).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    return torch.stack(losses).mean(), grads


def assert_same_grads(grads: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                      names: Iterable[str] | None = None) -> None:
    """Every gradient in `grads` (or the `names` subset) equals `expected` to float32 round-off."""
    for name in (names if names is not None else grads):
        torch.testing.assert_close(grads[name], expected[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def assert_same_step(model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                     target: torch.Tensor, plan: Plan) -> None:
    """plan.run_local gives the loss and every gradient of the unpartitioned model."""
    expected_loss, expected = reference_step(model, inputs, loss_fn, target, plan.config.num_microbatches,
                                             dropout_seed=plan.dropout_seed, step=plan.num_local_steps)
    for _, param in plan.named_parameters():
        param.grad = None
    loss = plan.run_local(*inputs, target=target)
    torch.testing.assert_close(loss, expected_loss, rtol=RTOL, atol=ATOL)
    grads = {n: p.grad for n, p in plan.named_parameters()}
    assert set(grads) == set(expected), f"parameters differ: {set(grads) ^ set(expected)}"
    assert_same_grads(grads, expected)


def rank_step(plan: Plan, inputs: Sequence[torch.Tensor], target: torch.Tensor,
              timeout_s: float = 120.0) -> tuple[float | None, dict[str, torch.Tensor]]:
    """On one rank of an initialised process group (e.g. inside `run_ranks`): one training step of
    `plan.runner()`; the batch loss (None on ranks without the last stage) and the gradients of this
    rank's parameters, by their names in the original model, to compare with `reference_step`."""
    runner = plan.runner(timeout_s=timeout_s)
    loss = runner.step(*inputs, target=target)
    return None if loss is None else float(loss), {n: p.grad.clone() for n, p in runner.named_parameters()}


def run_ranks(fn: Callable[..., object], world_size: int, *args: object) -> list[object]:
    """Run `fn(*args)` on `world_size` fresh gloo processes on 127.0.0.1; their results by rank.

    `fn` must be importable (a module-level function); each process has torch.distributed
    initialised and one intra-op thread. A rank that raises makes this raise, with its traceback.
    """
    return spawn_local(fn, world_size, *args)
