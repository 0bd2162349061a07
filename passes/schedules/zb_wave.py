"""The zero-bubble heuristic of Qi et al. 2023 (section 4.1, "automatic scheduling"), for one
stage per rank: micro-batches are placed as waves, each wave one forward per stage and then
its backward from the last stage to the first, so that when a stage decides whether to fill
a gap with a W, the time its next F or B arrives is already known.

- warm-up: stage j runs as many forwards as fit (in memory, and, unless
  `bubble_before_first_b`, in the time before the first B can reach it),
- steady state: one F and one B per wave; a stage runs pending Ws first when memory binds,
  and fills the wait for its next input with Ws that fit in the gap, then one more W that
  overruns it (always with `fill_partial_gaps`; without it, only when the stage has idled
  less than the most idle stage so far would after the wait),
- `prioritize_b`: a stage skips its F for this wave when running it would delay the B the
  next stage is about to send back,
- the end: every remaining W.

Memory is counted in the same unit as `StageTimes.saved_units` (a micro-batch holds its
activations from the end of its F until its W). The search over the options is auto.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipecc.errors import ScheduleError
from pipecc.ir import Action, ActionKind, Schedule

F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


@dataclass(frozen=True)
class StageTimes:
    """What the list scheduler needs to know about one stage: its F/B/W times, the time its
    messages take to reach a neighbour on another rank, and what one micro-batch keeps alive."""

    forward_ms: float = 1.0
    backward_input_ms: float = 1.0
    backward_weight_ms: float = 1.0
    send_forward_ms: float = 0.0
    send_backward_ms: float = 0.0
    saved_units: float = 1.0  # activation memory of one in-flight micro-batch (any unit, e.g. bytes)


@dataclass(frozen=True)
class WaveOptions:
    bubble_before_first_b: bool = False
    prioritize_b: bool = False
    fill_partial_gaps: bool = True


class _Waves:
    """Per stage (= rank) its clock, counters, held memory and order; per action its finish time."""

    def __init__(self, num_microbatches: int, times: Sequence[StageTimes], limits: Sequence[float]) -> None:
        self.m = num_microbatches
        self.times = list(times)
        self.p = len(times)
        self.limits = list(limits)
        self.clock = [0.0] * self.p
        self.count = {kind: [0] * self.p for kind in (F, B, W)}
        self.held = [0.0] * self.p
        self.end: dict[Action, float] = {}
        self.bubble = [0.0] * self.p
        self.order: list[list[Action]] = [[] for _ in range(self.p)]

    def cost(self, stage: int, kind: ActionKind) -> float:
        t = self.times[stage]
        return {F: t.forward_ms, B: t.backward_input_ms, W: t.backward_weight_ms}[kind]

    def arrival(self, stage: int, kind: ActionKind) -> float:
        """When the input of `stage`'s next `kind` (F or B) gets there (0 when it has none)."""
        mb = self.count[kind][stage]
        if kind is F and stage > 0:
            return self.end[Action(stage - 1, F, mb)] + self.times[stage - 1].send_forward_ms
        if kind is B and stage < self.p - 1:
            return self.end[Action(stage + 1, B, mb)] + self.times[stage + 1].send_backward_ms
        return 0.0

    def put(self, stage: int, kind: ActionKind) -> None:
        mb = self.count[kind][stage]
        action = Action(stage, kind, mb)
        start = self.clock[stage] if kind is W else max(self.clock[stage], self.arrival(stage, kind))
        if kind is B:
            start = max(start, self.end[Action(stage, F, mb)])
        if self.count[F][stage] > 0:
            self.bubble[stage] += start - self.clock[stage]
        self.clock[stage] = self.end[action] = start + self.cost(stage, kind)
        self.count[kind][stage] += 1
        saved = self.times[stage].saved_units
        self.held[stage] += saved if kind is F else -saved if kind is W else 0.0
        self.order[stage].append(action)

    def has_w(self, stage: int) -> bool:
        return self.count[W][stage] < self.count[B][stage]

    def make_room(self, stage: int, need: float) -> None:
        """Ws until `need` more units fit (memory binds)."""
        while self.held[stage] + need > self.limits[stage] + 1e-9:
            if not self.has_w(stage):
                raise ScheduleError(f"zero-bubble search: stage {stage} cannot fit one more micro-batch "
                                    f"({need:g} units) within its limit {self.limits[stage]:g}.\n"
                                    "Raise max_memory_bytes.")
            self.put(stage, W)

    def fill_gap(self, stage: int, kind: ActionKind, options: WaveOptions) -> None:
        """Ws in the wait for the input of the stage's next `kind`."""
        arrival = self.arrival(stage, kind)
        while self.has_w(stage) and self.clock[stage] + self.cost(stage, W) <= arrival + 1e-9:
            self.put(stage, W)
        if self.has_w(stage) and self.clock[stage] < arrival:
            small = arrival - self.clock[stage] <= max(self.bubble) - self.bubble[stage]
            if options.fill_partial_gaps or not small:
                self.put(stage, W)


