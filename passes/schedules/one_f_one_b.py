"""1F1B (PipeDream-Flush, Narayanan et al. 2021): warm up, then alternate one forward and one
backward, so stage s holds at most p - s micro-batches instead of all m."""

from __future__ import annotations

from pipecc.ir import Action, ActionKind, Schedule


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """Rank r runs stage r: min(p-r-1, m) warm-up forwards, then F/BW pairs, then the last BWs.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(one_f_one_b(num_stages=2, num_microbatches=3)))
    rank 0: 0F0 0F1 0BW0 0F2 0BW1 0BW2
    rank 1: 1F0 1BW0 1F1 1BW1 1F2 1BW2
    """
    rank_actions = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        actions = [Action(s, ActionKind.F, mb) for mb in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [Action(s, ActionKind.F, warmup + i), Action(s, ActionKind.BW, i)]
        actions += [Action(s, ActionKind.BW, mb) for mb in range(num_microbatches - warmup, num_microbatches)]
        rank_actions.append(tuple(actions))
    return Schedule("1f1b", num_stages, num_microbatches, tuple(range(num_stages)), tuple(rank_actions))


def one_f_one_b_in_flight(num_stages: int, num_microbatches: int, stage: int) -> int:
    """Stage s starts its first backward after p - s forwards (its warm-up plus one)."""
    return min(num_stages - stage, num_microbatches)
