"""Simulate: a predicted timeline of one step from the schedule and the per-stage costs.

Each rank runs its (lowered) actions in order, every action as soon as its inputs are there. A
compute action takes its stage's estimated time; a send costs the sender nothing (it is
asynchronous) and its message arrives one transfer time later; a receive waits for that arrival.
Memory: a rank holds its stages' weights and gradients throughout, each micro-batch's saved
activations from the end of its F until the end of its BW (or W when the backward is split), and
the buffer of each incoming message from the step's start (the runtime posts them all then) until
it is taken. B is taken to free nothing: the runtime's B keeps the autograd graph for W, so this
is exact for it and an upper bound for a split backward that frees what W does not read.

Communication: a message crosses the link only between stages on different ranks (insert_comm
adds no send between stages of one rank); its time is the link latency per tensor plus bytes
over bandwidth (DeviceSpec.transfer_ms), and it delays the receiving action, so on the steady
state critical path every hop pays it.

The runtime's own costs (StageCost.action_overhead_ms, message_overhead_ms, receive_overhead_ms,
step_overhead_ms; 0 unless the device spec was calibrated): F and a fused BW take the action
overhead on top of their ops, and a split backward's B and W half of it each (measured on the MLP
example's last stage: B 0.109 + W 0.086 ms against BW 0.212 ms, so splitting costs no second
overhead); posting a send occupies its rank for the message overhead plus message_ms_per_mb
for each MB it carries (its message leaves when it is posted), and a receive for the receive overhead or until its message arrives, whichever
is later; and the step ends the step overhead after the last action (the runtime's work outside
the actions: splitting the batch, waiting for the last sends).

Tied weights held on several ranks: after every rank's last action, the holders exchange and sum
their gradients (StageCost.sync_ms, the slowest rank's), before the step overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipecc.ir import Action, ActionKind, Schedule, StageCost
from pipecc.passes.insert_comm import insert_comm
from pipecc.passes.schedules.verify import execution_order
from pipecc.passes.split_backward import needs_split_backward


@dataclass(frozen=True)
class TimedAction:
    rank: int
    action: Action
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Timeline:
    """Predicted (or measured) timeline of one step."""

    events: tuple[TimedAction, ...]
    step_time_ms: float
    busy_ms: tuple[float, ...]  # per rank: compute time
    peak_memory_bytes: tuple[int, ...]  # per rank

    @property
    def idle_ms(self) -> tuple[float, ...]:
        """Per rank: the step time it does not compute (its bubble, start-up delay included)."""
        return tuple(self.step_time_ms - busy for busy in self.busy_ms)

    def rank_events(self, rank: int) -> tuple[TimedAction, ...]:
        """Rank `rank`'s compute actions in the order they ran."""
        return tuple(e for e in self.events if e.rank == rank and e.action.kind.is_compute)

    @property
    def span_ms(self) -> tuple[float, ...]:
        """Per rank: from the start of its first compute action to the end of its last."""
        spans = []
        for rank in range(len(self.busy_ms)):
            mine = self.rank_events(rank)
            spans.append(max(e.end_ms for e in mine) - min(e.start_ms for e in mine) if mine else 0.0)
        return tuple(spans)

    @property
    def steady_step_time_ms(self) -> float:
        """The step time when consecutive steps overlap (rank r starts step k+1 as soon as it has
        finished step k, as without a synchronising optimizer step): the longest rank span. The
        zero-bubble paper's bubble formulas use this measure."""
        return max(self.span_ms, default=0.0)

    @property
    def span_bubble_ms(self) -> tuple[float, ...]:
        """Per rank: idle time inside its span (its bubble when steps overlap)."""
        return tuple(span - busy for span, busy in zip(self.span_ms, self.busy_ms))

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all ranks' time in the step."""
        total = self.step_time_ms * len(self.busy_ms)
        return sum(self.idle_ms) / total if total else 0.0


