"""Several stages per rank in a loop: rank r holds stages r, r + p, r + 2p, ... (v of them).

- interleaved-1f1b (Narayanan et al. 2021, Megatron-LM): depth first. Each rank runs its
  forwards in rounds of p micro-batches per local stage, warms up with (v-1)·p + 2(p-1-r)
  forwards, then alternates one forward and one fused backward. The bubble shrinks to
  (p-1)(F+B+W)/v for the price of v times more messages.
- looped-bfs (Lamy-Poirier 2022, Breadth-First PP): every micro-batch through the rank's first
  local stage, then its second, ...; backwards in the reverse order. GPipe-like memory.

The user picks v through the stage count: num_stages = v · num_ranks (Config.num_ranks; when
it is not given, v = 2). Rounds follow torch.distributed.pipelining's ScheduleInterleaved1F1B:
r = max(1, m // p) rounds of m / r micro-batches when m splits so; otherwise rounds of p with a
shorter last one, which the verifier accepts for most (p, v, m) and rejects, with a ScheduleError
naming the sizes that work, for the rest (e.g. p = 4, v = 3, m = 5).
"""

from __future__ import annotations

from pipecc.errors import ScheduleError
from pipecc.ir import Action, ActionKind, Schedule

F, BW = ActionKind.F, ActionKind.BW


def loop_placement(num_stages: int, num_ranks: int) -> tuple[int, ...]:
    """Stage s on rank s mod p: (0, 1, 0, 1) for 4 stages on 2 ranks."""
    return tuple(s % num_ranks for s in range(num_stages))


def interleaved_round_sizes(num_ranks: int, num_microbatches: int) -> int:
    """Micro-batches per round: torch's equal rounds (m / max(1, m // p)) when m splits into them,
    else p, with a shorter last round."""
    rounds = max(1, num_microbatches // num_ranks)
    return num_microbatches // rounds if num_microbatches % rounds == 0 else num_ranks


def interleaved_1f1b(num_stages: int, num_microbatches: int, num_ranks: int) -> Schedule:
    """Megatron's interleaved 1F1B with v = num_stages / num_ranks stages per rank (fused backward).

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(interleaved_1f1b(num_stages=4, num_microbatches=2, num_ranks=2)))
    rank 0: 0F0 0F1 2F0 2F1 2BW0 2BW1 0BW0 0BW1
    rank 1: 1F0 1F1 3F0 3BW0 3F1 3BW1 1BW0 1BW1
    """
    v, m = num_stages // num_ranks, num_microbatches
    per_round = interleaved_round_sizes(num_ranks, m)
    rank_actions = []
    for rank in range(num_ranks):
        forwards = _depth_first(rank, num_ranks, v, m, per_round, F, reverse=False)
        backwards = _depth_first(rank, num_ranks, v, m, per_round, BW, reverse=True)
        warmup = min((v - 1) * per_round + 2 * (num_ranks - 1 - rank), m * v)
        actions = forwards[:warmup]
        for i in range(m * v - warmup):
            actions += [forwards[warmup + i], backwards[i]]
        actions += backwards[m * v - warmup:]
        rank_actions.append(tuple(actions))
    schedule = Schedule("interleaved-1f1b", num_stages, m, loop_placement(num_stages, num_ranks), tuple(rank_actions))
    if m % per_round:
        _check_short_last_round(schedule, per_round)
    return schedule


def _check_short_last_round(schedule: Schedule, per_round: int) -> None:
    """A shorter last round works for most (p, v, m) but not all (p=4, v=3, m=5 deadlocks): verify."""
    from pipecc.passes.schedules.verify import check_schedule

    try:
        check_schedule(schedule)
    except ScheduleError:
        p, m = schedule.num_ranks, schedule.num_microbatches
        fits = [k for k in range(1, 4 * p + 1) if k <= p or k % max(1, k // p) == 0]
        raise ScheduleError(
            f"interleaved-1f1b: num_microbatches={m} with {schedule.num_stages // p} stages on each of {p} ranks "
            f"leaves a last round of {m % per_round} micro-batches, and that order deadlocks.\n"
            f"Pass num_microbatches as one that splits into equal rounds ({', '.join(map(str, fits[:10]))}, ...), "
            "or use schedule=\"1f1b\".") from None


def _depth_first(rank: int, num_ranks: int, v: int, m: int, per_round: int, kind: ActionKind,
                 reverse: bool) -> list[Action]:
    """The rank's actions of one kind: round by round, local stage by local stage (last stage first
    for backwards), micro-batch by micro-batch."""
    chunks = list(range(v))[::-1] if reverse else list(range(v))
    out = []
    for first in range(0, m, per_round):
        for chunk in chunks:
            stage = chunk * num_ranks + rank
            out += [Action(stage, kind, mb) for mb in range(first, min(first + per_round, m))]
    return out


def looped_bfs(num_stages: int, num_microbatches: int, num_ranks: int) -> Schedule:
    """Breadth-first: all forwards of the rank's first stage, then of its next, ...; then the fused
    backwards from its last stage to its first, latest micro-batch first (as torch's ScheduleLoopedBFS).

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(looped_bfs(num_stages=4, num_microbatches=2, num_ranks=2)))
    rank 0: 0F0 0F1 2F0 2F1 2BW1 2BW0 0BW1 0BW0
    rank 1: 1F0 1F1 3F0 3F1 3BW1 3BW0 1BW1 1BW0
    """
    v, m = num_stages // num_ranks, num_microbatches
    rank_actions = []
    for rank in range(num_ranks):
        stages = [chunk * num_ranks + rank for chunk in range(v)]
        forwards = [Action(s, F, mb) for s in stages for mb in range(m)]
        backwards = [Action(s, BW, mb) for s in reversed(stages) for mb in reversed(range(m))]
        rank_actions.append(tuple(forwards + backwards))
    return Schedule("looped-bfs", num_stages, m, loop_placement(num_stages, num_ranks), tuple(rank_actions))
