"""The simulator reproduces the closed forms of the pipeline literature with uniform costs and
never beats the critical path."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecc.ir import ActionKind, StageCost
from pipecc.passes.schedules import SCHEDULES, in_flight
from pipecc.passes.simulate import simulate

UNIT = StageCost(num_nodes=1, num_params=0, flops=0, param_bytes=0, forward_ms=1.0, backward_input_ms=1.0,
                 backward_weight_ms=1.0, send_forward_ms=0.0, send_backward_ms=0.0, bytes_to_next=0,
                 saved_bytes=120, memory_bytes=0, comm_ms=0.0)
# (F, B, W) per micro-batch of a rank's share of the model; W <= F as the ZB-H1 form needs
COSTS = [(1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (2.0, 1.0, 1.0), (1.0, 2.0, 0.5), (1.5, 1.0, 0.25)]


def uniform(name: str, num_ranks: int, m: int, f: float, b: float, w: float, saved: int = 120):
    """The schedule on `num_ranks` ranks, each rank's share costing (f, b, w) split evenly over its stages."""
    kind = SCHEDULES[name]
    v = kind.stages_per_rank
    cost = replace(UNIT, forward_ms=f / v, backward_input_ms=b / v, backward_weight_ms=w / v, saved_bytes=saved // v)
    schedule = kind.build(num_ranks * v, m, num_ranks)
    return schedule, simulate(schedule, [cost] * (num_ranks * v))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_bubble_closed_form(name: str, p: int, m: int) -> None:
    timeline = simulate(SCHEDULES[name].build(p, m), [UNIT] * p)
    per_microbatch = UNIT.compute_ms
    assert timeline.step_time_ms == pytest.approx((m + p - 1) * per_microbatch)
    assert timeline.idle_ms[0] == pytest.approx((p - 1) * per_microbatch)  # (p-1)(F+B+W)
    assert timeline.bubble_ratio == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("f, b, w", COSTS)
@pytest.mark.parametrize("p, v, m", [(2, 2, 2), (2, 2, 6), (4, 2, 4), (4, 2, 8), (3, 3, 6), (4, 3, 12)])
def test_interleaved_bubble_is_one_vth(p: int, v: int, m: int, f: float, b: float, w: float) -> None:
    cost = replace(UNIT, forward_ms=f / v, backward_input_ms=b / v, backward_weight_ms=w / v)
    timeline = simulate(SCHEDULES["interleaved-1f1b"].build(p * v, m, p), [cost] * (p * v))
    assert timeline.step_time_ms - m * (f + b + w) == pytest.approx((p - 1) * (f + b + w) / v)
    assert timeline.idle_ms[0] == pytest.approx((p - 1) * (f + b + w) / v)


@pytest.mark.parametrize("f, b, w", COSTS)
@pytest.mark.parametrize("p, m", [(2, 2), (2, 5), (3, 5), (4, 4), (4, 8), (4, 12)])
def test_zb_h1_bubble(p: int, m: int, f: float, b: float, w: float) -> None:
    """ZB-H1: (p-1)(F+B-W) on every rank, with 1F1B's memory (p micro-batches at most)."""
    schedule, timeline = uniform("zb-h1", p, m, f, b, w)
    assert timeline.step_time_ms - m * (f + b + w) == pytest.approx((p - 1) * (f + b - w))
    assert max(timeline.peak_memory_bytes) == min(p, m) * 120


@pytest.mark.parametrize("f, b, w", COSTS + [(1.0, 1.0, 2.0), (1.0, 0.5, 0.5)])
@pytest.mark.parametrize("p, m", [(2, 3), (2, 6), (3, 5), (4, 7), (4, 8), (4, 12)])
def test_zb_h2_bubble(p: int, m: int, f: float, b: float, w: float) -> None:
    """ZB-H2 (m >= 2p-1): max(0, (p-1)(F+B-2W)) from each rank's first action to its last, holding
    at most 2p-1 micro-batches."""
    schedule, timeline = uniform("zb-h2", p, m, f, b, w)
    assert timeline.steady_step_time_ms - m * (f + b + w) == pytest.approx(max(0.0, (p - 1) * (f + b - 2 * w)))
    assert max(timeline.peak_memory_bytes) <= (2 * p - 1) * 120


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_zbv_has_no_bubble_at_equal_costs_and_1f1b_memory_on_every_rank(p: int) -> None:
    m = 3 * p
    _, one_f_one_b = uniform("1f1b", p, m, 1.0, 1.0, 1.0)
    _, zbv = uniform("zbv", p, m, 1.0, 1.0, 1.0)
    assert zbv.steady_step_time_ms == pytest.approx(m * 3.0)
    assert one_f_one_b.peak_memory_bytes[0] == p * 120  # 1F1B: p micro-batches on rank 0 ...
    assert zbv.peak_memory_bytes == (p * 120,) * p  # ... ZB-V: the same, on every rank


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8])
def test_v_half_and_v_min_memory(p: int) -> None:
    """V-Half holds about half of 1F1B's activations (p/2 + 1 micro-batches), V-Min about a third."""
    m = 4 * p
    _, v_half = uniform("v-half", p, m, 1.0, 1.0, 1.0)
    _, v_min = uniform("v-min", p, m, 1.0, 1.0, 1.0)
    full = 120  # one micro-batch of a rank's share of the model
    assert max(v_half.peak_memory_bytes) <= (math.ceil(p / 2) + 1) * full
    assert max(v_min.peak_memory_bytes) <= (math.ceil(p / 3) + 1) * full
    if p % 2 == 0:
        assert max(v_half.peak_memory_bytes) == (p // 2 + 1) * full
    if p == 8:
        assert max(v_half.peak_memory_bytes) / (p * full) == pytest.approx(5 / 8)
        assert max(v_min.peak_memory_bytes) / (p * full) == pytest.approx(4 / 8)


def test_dualpipev_memory_is_one_more_than_1f1b() -> None:
    _, timeline = uniform("dualpipev", 4, 8, 1.0, 1.0, 1.0)
    assert timeline.peak_memory_bytes == (4 * 120 + 60,) * 4  # 2p + 1 stage micro-batches


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 2)])
def test_peak_activation_memory(p: int, m: int) -> None:
    one_f_one_b = simulate(SCHEDULES["1f1b"].build(p, m), [UNIT] * p)
    gpipe = simulate(SCHEDULES["gpipe"].build(p, m), [UNIT] * p)
    assert one_f_one_b.peak_memory_bytes[0] == min(p, m) * UNIT.saved_bytes
    assert one_f_one_b.peak_memory_bytes == tuple(min(p - r, m) * UNIT.saved_bytes for r in range(p))
    assert gpipe.peak_memory_bytes == (m * UNIT.saved_bytes,) * p