def action_ms(action: Action, cost: StageCost, autograd: bool = True) -> float:
    """Time a compute action occupies its rank (its runtime overhead included), or a message
    takes on the link. `autograd`: the stage's forward records the autograd graph (the schedule
    does not split B and W: `needs_split_backward`)."""
    match action.kind:
        case ActionKind.F:
            return cost.forward_ms + cost.action_overhead_ms + (cost.autograd_forward_ms if autograd else 0.0)
        case ActionKind.B:
            return cost.backward_input_ms + cost.action_overhead_ms / 2
        case ActionKind.W:
            return cost.backward_weight_ms + cost.action_overhead_ms / 2
        case ActionKind.BW:
            return cost.backward_input_ms + cost.backward_weight_ms + cost.action_overhead_ms
        case ActionKind.SEND_F:
            return cost.send_forward_ms
        case ActionKind.SEND_B:
            return cost.send_backward_ms
    return 0.0


def matching_send(action: Action) -> tuple[ActionKind, int, int]:
    """The (kind, stage, micro-batch) of the send a RECV_F or RECV_B takes: activations from the
    stage before, gradients from the stage after.

    >>> matching_send(Action(2, ActionKind.RECV_B, 1))
    (<ActionKind.SEND_B: 'SEND_B'>, 3, 1)
    """
    if action.kind is ActionKind.RECV_F:
        return ActionKind.SEND_F, action.stage - 1, action.microbatch
    if action.kind is ActionKind.RECV_B:
        return ActionKind.SEND_B, action.stage + 1, action.microbatch
    raise ValueError(f"{action} receives nothing")


def _sent_bytes(action: Action, costs: Sequence[StageCost]) -> int:
    """What a SEND_F or SEND_B carries: the activations its stage sends on, or the gradients of those
    the stage before sent it (the same bytes when all of them need a gradient)."""
    return costs[action.stage].bytes_to_next if action.kind is ActionKind.SEND_F else costs[action.stage - 1].bytes_to_next


def _received_bytes(action: Action, costs: Sequence[StageCost]) -> int:
    """What a RECV_F or RECV_B takes in (0 for any other action)."""
    if action.kind not in (ActionKind.RECV_F, ActionKind.RECV_B):
        return 0
    kind, stage, microbatch = matching_send(action)
    return _sent_bytes(Action(stage, kind, microbatch), costs)


def simulate(schedule: Schedule, costs: Sequence[StageCost]) -> Timeline:
    """The predicted timeline of `schedule` when stage s costs `costs[s]` per micro-batch.

    >>> from pipecc.passes.schedules.gpipe import gpipe
    >>> unit = StageCost(1, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 0, 0, 0.0)
    >>> simulate(gpipe(2, 4), [unit, unit]).step_time_ms  # (m + p - 1) * (F + B + W)
    15.0
    """
    lowered = insert_comm(schedule)
    autograd = not needs_split_backward(schedule)  # the runtime's F/B/W graphs record no autograd graph
    clock = [0.0] * schedule.num_ranks
    arrival: dict[tuple[ActionKind, int, int], float] = {}  # (send kind, stage, mb) -> arrival time
    events = []
    for rank, action in execution_order(lowered):
        cost = costs[action.stage]
        start = clock[rank]
        taken = start + cost.receive_overhead_ms  # a receive whose message is already there
        if action.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
            arrival[(action.kind, action.stage, action.microbatch)] = start + action_ms(action, cost)
            end = start + cost.message_overhead_ms + cost.message_ms_per_mb * _sent_bytes(action, costs) / 1e6
        elif action.kind in (ActionKind.RECV_F, ActionKind.RECV_B):
            end = max(taken, arrival[matching_send(action)])
        else:
            end = start + action_ms(action, cost, autograd)
        clock[rank] = end
        events.append(TimedAction(rank, action, start, end))
    busy = [0.0] * schedule.num_ranks
    for e in events:
        if e.action.kind.is_compute:
            busy[e.rank] += e.end_ms - e.start_ms
    step_overhead_ms = max((c.step_overhead_ms for c in costs), default=0.0)
    sync_ms = max((c.sync_ms for c in costs), default=0.0)  # the ranks exchange once all are done
    return Timeline(tuple(events), max(clock) + sync_ms + step_overhead_ms, tuple(busy),
                    _peak_memory(schedule, events, costs))


