"""The schedules pipecc knows, by name: how to generate them and how much each stage holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipecc.errors import ConfigError
from pipecc.ir import Schedule
from pipecc.passes.schedules import gpipe, one_f_one_b


@dataclass(frozen=True)
class ScheduleKind:
    name: str
    summary: str
    generate: Callable[[int, int], Schedule]  # (num_stages, num_microbatches) -> Schedule
    in_flight: Callable[[int, int, int], int]  # (num_stages, num_microbatches, stage) -> micro-batches held
    stages_per_rank: int = 1


SCHEDULES: dict[str, ScheduleKind] = {
    "gpipe": ScheduleKind("gpipe", "all forwards, then all backwards (m micro-batches in flight)",
                          gpipe.gpipe, gpipe.gpipe_in_flight),
    "1f1b": ScheduleKind("1f1b", "warm-up, then one forward / one backward (p - s in flight on stage s)",
                         one_f_one_b.one_f_one_b, one_f_one_b.one_f_one_b_in_flight),
}


def schedule_kind(name: str) -> ScheduleKind:
    """The registered schedule called `name`; ConfigError listing the known ones otherwise."""
    try:
        return SCHEDULES[name]
    except KeyError:
        known = ", ".join(SCHEDULES)
        raise ConfigError(f"unknown schedule {name!r}; pipecc knows {known}.\nPass one of those as schedule=.") from None