def test_in_flight_counts_match_the_simulated_memory() -> None:
    """The partitioner's per-stage count (from the action order) bounds what the simulator sees."""
    for name, kind in SCHEDULES.items():
        schedule = kind.build(4 * kind.stages_per_rank, 8, 4)
        timeline = simulate(schedule, [UNIT] * schedule.num_stages)
        for rank in range(4):
            bound = sum(in_flight(schedule, s) for s in schedule.stages_of(rank)) * UNIT.saved_bytes
            assert timeline.peak_memory_bytes[rank] <= bound, name
    assert [in_flight(SCHEDULES["1f1b"].build(4, 8), s) for s in range(4)] == [4, 3, 2, 1]


def test_link_time_sits_on_the_critical_path() -> None:
    slow_link = replace(UNIT, send_forward_ms=0.5, send_backward_ms=0.5)
    fast = simulate(SCHEDULES["1f1b"].build(2, 4), [UNIT] * 2).step_time_ms
    slow = simulate(SCHEDULES["1f1b"].build(2, 4), [slow_link] * 2).step_time_ms
    assert slow >= fast + 2 * 0.5  # at least one forward and one backward message on the path


def test_same_rank_boundaries_cost_no_link_time() -> None:
    """In a V, stages p-1 and p share a rank: their boundary sends nothing, so its link time is never paid."""
    schedule = SCHEDULES["zbv"].build(4, 4)
    base = simulate(schedule, [UNIT] * 4).step_time_ms
    costs = [UNIT, replace(UNIT, send_forward_ms=5.0), replace(UNIT, send_backward_ms=5.0), UNIT]
    assert simulate(schedule, costs).step_time_ms == pytest.approx(base)
    slow_cross = [replace(UNIT, send_forward_ms=5.0), UNIT, UNIT, UNIT]  # stage 0 -> 1 crosses ranks
    assert simulate(schedule, slow_cross).step_time_ms >= base + 5.0


