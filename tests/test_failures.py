"""Failure handling over real gloo ranks: when one of 4 ranks dies or raises mid-step, every other
rank stops within its timeout with an error naming the rank and stage that failed, and every process
exits (no orphans).

These tests launch ranks without the launcher's fail-fast (which would terminate the survivors at
once and hide what they report): each survivor catches its error and returns it with the time it
took to stop.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pipecc
from examples import mlp
from pipecc.errors import PeerLostError
from pipecc.runtime.launch import RankFailure, _rank_main, free_port, rendezvous_store

pytestmark = pytest.mark.dist

WORLD_SIZE = 4
TIMEOUT_S = 30.0  # what the runners are given; every survivor must stop well within it
LAUNCH_DEADLINE_S = 180.0  # process start-up (importing torch on a loaded 2-core machine) included


@functools.cache
def _build() -> tuple[pipecc.Plan, torch.Tensor, torch.Tensor]:
    """The plan every test runs, compiled once in the test process and handed to the ranks (pickled)."""
    model, (x,), loss_fn, target = mlp.build(batch_size=8, num_layers=4, hidden=16, in_features=8, out_features=4)
    plan = pipecc.compile(model, (x,), loss_fn=loss_fn, example_target=target, num_stages=WORLD_SIZE,
                          num_microbatches=4, schedule="1f1b")
    return plan, x, target


def _on_forward(plan: pipecc.Plan, stage: int, call: int, act: Callable[[], None]) -> None:
    """Run `act` when `stage`'s forward runs for the `call`-th time (0-based) in this process."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] == call + 1:
            act()

    plan.stages[stage].graph.register_forward_pre_hook(hook)


def _step_with(failure: str, plan: pipecc.Plan, x: torch.Tensor, target: torch.Tensor) -> tuple[str, str, float]:
    """One 1F1B step on this rank with `failure` injected on its rank; survivors return
    (error class, message, seconds from the step's start to the error)."""
    rank = dist.get_rank()
    if failure == "sigkill" and rank == 2:
        _on_forward(plan, 2, 1, lambda: os.kill(os.getpid(), signal.SIGKILL))
    if failure == "raise" and rank == 1:
        def boom() -> None:
            raise ValueError("boom in stage 1")
        _on_forward(plan, 1, 2, boom)
    if failure == "bad target" and rank == 3:
        target = target[:, :2]
    runner = plan.runner(timeout_s=TIMEOUT_S)
    dist.barrier()  # start the clock together
    start = time.perf_counter()
    try:
        runner.step(x, target=target)
    except PeerLostError as err:
        return type(err).__name__, str(err), time.perf_counter() - start
    return "no error", "", time.perf_counter() - start


def _launch(fn: Callable[..., object], *args: object) -> tuple[list[int | None], list[object]]:
    """Start WORLD_SIZE gloo ranks running fn(*args); wait for every one to exit (none is killed by the
    launcher); their exit codes and results (a RankFailure for a rank that raised, None if none)."""
    port = free_port()
    store = rendezvous_store(port)  # noqa: F841  (outlives the ranks, as under torchrun)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank_main, args=(WORLD_SIZE, port, fn, args, out_dir, 1),
                                     nprocs=WORLD_SIZE, join=False, start_method="spawn")
        deadline = time.monotonic() + LAUNCH_DEADLINE_S
        for process in context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        orphans = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
        for rank in orphans:
            context.processes[rank].kill()
        assert not orphans, f"ranks {orphans} were still running {LAUNCH_DEADLINE_S:.0f} s after the launch"
        results = []
        for rank in range(WORLD_SIZE):
            path = Path(out_dir) / f"rank{rank}.pt"
            results.append(torch.load(path, weights_only=False) if path.exists() else None)
        return [p.exitcode for p in context.processes], results


def _explain(exit_codes: list[int | None], results: list[object]) -> str:
    return "\n".join(f"rank {r}: exit {code}: " + (f"{results[r].message}\n{results[r].trace}"
                                                    if isinstance(results[r], RankFailure) else repr(results[r]))
                     for r, code in enumerate(exit_codes))


def _assert_survivors_name(results: list[object], survivors: list[int], first_line: str) -> None:
    for rank in survivors:
        error, message, seconds = results[rank]
        assert error == "PeerLostError", f"rank {rank}: {error}: {message}"
        assert message.startswith(f"rank {rank} stopped at action "), message
        assert first_line in message.splitlines()[0], f"rank {rank}: {message}"
        assert message.splitlines()[1] == "Fix that rank's error (see its log); this rank only waited for it."
        assert seconds < TIMEOUT_S, f"rank {rank} took {seconds:.1f} s to stop, more than timeout_s={TIMEOUT_S}"


def test_sigkilled_rank_is_named_by_every_survivor_and_all_exit() -> None:
    """Rank 2 is SIGKILLed in its second forward (no chance to report): the others name it and its stage."""
    exit_codes, results = _launch(_step_with, "sigkill", *_build())
    assert exit_codes == [0, 0, -signal.SIGKILL, 0], _explain(exit_codes, results)
    _assert_survivors_name(results, [0, 1, 3], "rank 2 (stage 2) sent no failure report: died, was killed, or hangs")


def test_raising_rank_is_named_with_its_action_by_every_survivor() -> None:
    """Rank 1 raises in the forward of micro-batch 2: survivors name rank, action, stage, micro-batch and error."""
    exit_codes, results = _launch(_step_with, "raise", *_build())
    assert exit_codes == [0, 1, 0, 0], _explain(exit_codes, results)
    failure = results[1]
    assert isinstance(failure, RankFailure) and failure.message == "ValueError: boom in stage 1"
    assert "(pipecc: rank 1 failed at action 1F2 (stage 1, micro-batch 2): ValueError: boom in stage 1)" \
        in failure.trace
    _assert_survivors_name(results, [0, 2, 3],
                           "rank 1 failed at action 1F2 (stage 1, micro-batch 2): ValueError: boom in stage 1")


def test_bad_input_on_one_rank_is_named_by_the_others() -> None:
    """Rank 3 alone is handed a target of the wrong shape: it refuses before its first action, and the
    others stop and say so instead of waiting for it."""
    exit_codes, results = _launch(_step_with, "bad target", *_build())
    assert exit_codes == [0, 0, 0, 1], _explain(exit_codes, results)
    assert isinstance(results[3], RankFailure) and results[3].message.startswith(
        "ConfigError: target has shape (8, 2) and dtype float32, but the plan was compiled for shape (8, 4)")
    _assert_survivors_name(results, [0, 1, 2], "rank 3 failed before its first action: ConfigError: target has "
                                               "shape (8, 2)")
