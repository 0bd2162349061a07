"""The schedules pipecc knows, by name: how to generate them, where they place stages, and how
many micro-batches each stage holds at once (the partitioner's memory model).

Placement: one stage per rank (gpipe, 1f1b, zb-h1, zb-h2), two per rank in a V (zbv, v-half,
v-min, dualpipev: rank r holds stages r and 2p-1-r), or v per rank in a loop (interleaved-1f1b,
looped-bfs: rank r holds r, r+p, ...; the user picks v through num_stages = v * num_ranks,
and v = 2 when num_ranks is not given). "auto" is not a generator: pipecc.compile builds every
schedule that fits the memory limit and keeps the fastest by the simulator (pipecc/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipecc.errors import ConfigError
from pipecc.ir import ActionKind, Schedule
from pipecc.passes.schedules import dualpipe, gpipe, interleaved, one_f_one_b, v_shape, zero_bubble


@dataclass(frozen=True)
class ScheduleKind:
    name: str
    summary: str
    generate: Callable[[int, int, int], Schedule]  # (num_stages, num_microbatches, num_ranks) -> Schedule
    stages_per_rank: int = 1  # stages on every rank (the default v where `fixed_stages_per_rank` is False)
    fixed_stages_per_rank: bool = True

    def num_ranks(self, num_stages: int, num_ranks: int | None = None) -> int:
        """The rank count this schedule puts `num_stages` stages on; ConfigError if it cannot."""
        v = self.stages_per_rank
        if num_ranks is None:
            if num_stages % v:
                raise ConfigError(
                    f"schedule {self.name!r} places {v} stages on every rank, so num_stages must be a multiple "
                    f"of {v}; got num_stages={num_stages}.\nPass num_stages={v * max(1, num_stages // v)} or "
                    f"{v * (num_stages // v + 1)}.")
            return num_stages // v
        if num_ranks < 1 or num_stages % num_ranks or (self.fixed_stages_per_rank and num_stages != v * num_ranks):
            want = f"{v} * num_ranks = {v * num_ranks}" if self.fixed_stages_per_rank else "a multiple of num_ranks"
            raise ConfigError(f"schedule {self.name!r} on num_ranks={num_ranks} needs num_stages = {want}; "
                              f"got num_stages={num_stages}.\nPass num_stages as that, or leave num_ranks out.")
        return num_ranks

    def build(self, num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
        """This schedule for `num_stages` stages on its ranks (see num_ranks)."""
        return self.generate(num_stages, num_microbatches, self.num_ranks(num_stages, num_ranks))

    @property
    def splits_backward(self) -> bool:
        """Whether it runs B and W separately (needs the split-backward runtime)."""
        return self.name in SPLIT_BACKWARD


SPLIT_BACKWARD = frozenset({"zb-h1", "zb-h2", "zbv", "v-half", "v-min", "dualpipev"})


def _one_per_rank(fn: Callable[[int, int], Schedule]) -> Callable[[int, int, int], Schedule]:
    return lambda num_stages, num_microbatches, num_ranks: fn(num_stages, num_microbatches)


SCHEDULES: dict[str, ScheduleKind] = {kind.name: kind for kind in (
    ScheduleKind("gpipe", "all forwards, then all backwards (m micro-batches in flight)",
                 _one_per_rank(gpipe.gpipe)),
    ScheduleKind("1f1b", "warm-up, then one forward / one backward (p - s in flight on stage s)",
                 _one_per_rank(one_f_one_b.one_f_one_b)),
    ScheduleKind("interleaved-1f1b", "Megatron interleaved 1F1B, v stages per rank in a loop: bubble / v",
                 interleaved.interleaved_1f1b, stages_per_rank=2, fixed_stages_per_rank=False),
    ScheduleKind("looped-bfs", "breadth-first, v stages per rank in a loop: all micro-batches per stage",
                 interleaved.looped_bfs, stages_per_rank=2, fixed_stages_per_rank=False),
    ScheduleKind("zb-h1", "zero bubble H1: 1F1B memory, Ws fill the cool-down: bubble (p-1)(F+B-W)",
                 zero_bubble.zb_h1),
    ScheduleKind("zb-h2", "zero bubble H2: 2p-1 in flight, Ws fill every gap: bubble (p-1)(F+B-2W)",
                 zero_bubble.zb_h2),
    ScheduleKind("zbv", "zero bubble V: 2 stages per rank in a V, 1F1B memory, no bubble at F=B=W",
                 v_shape.zbv, stages_per_rank=2),
    ScheduleKind("v-half", "controllable-memory V-Half: about half of 1F1B's activation memory",
                 v_shape.v_half, stages_per_rank=2),
    ScheduleKind("v-min", "controllable-memory V-Min: about a third of 1F1B's activation memory",
                 v_shape.v_min, stages_per_rank=2),
    ScheduleKind("dualpipev", "DeepSeek DualPipeV: V, paired F of one stage with BW of the other (m >= 2p)",
                 dualpipe.dualpipev, stages_per_rank=2),
)}


def schedule_kind(name: str) -> ScheduleKind:
    """The registered schedule called `name`; ConfigError listing the known ones otherwise."""
    try:
        return SCHEDULES[name]
    except KeyError:
        known = ", ".join([*SCHEDULES, "auto"])
        raise ConfigError(f"unknown schedule {name!r}; pipecc knows {known}.\nPass one of those as schedule=.") from None


def default_num_stages(schedule: str, num_ranks: int) -> int:
    """How many stages `schedule` runs on `num_ranks` ranks by default: its stages_per_rank on each
    (2 for the V and looped schedules), one per rank for "auto" (which picks its own placement).

    >>> default_num_stages("zbv", 2), default_num_stages("1f1b", 2), default_num_stages("auto", 2)
    (4, 2, 2)
    """
    return num_ranks * (SCHEDULES[schedule].stages_per_rank if schedule in SCHEDULES else 1)


def in_flight(schedule: Schedule, stage: int) -> int:
    """The most micro-batches `stage` holds activations for at once: counted along its rank's
    order, each from its F until its W (or BW). B is taken to free nothing: the runtime's B keeps
    the autograd graph alive for W, so the count is exact for it and an upper bound for a split
    that frees what W does not read."""
    held = peak = 0
    for action in schedule.rank_actions[schedule.stage_to_rank[stage]]:
        if action.stage != stage:
            continue
        if action.kind is ActionKind.F:
            held += 1
            peak = max(peak, held)
        elif action.kind in (ActionKind.W, ActionKind.BW):
            held -= 1
    return peak
