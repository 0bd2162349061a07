"""The simulator reproduces the closed forms of GPipe and 1F1B and never beats the critical path."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecc.ir import ActionKind, StageCost
from pipecc.passes.schedules import SCHEDULES
from pipecc.passes.simulate import simulate

UNIT = StageCost(num_nodes=1, num_params=0, flops=0, param_bytes=0, forward_ms=1.0, backward_input_ms=1.0,
                 backward_weight_ms=1.0, send_forward_ms=0.0, send_backward_ms=0.0, bytes_to_next=0,
                 saved_bytes=100, memory_bytes=0, comm_ms=0.0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_bubble_closed_form(name: str, p: int, m: int) -> None:
    timeline = simulate(SCHEDULES[name].generate(p, m), [UNIT] * p)
    per_microbatch = UNIT.compute_ms
    assert timeline.step_time_ms == pytest.approx((m + p - 1) * per_microbatch)
    assert timeline.idle_ms[0] == pytest.approx((p - 1) * per_microbatch)  # (p-1)(F+B+W)
    assert timeline.bubble_ratio == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 2)])
def test_peak_activation_memory(p: int, m: int) -> None:
    one_f_one_b = simulate(SCHEDULES["1f1b"].generate(p, m), [UNIT] * p)
    gpipe = simulate(SCHEDULES["gpipe"].generate(p, m), [UNIT] * p)
    assert one_f_one_b.peak_memory_bytes[0] == min(p, m) * UNIT.saved_bytes
    assert one_f_one_b.peak_memory_bytes == tuple(min(p - r, m) * UNIT.saved_bytes for r in range(p))
    assert gpipe.peak_memory_bytes == (m * UNIT.saved_bytes,) * p


def test_link_time_sits_on_the_critical_path() -> None:
    slow_link = replace(UNIT, send_forward_ms=0.5, send_backward_ms=0.5)
    fast = simulate(SCHEDULES["1f1b"].generate(2, 4), [UNIT] * 2).step_time_ms
    slow = simulate(SCHEDULES["1f1b"].generate(2, 4), [slow_link] * 2).step_time_ms
    assert slow >= fast + 2 * 0.5  # at least one forward and one backward message on the path


costs = st.builds(lambda f, b, w, s: replace(UNIT, forward_ms=f, backward_input_ms=b, backward_weight_ms=w,
                                              send_forward_ms=s, send_backward_ms=s),
                  *(st.floats(0.01, 5.0) for _ in range(3)), st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b"]), p=st.integers(1, 5), m=st.integers(1, 8), data=st.data())
def test_never_faster_than_the_critical_path(name: str, p: int, m: int, data: st.DataObject) -> None:
    stage_costs = [data.draw(costs) for _ in range(p)]
    schedule = SCHEDULES[name].generate(p, m)
    timeline = simulate(schedule, stage_costs)
    one_microbatch = sum(c.compute_ms for c in stage_costs)
    assert timeline.step_time_ms >= max(m * c.compute_ms for c in stage_costs) - 1e-9
    assert timeline.step_time_ms >= one_microbatch - 1e-9
    computed = [e.action for e in timeline.events if e.action.kind.is_compute]
    assert len(computed) == len(set(computed)) == sum(len(a) for a in schedule.rank_actions)
    assert all(e.end_ms >= e.start_ms for e in timeline.events)
    assert {e.action.kind for e in timeline.events} >= {ActionKind.F, ActionKind.BW}
