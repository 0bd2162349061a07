"""V-shaped placement: rank r holds stages r and 2p-1-r, so the first and the last stage (and
the loss) sit on rank 0, and every rank's two stages meet its neighbours in both directions.

- zbv (Qi et al. 2023, section 6, ZB-V): 1F1B's peak memory (2p stage micro-batches, i.e. p
  micro-batches of a rank's share of the model) on every rank and, at F = B = W, no bubble.
  Same order as torch.distributed.pipelining's ScheduleZBVZeroBubble (m >= 1; the warm-up is
  written for m >= 2p-1 and cut short below).
- v-half and v-min (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): the
  paper's repeating building blocks, which put a micro-batch's four passes on rank r at fixed
  offsets of a 6-slot period (V-Half: about half of 1F1B's activation memory, V-Min: about a
  third), with Ws in the free slots in the order their Bs ran. The paper then squeezes the
  warm-up and cool-down with a reordering pass; pipecc runs the block order as is (the runtime
  and the simulator start every action as soon as its inputs are there), so its warm-up and
  cool-down bubbles are somewhat larger than the paper's.
"""

from __future__ import annotations

from typing import Callable

from pipecc.ir import Action, ActionKind, Schedule

F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


def v_placement(num_ranks: int) -> tuple[int, ...]:
    """Stage s on rank s for the first p stages, rank 2p-1-s for the rest: (0, 1, 1, 0) on 2 ranks."""
    return tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))


def zbv(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """ZB-V: warm-up 2(p-r)-1 forwards of the first chunk, r pairs of (second, first), then
    p-r (F, B, W) of the second chunk; steady F/B/W pairs of both chunks; cool-down B then W.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(zbv(num_stages=4, num_microbatches=2)))
    rank 0: 0F0 0F1 3F0 3B0 3W0 3F1 3B1 3W1 0B0 0W0 0B1 0W1
    rank 1: 1F0 2F0 1F1 2F1 2B0 2W0 1B0 1W0 2B1 2W1 1B1 1W1
    """
    p = num_stages // 2
    return Schedule("zbv", num_stages, num_microbatches, v_placement(p),
                    tuple(_zbv_rank(p, r, num_microbatches) for r in range(p)))


def _zbv_rank(p: int, r: int, m: int) -> tuple[Action, ...]:
    first, second = r, 2 * p - 1 - r
    n = max(2 * p - 1, m)  # the order is written for n micro-batches; those >= m are dropped at the end
    out: list[Action] = []
    count = {(s, k): 0 for s in (first, second) for k in (F, B, W)}

    def put(stage: int, kind: ActionKind) -> None:
        out.append(Action(stage, kind, count[(stage, kind)]))
        count[(stage, kind)] += 1

    for _ in range(2 * (p - r) - 1):
        put(first, F)
    for _ in range(r):
        put(second, F)
        put(first, F)
    for _ in range(p - r):
        put(second, F), put(second, B), put(second, W)
    while count[(second, F)] < count[(first, F)] or count[(first, F)] < n:
        if count[(first, F)] < n:
            put(first, F)
        put(first, B), put(first, W)
        put(second, F), put(second, B), put(second, W)
    for _ in range(r):
        put(first, B), put(second, B)
    for _ in range(p - r):
        put(first, B), put(first, W)
    while count[(second, W)] < count[(second, B)]:
        put(second, W)
    while count[(first, W)] < count[(first, B)]:
        put(first, W)
    return tuple(a for a in out if a.microbatch < m)


def _v_min_offsets(p: int, r: int) -> tuple[int, int, int, int]:
    gap = 2 if p % 3 == 0 else 0
    return r, 2 * p - r - 1, 2 * p + gap + r, 4 * p + gap - r - 1


def _v_half_offsets(p: int, r: int) -> tuple[int, int, int, int]:
    gap = 3 if p % 2 == 0 else 0
    return 2 * r, 3 * p - r - 2, 3 * p + gap + 2 * r - 1, 6 * p + gap - r - 2


def v_half(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """V-Half: about half of 1F1B's activation memory.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(v_half(num_stages=4, num_microbatches=2)))
    rank 0: 0F0 3F0 0F1 3B0 3W0 3F1 0B0 3B1 0W0 3W1 0B1 0W1
    rank 1: 1F0 2F0 1F1 2F1 2B0 2W0 1B0 1W0 2B1 2W1 1B1 1W1
    """
    return _building_blocks("v-half", num_stages // 2, num_microbatches, _v_half_offsets)


def v_min(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """V-Min: about a third of 1F1B's activation memory.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(v_min(num_stages=4, num_microbatches=2)))
    rank 0: 0F0 3F0 3B0 3W0 0F1 0B0 0W0 3F1 3B1 3W1 0B1 0W1
    rank 1: 1F0 2F0 2B0 1B0 1F1 2F1 2W0 1W0 2B1 1B1 2W1 1W1
    """
    return _building_blocks("v-min", num_stages // 2, num_microbatches, _v_min_offsets)


PERIOD = 6  # slots per micro-batch on a rank: F and B of both stages, and two W


def _building_blocks(name: str, p: int, m: int, offsets: Callable[[int, int], tuple[int, int, int, int]]) -> Schedule:
    """Micro-batch k's F(first), F(second), B(second), B(first) on rank r at offsets(p, r) + 6k;
    each free slot runs the oldest pending W; the rest of the Ws at the end."""
    rank_actions = []
    for r in range(p):
        first, second = r, 2 * p - 1 - r
        slots: dict[int, Action] = {}
        for k in range(m):
            for offset, action in zip(offsets(p, r), (Action(first, F, k), Action(second, F, k),
                                                      Action(second, B, k), Action(first, B, k))):
                assert offset + PERIOD * k not in slots, f"{name}: building block overlaps at rank {r}"
                slots[offset + PERIOD * k] = action
        actions, pending = [], []
        for t in range(max(slots) + 1):
            if t in slots:
                actions.append(slots[t])
                if slots[t].kind is B:
                    pending.append(Action(slots[t].stage, W, slots[t].microbatch))
            elif pending:
                actions.append(pending.pop(0))
        rank_actions.append(tuple(actions + pending))
    return Schedule(name, 2 * p, m, v_placement(p), tuple(rank_actions))