def measured_timeline(schedule: Schedule, events: Sequence[TimedAction], costs: Sequence[StageCost]) -> Timeline:
    """The Timeline of a measured step (the runtime's recorded events), in the simulator's terms so
    the two can be printed side by side: times from the earliest start, busy = compute actions,
    peak memory from the same accounting as the prediction, on the measured order.

    >>> from pipecc.passes.schedules.gpipe import gpipe
    >>> unit = StageCost(1, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 0, 0, 0.0)
    >>> predicted = simulate(gpipe(2, 1), [unit, unit])
    >>> shifted = [TimedAction(e.rank, e.action, e.start_ms + 5, e.end_ms + 5) for e in predicted.events]
    >>> measured_timeline(gpipe(2, 1), shifted, [unit, unit]) == predicted
    True
    """
    origin = min((e.start_ms for e in events), default=0.0)
    shifted = tuple(TimedAction(e.rank, e.action, e.start_ms - origin, e.end_ms - origin) for e in events)
    busy = [0.0] * schedule.num_ranks
    for e in shifted:
        if e.action.kind.is_compute:
            busy[e.rank] += e.end_ms - e.start_ms
    step = max((e.end_ms for e in shifted), default=0.0)
    return Timeline(shifted, step, tuple(busy), _peak_memory(schedule, shifted, costs))


def format_predicted_vs_measured(predicted: Timeline, measured: Timeline) -> str:
    """Per rank and for the step: predicted beside measured time, busy time, bubble and peak memory,
    with measured/predicted ratios (the gap the cost model leaves).

    >>> from pipecc.passes.schedules.gpipe import gpipe
    >>> unit = StageCost(1, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 0, 0, 0.0)
    >>> t = simulate(gpipe(2, 2), [unit, unit])
    >>> print(format_predicted_vs_measured(t, t))
    rank  busy ms pred  busy ms meas  ratio  bubble pred  bubble meas
    0            6.000         6.000  1.000        33.3%        33.3%
    1            6.000         6.000  1.000        33.3%        33.3%
    step time: predicted 9.000 ms, measured 9.000 ms, ratio 1.000
    """
    rows = [("rank", "busy ms pred", "busy ms meas", "ratio", "bubble pred", "bubble meas")]
    for rank, (bp, bm) in enumerate(zip(predicted.busy_ms, measured.busy_ms)):
        rows.append((str(rank), f"{bp:.3f}", f"{bm:.3f}", _ratio(bm, bp),
                     _share(predicted.idle_ms[rank], predicted.step_time_ms),
                     _share(measured.idle_ms[rank], measured.step_time_ms)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.append(f"step time: predicted {predicted.step_time_ms:.3f} ms, measured {measured.step_time_ms:.3f} ms, "
                 f"ratio {_ratio(measured.step_time_ms, predicted.step_time_ms)}")
    return "\n".join(lines)


def _ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.3f}" if predicted > 0 else "-"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


def _peak_memory(schedule: Schedule, events: Sequence[TimedAction], costs: Sequence[StageCost]) -> tuple[int, ...]:
    peaks = []
    for rank in range(schedule.num_ranks):
        stages = schedule.stages_of(rank)
        weights = sum(2 * costs[s].param_bytes for s in stages)
        mine = sorted((e for e in events if e.rank == rank), key=lambda e: (e.end_ms, e.start_ms))
        # the runtime posts the buffers of all the step's incoming messages at its start
        held = peak = sum(_received_bytes(e.action, costs) for e in mine)
        for e in mine:
            saved = costs[e.action.stage].saved_bytes
            if e.action.kind is ActionKind.F:
                held += saved
            elif e.action.kind in (ActionKind.BW, ActionKind.W):
                held -= saved
            held -= _received_bytes(e.action, costs)  # taken: the stage's input from here on
            peak = max(peak, held)
        peaks.append(weights + peak)
    return tuple(peaks)
