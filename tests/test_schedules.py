"""Every registered schedule: its printed order, the verifier over many (p, m), its placement, and
its errors for counts it cannot run."""

from __future__ import annotations

import doctest
import importlib
from textwrap import dedent

import pytest

from pipecc.errors import ConfigError, ScheduleError
from pipecc.ir import ActionKind, StageCost
from pipecc.passes.schedules import SCHEDULES, in_flight, schedule_kind
from pipecc.passes.schedules.auto import zero_bubble_search
from pipecc.passes.schedules.verify import check_schedule
from pipecc.passes.simulate import simulate
from pipecc.printing import format_schedule

SPLIT = {"zb-h1", "zb-h2", "zbv", "v-half", "v-min", "dualpipev"}


@pytest.mark.parametrize("module", ["interleaved", "zero_bubble", "v_shape", "dualpipe", "auto"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"pipecc.passes.schedules.{module}"))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_count_verifies(name: str) -> None:
    """check_schedule (each action once, right rank, no deadlock) on 1-4 ranks and m = 1..12, or a
    PipeccError that names the schedule for the counts it cannot run."""
    kind = SCHEDULES[name]
    built = 0
    for p in (1, 2, 3, 4):
        for m in range(1, 13):
            try:
                schedule = kind.build(p * kind.stages_per_rank, m, p)
            except ScheduleError as err:
                assert name in str(err)
                continue
            check_schedule(schedule)
            assert schedule.num_ranks == p and schedule.num_microbatches == m
            kinds = {a.kind for actions in schedule.rank_actions for a in actions}
            assert (ActionKind.W in kinds) == (name in SPLIT)
            assert kind.splits_backward == (name in SPLIT)
            built += 1
    assert built >= 30  # dualpipev needs m >= 2p; the rest build for (nearly) every count


@pytest.mark.parametrize("name", ["zbv", "v-half", "v-min", "dualpipev"])
def test_v_placement(name: str) -> None:
    schedule = SCHEDULES[name].build(8, 8)
    assert schedule.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert [schedule.stages_of(r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


def test_interleaved_loop_placement_and_v_from_num_ranks() -> None:
    kind = SCHEDULES["interleaved-1f1b"]
    assert kind.build(8, 4).stage_to_rank == (0, 1, 2, 3, 0, 1, 2, 3)  # v = 2 by default
    assert kind.build(6, 4, num_ranks=2).stage_to_rank == (0, 1, 0, 1, 0, 1)  # v = 3


def test_printed_orders() -> None:
    assert format_schedule(SCHEDULES["zb-h1"].build(3, 4)) == dedent("""\
        rank 0: 0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3
        rank 1: 1F0 1F1 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3
        rank 2: 2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3""")
    assert format_schedule(SCHEDULES["interleaved-1f1b"].build(4, 4)) == dedent("""\
        rank 0: 0F0 0F1 2F0 2F1 0F2 2BW0 0F3 2BW1 2F2 0BW0 2F3 0BW1 2BW2 2BW3 0BW2 0BW3
        rank 1: 1F0 1F1 3F0 3BW0 3F1 3BW1 1F2 1BW0 1F3 1BW1 3F2 3BW2 3F3 3BW3 1BW2 1BW3""")
    assert format_schedule(SCHEDULES["zb-h2"].build(3, 5)) == dedent("""\
        rank 0: 0F0 0F1 0F2 0F3 0F4 0B0 0W0 0B1 0W1 0B2 0W2 0B3 0W3 0B4 0W4
        rank 1: 1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1W0 1B3 1W1 1B4 1W2 1W3 1W4
        rank 2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2F4 2B4 2W0 2W1 2W2 2W3 2W4""")


def test_in_flight_of_the_zero_bubble_family() -> None:
    assert [in_flight(SCHEDULES["zb-h1"].build(4, 8), s) for s in range(4)] == [4, 4, 4, 4]
    assert [in_flight(SCHEDULES["zb-h2"].build(4, 8), s) for s in range(4)] == [7, 7, 7, 7]


def test_unknown_schedule_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown schedule 'zb-h3'.*zbv.*dualpipev.*auto"):
        schedule_kind("zb-h3")


def test_v_schedules_need_two_stages_per_rank() -> None:
    with pytest.raises(ConfigError, match=r"(?s)'zbv' places 2 stages on every rank.*num_stages=5.*num_stages=4 or 6"):
        SCHEDULES["zbv"].build(5, 4)
    with pytest.raises(ConfigError, match=r"'v-half' on num_ranks=3 needs num_stages = 2 \* num_ranks = 6"):
        SCHEDULES["v-half"].build(4, 4, num_ranks=3)
    with pytest.raises(ConfigError, match=r"'interleaved-1f1b' on num_ranks=4 needs num_stages = a multiple"):
        SCHEDULES["interleaved-1f1b"].build(6, 4, num_ranks=4)


def test_dualpipev_needs_m_at_least_the_stage_count() -> None:
    with pytest.raises(ScheduleError, match=r"(?s)dualpipev needs at least as many micro-batches as stages: "
                                            r"num_microbatches=6, num_stages=8.*num_microbatches=8 or more.*zbv"):
        SCHEDULES["dualpipev"].build(8, 6)


def test_interleaved_names_the_counts_that_work() -> None:
    """m = 5, 6, 7 on 4 ranks are fine (one round, or equal rounds, or a short last one that verifies);
    m = 9 with 3 stages per rank leaves a last round of 1 that deadlocks."""
    for m in (5, 6, 7, 10):
        check_schedule(SCHEDULES["interleaved-1f1b"].build(12, m, num_ranks=4))
    with pytest.raises(ScheduleError, match=r"(?s)interleaved-1f1b: num_microbatches=9 with 3 stages on each of 4 ranks"
                                            r".*deadlocks.*\n.*12.*schedule=\"1f1b\""):
        SCHEDULES["interleaved-1f1b"].build(12, 9, num_ranks=4)


def _cost(f: float, b: float, w: float, saved: int = 100, params: int = 0) -> StageCost:
    return StageCost(1, 0, 0, params, f, b, w, 0.0, 0.0, 0, saved, 0, 0.0)


def test_search_is_at_least_as_good_as_zb_h1_and_keeps_the_memory_limit() -> None:
    for costs in ([_cost(1, 1, 1)] * 4, [_cost(1, 2, 0.5), _cost(2, 1, 1), _cost(1, 1, 1), _cost(1.5, 1, 0.2)]):
        zb_h1 = simulate(SCHEDULES["zb-h1"].build(4, 8), costs)
        for limit in (400, 700, None):
            searched = zero_bubble_search(costs, 8, limit)
            check_schedule(searched)
            timeline = simulate(searched, costs)
            if limit is not None:
                assert max(timeline.peak_memory_bytes) <= limit
            if limit is None or limit >= 400:
                assert timeline.step_time_ms <= zb_h1.step_time_ms + 1e-9
    # at F = B = W with room for 2p-1 micro-batches the search finds ZB-H2's zero bubble
    timeline = simulate(zero_bubble_search([_cost(1, 1, 1)] * 4, 8, 700), [_cost(1, 1, 1)] * 4)
    assert timeline.steady_step_time_ms == pytest.approx(8 * 3.0)


def test_search_refuses_a_limit_below_one_microbatch() -> None:
    with pytest.raises(ScheduleError, match=r"(?s)stage 0 cannot hold even one micro-batch.*\n.*max_memory_bytes"):
        zero_bubble_search([_cost(1, 1, 1, saved=100, params=40)] * 2, 4, max_memory_bytes=150)
