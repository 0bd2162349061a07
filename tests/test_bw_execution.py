"""The runtime runs split backwards: B (input gradients) and W (weight gradients) as separate
actions, in any verified order, give the unpartitioned model's loss and gradients, in one
process and over gloo, with one or several stages per rank."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Sequence

import pytest
import torch

import pipecc
from pipecc.ir import Action, ActionKind, Schedule
from pipecc.passes.schedules.verify import check_schedule
from pipecc.passes.split_backward import split_backward_stages
from pipecc.plan import Plan
from pipecc.printing import format_schedule
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks
from models import build

F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


def split_schedule(num_stages: int, num_microbatches: int, stage_to_rank: Sequence[int],
                   max_in_flight: int) -> Schedule:
    """A zero-bubble-like F/B/W order, built by simulating unit-time actions: each rank's next
    action is a ready B, else a ready F while fewer than `max_in_flight` of its micro-batches
    wait for their B, else a W (so W fills what would be bubbles and trails the Bs)."""
    num_ranks = max(stage_to_rank) + 1
    last = num_stages - 1
    done: set[Action] = set()
    todo = [[Action(s, k, mb) for mb in range(num_microbatches) for s in range(num_stages)
             if stage_to_rank[s] == r for k in (F, B, W)] for r in range(num_ranks)]
    rank_actions: list[list[Action]] = [[] for _ in range(num_ranks)]

    def ready(a: Action) -> bool:
        s, mb = a.stage, a.microbatch
        if a.kind is F:
            return s == 0 or Action(s - 1, F, mb) in done
        if a.kind is B:
            return Action(s, F, mb) in done and (s == last or Action(s + 1, B, mb) in done)
        return Action(s, B, mb) in done

    while any(todo):
        finished_this_tick = []
        for r in range(num_ranks):
            in_flight = sum(1 for a in rank_actions[r] if a.kind is F) - sum(1 for a in rank_actions[r] if a.kind is B)
            candidates = [a for a in todo[r] if ready(a)]
            pick = next((a for a in candidates if a.kind is B), None) \
                or next((a for a in sorted(candidates, key=lambda a: (a.microbatch, -a.stage))
                         if a.kind is F and in_flight < max_in_flight), None) \
                or next((a for a in candidates if a.kind is W), None)
            if pick is not None:
                todo[r].remove(pick)
                rank_actions[r].append(pick)
                finished_this_tick.append(pick)
        assert finished_this_tick, "the greedy order stalled"
        done.update(finished_this_tick)
    schedule = Schedule("test-fbw", num_stages, num_microbatches, tuple(stage_to_rank),
                        tuple(tuple(a) for a in rank_actions))
    check_schedule(schedule)
    return schedule


def with_schedule(plan: Plan, schedule: Schedule, *, graph_split: bool = True) -> Plan:
    """`plan`'s stages placed and run as `schedule` says, B and W from the split graphs (as
    compile_plan makes them for such a schedule) or, with graph_split=False, from autograd."""
    stages = [dataclasses.replace(s, rank=schedule.stage_to_rank[s.index], backward_split=None) for s in plan.stages]
    if graph_split:
        stages = list(split_backward_stages(stages))
        assert all(s.backward_split is not None for s in stages)
    placed = copy.copy(plan)
    placed.stages, placed.schedule = tuple(stages), schedule
    return placed


@functools.lru_cache(maxsize=None)
def _compiled(name: str, num_stages: int, num_microbatches: int) -> Plan:
    """One compile per configuration (compiling dominates these tests' time); the model is the one
    build(name) makes, so reference steps on a fresh build(name) see the same weights."""
    model, inputs, loss_fn, target = build(name)
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=num_microbatches)


def fbw_plan(name: str, stage_to_rank: Sequence[int], num_microbatches: int, max_in_flight: int, *,
             graph_split: bool = True) -> Plan:
    plan = _compiled(name, len(stage_to_rank), num_microbatches)
    schedule = split_schedule(len(stage_to_rank), num_microbatches, stage_to_rank, max_in_flight)
    return with_schedule(plan, schedule, graph_split=graph_split)


def test_split_schedule_is_zero_bubble_like() -> None:
    """The hand-built order the tests run: warm-up Fs, B before F in the steady state, Ws trailing."""
    schedule = split_schedule(2, 3, (0, 1), max_in_flight=2)
    assert format_schedule(schedule) == (
        "rank 0: 0F0 0F1 0B0 0F2 0B1 0W0 0B2 0W1 0W2\n"
        "rank 1: 1F0 1B0 1F1 1B1 1F2 1B2 1W0 1W1 1W2")


# (model, stage_to_rank, micro-batches): one stage per rank, and V shapes (rank r holds r and 2p-1-r)
CASES = [
    ("gpt", (0, 1), 4),
    ("gpt", (0, 1, 1, 0), 4),
    ("unet", (0, 1), 4),
    ("unet", (0, 1, 1, 0), 2),
]


@pytest.mark.parametrize("graph_split", (True, False), ids=("graph", "autograd"))
@pytest.mark.parametrize("name,stage_to_rank,num_microbatches", CASES)
def test_b_then_w_equals_unpartitioned_local(name: str, stage_to_rank: tuple[int, ...], num_microbatches: int,
                                             graph_split: bool) -> None:
    model, inputs, loss_fn, target = build(name)
    plan = fbw_plan(name, stage_to_rank, num_microbatches, max_in_flight=len(stage_to_rank), graph_split=graph_split)
    assert all((s.backward_split is not None) == graph_split for s in plan.stages)
    assert any(a.kind is W for actions in plan.schedule.rank_actions for a in actions)
    assert_same_step(model, inputs, loss_fn, target, plan)


@pytest.mark.parametrize("graph_split", (True, False), ids=("graph", "autograd"))
def test_b_and_w_mixed_with_fused_bw(graph_split: bool) -> None:
    """A schedule may fuse some backwards (BW) and split others (B, W) in one step."""
    model, inputs, loss_fn, target = build("gpt")
    plan = fbw_plan("gpt", (0, 1), 4, max_in_flight=2, graph_split=graph_split)
    mixed = []
    for actions in plan.schedule.rank_actions:
        out = []
        for a in actions:
            if a.microbatch % 2 == 0 and a.kind is B:
                out.append(Action(a.stage, ActionKind.BW, a.microbatch))
            elif not (a.microbatch % 2 == 0 and a.kind is W):
                out.append(a)
        mixed.append(tuple(out))
    schedule = dataclasses.replace(plan.schedule, rank_actions=tuple(mixed))
    check_schedule(schedule)
    assert_same_step(model, inputs, loss_fn, target, with_schedule(plan, schedule, graph_split=graph_split))


def _dist_fbw_steps(cases: list[tuple[str, tuple[int, ...], int, bool]]) -> list[tuple[float | None, dict[str, torch.Tensor]]]:
    results = []
    for name, stage_to_rank, m, graph_split in cases:
        plan = fbw_plan(name, stage_to_rank, m, max_in_flight=len(stage_to_rank), graph_split=graph_split)
        results.append(rank_step(plan, build(name)[1], build(name)[3]))
    return results


@pytest.mark.dist
def test_b_then_w_equals_unpartitioned_gloo() -> None:
    # the graph split on a V shape and on a skip-connection model, the autograd split on a V shape
    cases = [("gpt", (0, 1, 1, 0), 4, True), ("unet", (0, 1), 4, True), ("unet", (0, 1, 1, 0), 2, False)]
    per_rank = run_ranks(_dist_fbw_steps, 2, cases)
    for i, (name, stage_to_rank, m, _) in enumerate(cases):
        expected_loss, expected = reference_step(*build(name), m)
        last_rank = stage_to_rank[-1]
        assert [r[i][0] is not None for r in per_rank] == [rank == last_rank for rank in range(2)]
        torch.testing.assert_close(torch.tensor(per_rank[last_rank][i][0]), expected_loss, rtol=1e-5, atol=1e-6)
        covered: set[str] = set()
        for results in per_rank:
            assert_same_grads(results[i][1], expected)
            covered |= set(results[i][1])
        assert covered == set(expected), f"{name} {stage_to_rank}: parameters missing {set(expected) - covered}"
