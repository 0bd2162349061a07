"""Zero Bubble pipeline parallelism (Qi et al. 2023): the backward split into B (input
gradients, on the critical path) and W (weight gradients, movable), one stage per rank.

- zb-h1: 1F1B's warm-up and memory (at most p micro-batches on a rank), with rank r's Ws
  trailing its Bs by r steady-state steps, so the Ws fill the cool-down. Bubble
  (p-1)(F+B-W) when W <= F, a third of 1F1B's at F = B = W. Same order as the paper's
  handcrafted ZB-H1 and torch.distributed.pipelining's ScheduleInterleavedZeroBubble at v = 1.
- zb-h2: the paper's ZB-H2 memory (2p-1 micro-batches on a rank) filled by the zero-bubble
  heuristic (zb_wave.py) at unit costs: 2p-1-2r warm-up forwards on rank r, then F/B with Ws
  in the gaps. Bubble max(0, (p-1)(F+B-2W)) per rank, from its first action to its last, when
  m >= 2p-1 (the paper's measure: the next step's warm-up overlaps this step's tail when the
  optimizer step does not synchronise the ranks).
"""

from __future__ import annotations

from pipecc.ir import Action, ActionKind, Schedule
from pipecc.passes.schedules.zb_wave import StageTimes, zero_bubble_waves

F, B, W = ActionKind.F, ActionKind.B, ActionKind.W


def zb_h1(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """ZB-H1: warm-up p-1-r forwards, then F and B per step, rank r's first W after r steps.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(zb_h1(num_stages=2, num_microbatches=3)))
    rank 0: 0F0 0F1 0B0 0W0 0F2 0B1 0W1 0B2 0W2
    rank 1: 1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 1W2
    """
    p, m = num_stages, num_microbatches
    rank_actions = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        actions = [Action(r, F, mb) for mb in range(warmup)]
        num_w = 0
        for step in range(m):  # steps warmup.. are 1F1B steps (F then B); the last `warmup` are B only
            if warmup + step < m:
                actions.append(Action(r, F, warmup + step))
            actions.append(Action(r, B, step))
            if step >= r:
                actions.append(Action(r, W, num_w))
                num_w += 1
        actions += [Action(r, W, mb) for mb in range(num_w, m)]
        rank_actions.append(tuple(actions))
    return Schedule("zb-h1", p, m, tuple(range(p)), tuple(rank_actions))


def zb_h2(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """ZB-H2: the zero-bubble heuristic at unit F = B = W with 2p-1 micro-batches of memory per rank.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(zb_h2(num_stages=2, num_microbatches=4)))
    rank 0: 0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3
    rank 1: 1F0 1B0 1F1 1B1 1F2 1B2 1W0 1F3 1B3 1W1 1W2 1W3
    """
    p = num_stages
    schedule = zero_bubble_waves("zb-h2", num_microbatches, [StageTimes()] * p, [2 * p - 1] * p)
    return schedule
