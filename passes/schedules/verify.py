"""Schedule verifier: every (stage, micro-batch, kind) runs once on its rank, and nothing deadlocks."""

from __future__ import annotations

from collections import Counter

from pipecc.errors import ScheduleError
from pipecc.ir import Action, ActionKind, Schedule

F, B, W, BW = ActionKind.F, ActionKind.B, ActionKind.W, ActionKind.BW


def check_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError unless each stage's rank runs F and (BW, or B and W) once per micro-batch,
    no rank runs another rank's stage, and the actions (with their sends and receives) cannot deadlock."""
    from pipecc.passes.insert_comm import insert_comm  # the comm lowering is what actually runs

    for rank, actions in enumerate(schedule.rank_actions):
        _check_rank(schedule, rank, actions)
    execution_order(insert_comm(schedule))


def _check_rank(schedule: Schedule, rank: int, actions: tuple[Action, ...]) -> None:
    counts = Counter(actions)
    repeated = [a for a, c in counts.items() if c > 1]
    if repeated:
        raise ScheduleError(f"{schedule.name}: rank {rank} runs {repeated[0]} {counts[repeated[0]]} times.")
    for action in actions:
        if schedule.stage_to_rank[action.stage] != rank:
            raise ScheduleError(f"{schedule.name}: rank {rank} runs {action}, but stage {action.stage} "
                                f"is placed on rank {schedule.stage_to_rank[action.stage]}.")
    for stage in schedule.stages_of(rank):
        for mb in range(schedule.num_microbatches):
            has = {k for k in (F, B, W, BW) if Action(stage, k, mb) in counts}
            if F not in has or not (has == {F, BW} or has == {F, B, W}):
                raise ScheduleError(
                    f"{schedule.name}: rank {rank} runs {sorted(k.value for k in has)} for stage {stage} "
                    f"micro-batch {mb}; it needs F and either BW or both B and W.")


def _ready(action: Action, done: set[Action], schedule: Schedule) -> bool:
    """Whether `action`'s inputs exist once the actions in `done` have run."""
    s, mb, last = action.stage, action.microbatch, schedule.num_stages - 1
    same_rank_prev = s > 0 and schedule.stage_to_rank[s - 1] == schedule.stage_to_rank[s]
    same_rank_next = s < last and schedule.stage_to_rank[s + 1] == schedule.stage_to_rank[s]
    grads_of = lambda stage: Action(stage, BW, mb) in done or Action(stage, B, mb) in done  # noqa: E731
    match action.kind:
        case ActionKind.RECV_F:
            return Action(s - 1, ActionKind.SEND_F, mb) in done
        case ActionKind.RECV_B:
            return Action(s + 1, ActionKind.SEND_B, mb) in done
        case ActionKind.SEND_F:
            return Action(s, F, mb) in done
        case ActionKind.SEND_B:
            return grads_of(s)
        case ActionKind.F:
            if s == 0:
                return True
            return Action(s - 1, F, mb) in done if same_rank_prev else Action(s, ActionKind.RECV_F, mb) in done
        case ActionKind.B | ActionKind.BW:
            if Action(s, F, mb) not in done:
                return False
            if s == last:
                return True
            return grads_of(s + 1) if same_rank_next else Action(s, ActionKind.RECV_B, mb) in done
        case ActionKind.W:
            return Action(s, B, mb) in done
    raise AssertionError(action)


def execution_order(schedule: Schedule) -> list[tuple[int, Action]]:
    """One global order of (rank, action) in which every action's inputs already exist: ranks run
    their lists in order, a receive waits for its send. ScheduleError with a grid on deadlock."""
    position = [0] * schedule.num_ranks
    done: set[Action] = set()
    order: list[tuple[int, Action]] = []
    total = sum(len(a) for a in schedule.rank_actions)
    while len(order) < total:
        progressed = False
        for rank, actions in enumerate(schedule.rank_actions):
            while position[rank] < len(actions) and _ready(actions[position[rank]], done, schedule):
                action = actions[position[rank]]
                done.add(action)
                order.append((rank, action))
                position[rank] += 1
                progressed = True
        if not progressed:
            raise _deadlock(schedule, position)
    return order


def _deadlock(schedule: Schedule, position: list[int]) -> ScheduleError:
    blocked = [f"rank {r} at {a[position[r]]}" for r, a in enumerate(schedule.rank_actions) if position[r] < len(a)]
    err = ScheduleError(f"{schedule.name} deadlocks: {'; '.join(blocked)} wait for each other.\n"
                        "Reorder the actions so each rank's next receive has a matching earlier send.")
    grid = []
    for rank, actions in enumerate(schedule.rank_actions):
        cells = [f"{a}" if i != position[rank] else f"{a} <-- here" for i, a in enumerate(actions)]
        grid.append(f"rank {rank}: " + " ".join(cells))
    err.add_note("\n".join(grid))
    return err
