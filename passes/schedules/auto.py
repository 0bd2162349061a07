"""The zero-bubble automatic search (Qi et al. 2023, section 4.1): build the heuristic schedule
(zb_wave.py) for every combination of its options on the plan's own per-stage costs and memory
limit, simulate each, keep the fastest. One stage per rank.

pipecc.compile(schedule="auto") runs this as one candidate among all registered schedules
(pipecc/pipeline.py) and keeps the fastest that fits.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from pipecc.ir import Schedule, StageCost
from pipecc.passes.schedules.zb_wave import StageTimes, WaveOptions, zero_bubble_waves


def stage_times(costs: Sequence[StageCost]) -> list[StageTimes]:
    """The scheduler's view of the plan's stage costs; memory in bytes of saved activations."""
    return [StageTimes(c.forward_ms, c.backward_input_ms, c.backward_weight_ms, c.send_forward_ms,
                       c.send_backward_ms, float(c.saved_bytes)) for c in costs]


def zero_bubble_search(costs: Sequence[StageCost], num_microbatches: int,
                       max_memory_bytes: int | None = None) -> Schedule:
    """The fastest (by the simulator) of the heuristic's schedules under `max_memory_bytes` per rank
    (weights and their gradients count against it; None: at most m micro-batches, i.e. no limit).
    Ties keep the first option combination, so the result is deterministic.

    >>> from pipecc.printing import format_schedule
    >>> unit = StageCost(1, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 1, 0, 0.0)
    >>> print(format_schedule(zero_bubble_search([unit, unit], 3, max_memory_bytes=2)))
    rank 0: 0F0 0F1 0B0 0W0 0F2 0B1 0W1 0B2 0W2
    rank 1: 1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 1W2
    """
    from pipecc.passes.simulate import simulate

    times = stage_times(costs)
    if max_memory_bytes is None:
        limits = [t.saved_units * num_microbatches for t in times]
    else:
        limits = [float(max_memory_bytes - 2 * c.param_bytes) for c in costs]
    best: tuple[float, Schedule] | None = None
    for flags in itertools.product((False, True), repeat=3):
        schedule = zero_bubble_waves("zb-auto", num_microbatches, times, limits, WaveOptions(*flags))
        step_ms = simulate(schedule, costs).step_time_ms
        if best is None or step_ms < best[0] - 1e-12:
            best = (step_ms, schedule)
    assert best is not None
    return best[1]