def zero_bubble_waves(name: str, num_microbatches: int, times: Sequence[StageTimes], limits: Sequence[float],
                      options: WaveOptions = WaveOptions()) -> Schedule:
    """The heuristic's schedule on `len(times)` stages, stage s on rank s, under per-stage memory `limits`."""
    state = _Waves(num_microbatches, times, limits)
    p, m = state.p, num_microbatches
    for j in range(p):
        if times[j].saved_units > limits[j] + 1e-9:
            raise ScheduleError(f"{name}: stage {j} cannot hold even one micro-batch ({times[j].saved_units:g} "
                                f"units, limit {limits[j]:g}).\nRaise max_memory_bytes or use more stages.")
    _first_wave(state, options)
    for i in range(1, m):
        _steady_wave(state, i, options)
    for j in range(p):
        while state.count[W][j] < m:
            state.put(j, W)
    return Schedule(name, p, m, tuple(range(p)), tuple(tuple(o) for o in state.order))


def _first_wave(state: _Waves, options: WaveOptions) -> None:
    """Micro-batch 0 through every stage, plus the warm-up forwards that fit before its B returns."""
    p, m = state.p, state.m
    for j in range(p):
        state.put(j, F)
    extra = [0] * p
    b_done = state.end[Action(p - 1, F, 0)] + state.cost(p - 1, B)  # when stage p-1's B0 would end
    for j in range(p - 2, -1, -1):
        held, clock = state.held[j], state.clock[j]
        b_arrives = b_done + state.times[j + 1].send_backward_ms
        while state.count[F][j] + extra[j] < m:
            f_cost = state.cost(j, F)
            if held + state.times[j].saved_units > state.limits[j] + 1e-9:
                break
            late = clock + f_cost > b_arrives if options.bubble_before_first_b else clock >= b_arrives
            if late:
                break
            held += state.times[j].saved_units
            clock += f_cost
            extra[j] += 1
        b_done = max(clock, b_arrives) + state.cost(j, B)
    for j in range(1, p):  # a later stage never runs more warm-up forwards than the one before it
        while extra[j] > 0 and extra[j] >= extra[j - 1]:
            extra[j] -= 1
    for j in range(p):
        for _ in range(extra[j]):
            state.put(j, F)
    for j in range(p - 1, -1, -1):
        state.put(j, B)


def _steady_wave(state: _Waves, i: int, options: WaveOptions) -> None:
    """Wave i: at most one more F per stage, then B of micro-batch i from the last stage to the first."""
    p, m = state.p, state.m
    wants_f = [state.count[F][j] < m and not (options.prioritize_b and _f_delays_b(state, j)) for j in range(p)]
    for j in range(p - 2, -1, -1):  # a stage runs a forward only if the next stage can take it
        wants_f[j] = wants_f[j] and wants_f[j + 1]
    for j in range(p):
        if not wants_f[j]:
            continue
        state.make_room(j, state.times[j].saved_units)
        if j > 0:
            state.fill_gap(j, F, options)
        state.put(j, F)
    for j in range(p - 1, -1, -1):
        if state.count[B][j] != i or state.count[F][j] <= i:
            raise AssertionError(f"wave {i}: stage {j} has run {state.count[F][j]} F and {state.count[B][j]} B")
        if j < p - 1:
            state.fill_gap(j, B, options)
        if j == 0 and state.count[F][0] == m:  # the first stage has nothing else to wait for: flush its Ws
            while state.has_w(0):
                state.put(0, W)
        state.put(j, B)


def _f_delays_b(state: _Waves, j: int) -> bool:
    """Whether stage j's next F would still be running when the next stage's B could reach it
    (the stage is already two or more forwards ahead, so skipping one F costs nothing)."""
    if j + 1 >= state.p or state.count[F][j] < state.count[F][j + 1] + 2:
        return False
    nxt = j + 1
    b_could_arrive = state.clock[nxt] + state.cost(nxt, F) + state.cost(nxt, B) + state.times[nxt].send_backward_ms
    return state.clock[j] + state.cost(j, F) > b_could_arrive