def test_runtime_overheads_of_a_calibrated_device() -> None:
    """gpipe on 2 ranks, 1 micro-batch, F = B = W = 1, link 0.5: every compute action pays 0.25 more,
    posting a send 0.1, and the step ends 2.0 after the last action.
    rank 0: F 0-1.25, send 1.25-1.35 (arrives 1.75), receive 1.35-5.75 (waits), BW 5.75-8.0;
    rank 1: receive 0-1.75, F 1.75-3.0, BW 3.0-5.25, send 5.25-5.35 (arrives 5.75)."""
    cost = replace(UNIT, send_forward_ms=0.5, send_backward_ms=0.5, action_overhead_ms=0.25,
                   message_overhead_ms=0.1, step_overhead_ms=2.0)
    timeline = simulate(SCHEDULES["gpipe"].build(2, 1), [cost, cost])
    assert timeline.step_time_ms == pytest.approx(8.0 + 2.0)
    assert timeline.busy_ms == pytest.approx((3.5, 3.5))
    sends = [e for e in timeline.events if e.action.kind in (ActionKind.SEND_F, ActionKind.SEND_B)]
    assert [e.end_ms - e.start_ms for e in sends] == pytest.approx([0.1, 0.1])
    # a split backward shares one action overhead between its B and W: the same busy time as BW
    split = simulate(SCHEDULES["zb-h1"].build(2, 1), [cost, cost])
    assert split.busy_ms == pytest.approx((3.5, 3.5))


def test_only_a_forward_under_autograd_pays_for_recording_the_graph() -> None:
    """GPipe and 1F1B run their forwards under autograd, the zero-bubble schedules split graphs:
    only the first charge each F its stage's autograd_forward_ms (here 0.5 on 2 ranks, 2 micro-batches:
    every F of the critical path, and rank 0 runs them back to back)."""
    recording = replace(UNIT, autograd_forward_ms=0.5)
    for name in ("gpipe", "1f1b"):
        schedule = SCHEDULES[name].build(2, 2)
        with_it, without = simulate(schedule, [recording] * 2), simulate(schedule, [UNIT] * 2)
        assert with_it.busy_ms == pytest.approx(tuple(b + 2 * 0.5 for b in without.busy_ms))
        assert with_it.step_time_ms > without.step_time_ms
    split = SCHEDULES["zb-h1"].build(2, 2)
    assert simulate(split, [recording] * 2) == simulate(split, [UNIT] * 2)


def test_a_receive_whose_message_is_there_costs_the_receive_overhead() -> None:
    """1F1B, 2 ranks, 2 micro-batches: rank 1's second receive finds its message there (sent while
    rank 1 ran micro-batch 0), so it takes the receive overhead, not the send's."""
    cost = replace(UNIT, send_forward_ms=0.1, send_backward_ms=0.1, message_overhead_ms=0.3,
                   receive_overhead_ms=0.05)
    timeline = simulate(SCHEDULES["1f1b"].build(2, 2), [cost, cost])
    receives = [e for e in timeline.events if e.rank == 1 and e.action.kind is ActionKind.RECV_F]
    assert receives[1].end_ms - receives[1].start_ms == pytest.approx(0.05)
    cheaper = simulate(SCHEDULES["1f1b"].build(2, 2), [replace(cost, receive_overhead_ms=0.0)] * 2)
    assert cheaper.step_time_ms < timeline.step_time_ms


costs = st.builds(lambda f, b, w, s: replace(UNIT, forward_ms=f, backward_input_ms=b, backward_weight_ms=w,
                                              send_forward_ms=s, send_backward_ms=s),
                  *(st.floats(0.01, 5.0) for _ in range(3)), st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), p=st.integers(1, 4), m=st.integers(1, 9), data=st.data())
