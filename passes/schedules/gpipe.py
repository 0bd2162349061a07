"""GPipe (Huang et al. 2019): all forwards, then all backwards; m micro-batches in flight."""

from __future__ import annotations

from pipecc.ir import Action, ActionKind, Schedule


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """Rank r runs stage r: F for every micro-batch, then BW for every micro-batch.

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(gpipe(num_stages=2, num_microbatches=2)))
    rank 0: 0F0 0F1 0BW0 0BW1
    rank 1: 1F0 1F1 1BW0 1BW1
    """
    rank_actions = tuple(
        tuple(Action(s, ActionKind.F, mb) for mb in range(num_microbatches))
        + tuple(Action(s, ActionKind.BW, mb) for mb in range(num_microbatches))
        for s in range(num_stages)
    )
    return Schedule("gpipe", num_stages, num_microbatches, tuple(range(num_stages)), rank_actions)


def gpipe_in_flight(num_stages: int, num_microbatches: int, stage: int) -> int:
    """Every stage keeps the activations of all micro-batches until the backward starts."""
    return num_microbatches
