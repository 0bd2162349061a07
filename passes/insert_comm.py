"""Insert comm: explicit SEND/RECV actions wherever neighbouring stages sit on different ranks."""

from __future__ import annotations

from pipecc.ir import Action, ActionKind, Schedule


def insert_comm(schedule: Schedule) -> Schedule:
    """The same schedule with RECV_F before each F that needs another rank's activations, SEND_F
    after each F whose outputs another rank needs, and likewise RECV_B / SEND_B around backwards.

    >>> from pipecc.printing import format_schedule
    >>> from pipecc.passes.schedules.gpipe import gpipe
    >>> print(format_schedule(insert_comm(gpipe(2, 1))))
    rank 0: 0F0 0SEND_F0 0RECV_B0 0BW0
    rank 1: 1RECV_F0 1F0 1BW0 1SEND_B0
    """
    placed = schedule.stage_to_rank
    last = schedule.num_stages - 1
    remote_prev = lambda s: s > 0 and placed[s - 1] != placed[s]  # noqa: E731
    remote_next = lambda s: s < last and placed[s + 1] != placed[s]  # noqa: E731
    lowered = []
    for actions in schedule.rank_actions:
        out: list[Action] = []
        for a in actions:
            s, mb = a.stage, a.microbatch
            if a.kind is ActionKind.F:
                out += [Action(s, ActionKind.RECV_F, mb)] if remote_prev(s) else []
                out += [a] + ([Action(s, ActionKind.SEND_F, mb)] if remote_next(s) else [])
            elif a.kind in (ActionKind.B, ActionKind.BW):
                out += [Action(s, ActionKind.RECV_B, mb)] if remote_next(s) else []
                out += [a] + ([Action(s, ActionKind.SEND_B, mb)] if remote_prev(s) else [])
            else:
                out.append(a)
        lowered.append(tuple(out))
    return Schedule(schedule.name, schedule.num_stages, schedule.num_microbatches, placed, tuple(lowered))