def test_never_faster_than_the_critical_path(name: str, p: int, m: int, data: st.DataObject) -> None:
    kind = SCHEDULES[name]
    num_stages = p * kind.stages_per_rank
    if name == "dualpipev" and m < num_stages:
        m = num_stages
    stage_costs = [data.draw(costs) for _ in range(num_stages)]
    schedule = kind.build(num_stages, m, p)
    timeline = simulate(schedule, stage_costs)
    one_microbatch = sum(c.forward_ms + c.backward_input_ms for c in stage_costs)  # W may overlap the chain
    for rank in range(p):
        work = sum(m * stage_costs[s].compute_ms for s in schedule.stages_of(rank))
        assert timeline.step_time_ms >= work - 1e-9
        assert timeline.span_ms[rank] >= work - 1e-9
    assert timeline.step_time_ms >= one_microbatch - 1e-9
    computed = [e.action for e in timeline.events if e.action.kind.is_compute]
    assert len(computed) == len(set(computed)) == sum(len(a) for a in schedule.rank_actions)
    assert all(e.end_ms >= e.start_ms for e in timeline.events)
    assert ActionKind.F in {e.action.kind for e in timeline.events}


def test_prediction_beside_a_measured_step() -> None:
    import pipecc
    from examples import gpt

    model, inputs, loss_fn, target = gpt.build(batch_size=8, seed=0)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=2, schedule="zb-h1")
    _, events = plan.measure_local(*inputs, target=target)
    from pipecc.passes.simulate import measured_timeline

    measured = measured_timeline(plan.schedule, events, [s.cost for s in plan.stages])
    computed = [e.action for e in measured.events if e.action.kind.is_compute]
    assert len(computed) == len(set(computed)) and set(computed) == {a for r in plan.schedule.rank_actions for a in r}
    assert min(e.start_ms for e in measured.events) == 0.0 and all(b > 0 for b in measured.busy_ms)
    assert measured.peak_memory_bytes == plan.simulate().peak_memory_bytes  # same order, same accounting
    text = plan.compare(events)
    lines = text.splitlines()
    assert lines[0] == "predicted vs measured:" and lines[1].split() == "rank busy ms pred busy ms meas ratio bubble pred bubble meas".split()
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    assert lines[4].startswith(f"step time: predicted {plan.simulate().step_time_ms:.3f} ms, measured ")


def test_tied_weights_on_two_ranks_cost_their_gradient_exchange() -> None:
    """GPT's token embedding is also its output head: on two ranks, each rank's first stage carries
    the exchange of that gradient (two one-way transfers over the link), and the step ends that much
    after the last action; under ZB-V both ends sit on rank 0 and nothing is exchanged."""
    import pipecc
    from pipecc.cluster import LinkSpec
    from pipecc.passes.split_stages import TIED_SYNC_TRANSFERS
    from models import build

    model, inputs, loss_fn, target = build("gpt")
    tied_bytes = model.tok_emb.weight.numel() * 4
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=4)
    expected = TIED_SYNC_TRANSFERS * LinkSpec.of(plan.device).transfer_ms(tied_bytes, 1)
    assert [s.cost.sync_ms for s in plan.stages] == pytest.approx([expected, expected])
    without = simulate(plan.schedule, [replace(s.cost, sync_ms=0.0) for s in plan.stages])
    assert plan.simulate().step_time_ms == pytest.approx(without.step_time_ms + expected)

    v_plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=4, num_ranks=2,
                            num_microbatches=4, schedule="zbv")
    assert {s.rank for s in v_plan.stages if "tok_emb" in str([b.canonical_name for b in s.params])} == {0}
    assert all(s.cost.sync_ms == 0.0 for s in v_plan.stages)


def test_posting_a_send_costs_its_bytes_too() -> None:
    """A 2 MB activation posted at 0.1 ms + 0.5 ms/MB occupies its rank 1.1 ms; its gradient, sent
    back by the next stage, the same."""
    cost = replace(UNIT, bytes_to_next=2_000_000, message_overhead_ms=0.1, message_ms_per_mb=0.5)
    timeline = simulate(SCHEDULES["gpipe"].build(2, 1), [cost, replace(cost, bytes_to_next=0)])
    sends = [e for e in timeline.events if e.action.kind in (ActionKind.SEND_F, ActionKind.SEND_B)]
    assert [e.end_ms - e.start_ms for e in sends] == pytest.approx([1.1, 1.1])
