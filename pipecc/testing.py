"""Testing helpers: the unpartitioned reference step, gradient comparison, and local gloo launches.

Used by pipecc's own tests and meant for users checking their own models the same way.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

RTOL = 1e-5
ATOL = 1e-6  # gradients near zero: summation order alone moves them by ~1e-8


def reference_step(model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                   target: torch.Tensor, num_microbatches: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one unpartitioned step on a copy of `model`, over the same
    micro-batches a plan uses (the loss is their mean).

    The micro-batching matters at float32 round-off only: the unpartitioned model itself moves
    conv weight gradients by ~7e-5 of their largest element between 1 and 8 micro-batches
    (summation order), so comparing at rtol 1e-5 needs the same micro-batches."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    micro_inputs = [t.chunk(num_microbatches) for t in inputs]
    losses = []
    for mb, mb_target in enumerate(target.chunk(num_microbatches)):
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
                     target: torch.Tensor, plan: "Plan") -> None:  # noqa: F821
    """plan.run_local gives the loss and every gradient of the unpartitioned model."""
    expected_loss, expected = reference_step(model, inputs, loss_fn, target, plan.config.num_microbatches)
    for _, param in plan.named_parameters():
        param.grad = None
    loss = plan.run_local(*inputs, target=target)
    torch.testing.assert_close(loss, expected_loss, rtol=RTOL, atol=ATOL)
    grads = {n: p.grad for n, p in plan.named_parameters()}
    assert set(grads) == set(expected), f"parameters differ: {set(grads) ^ set(expected)}"
    assert_same_grads(grads, expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., object], args: tuple,
               out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result: object
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
    except BaseException as err:  # reported to the parent, which raises it
        result = RankFailure(rank, f"{type(err).__name__}: {err}", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


class RankFailure:
    """What a rank raised, carried back to the launching process."""

    def __init__(self, rank: int, message: str, trace: str) -> None:
        self.rank, self.message, self.trace = rank, message, trace


def run_ranks(fn: Callable[..., object], world_size: int, *args: object) -> list[object]:
    """Run `fn(*args)` on `world_size` fresh gloo processes on 127.0.0.1; their results by rank.

    `fn` must be importable (a module-level function); each process has torch.distributed
    initialised and one intra-op thread. A rank that raises makes this raise, with its traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                           join=True, start_method="spawn")
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    failures = [r for r in results if isinstance(r, RankFailure)]
    if failures:
        first = failures[0]
        raise AssertionError(f"rank {first.rank} failed: {first.message}\n{first.trace}")
    return results
