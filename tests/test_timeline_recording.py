"""Measured timelines: with record_timeline=True (off by default) every action of the lowered
schedule on every rank gets a start and end time, in the order the rank ran them; gather_events()
hands every rank all ranks' events; plan.measure_local does the same in one process."""

from __future__ import annotations

import functools

import pytest
import torch

import pipecc
from pipecc.ir import Schedule
from pipecc.passes.insert_comm import insert_comm
from pipecc.passes.simulate import TimedAction
from pipecc.plan import Plan
from pipecc.testing import assert_same_grads, reference_step, run_ranks
from models import build


@functools.lru_cache(maxsize=None)
def _plan(schedule: str) -> Plan:
    model, inputs, loss_fn, target = build("gpt")
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=4, schedule=schedule)


def assert_covers_schedule(events: tuple[TimedAction, ...], schedule: Schedule) -> None:
    """Each rank's events are exactly its lowered actions, in order, each after the previous ended."""
    lowered = insert_comm(schedule)
    for rank, actions in enumerate(lowered.rank_actions):
        mine = [e for e in events if e.rank == rank]
        assert [e.action for e in mine] == list(actions), f"rank {rank}"
        assert all(0 <= e.start_ms <= e.end_ms for e in mine), f"rank {rank}: {mine[:3]}"
        assert all(a.end_ms <= b.start_ms for a, b in zip(mine, mine[1:])), f"rank {rank} overlaps itself"


@pytest.mark.parametrize("schedule", ("1f1b", "zb-h1"))
def test_measure_local_times_every_action(schedule: str) -> None:
    plan = _plan(schedule)
    model, inputs, loss_fn, target = build("gpt")
    expected_loss, _ = reference_step(model, inputs, loss_fn, target, 4)
    loss, events = plan.measure_local(*inputs, target=target)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_covers_schedule(events, plan.schedule)
    # one process runs the ranks in turn: no two events overlap, whichever rank
    ordered = sorted(events, key=lambda e: e.start_ms)
    assert all(a.end_ms <= b.start_ms for a, b in zip(ordered, ordered[1:]))


def _dist_timeline(schedule: str) -> tuple[tuple[TimedAction, ...], str, dict[str, torch.Tensor], float]:
    plan = _plan(schedule)
    _, inputs, _, target = build("gpt")
    quiet = plan.runner(timeout_s=120)
    quiet.step(*inputs, target=target)
    try:
        quiet.gather_events()
        refused = ""
    except pipecc.ConfigError as err:
        refused = str(err)
    runner = plan.runner(timeout_s=120, record_timeline=True)
    for param in runner.parameters():
        param.grad = None
    runner.step(*inputs, target=target)
    return (runner.gather_events(), refused, {n: p.grad.clone() for n, p in runner.named_parameters()},
            runner.last_shared_sync_ms)


@pytest.mark.dist
def test_gloo_events_cover_every_rank() -> None:
    """Every rank gets the same events: every action of every rank, ordered; a runner made
    without record_timeline=True has none to give and says how to get them. The recorded step is
    an ordinary one: its gradients (zb-h1's graph-split B and W, the tied embedding summed across
    the two ranks) equal the unpartitioned model's."""
    per_rank = run_ranks(_dist_timeline, 2, "zb-h1")
    _, expected = reference_step(*build("gpt"), 4)
    for result in per_rank:
        assert_same_grads(result[2], expected)
    assert set(per_rank[0][2]) | set(per_rank[1][2]) == set(expected)
    assert all(s.backward_split is not None for s in _plan("zb-h1").stages)
    events = per_rank[0][0]
    assert all(result[0] == events for result in per_rank)
    assert_covers_schedule(events, _plan("zb-h1").schedule)
    assert all("record_timeline=True" in result[1] for result in per_rank)
    # both ranks hold the tied embedding, and each times its gradient exchange (calibration reads it)
    assert all(result[3] > 0 for result in per_rank)
