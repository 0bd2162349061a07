"""DualPipeV (DeepSeek-V3 report, 2024; the V form of DualPipe, as in deepseek-ai/DualPipe and
torch.distributed.pipelining's ScheduleDualPipeV): V placement, and in the steady state each
rank pairs the forward of one of its stages with the backward of the other. DeepSeek overlaps
the pair's computation with its communication on a GPU; pipecc runs the pair as F then a fused
BW (CPU runtimes overlap nothing), which keeps the order, the memory and the bubble shape.
The warm-up uses zero-bubble B/W splits at its end and the cool-down splits the second half.

It needs at least as many micro-batches as stages (m >= 2p).
"""

from __future__ import annotations

from pipecc.errors import ScheduleError
from pipecc.ir import Action, ActionKind, Schedule
from pipecc.passes.schedules.v_shape import v_placement

F, B, W, BW = ActionKind.F, ActionKind.B, ActionKind.W, ActionKind.BW


def dualpipev(num_stages: int, num_microbatches: int, num_ranks: int | None = None) -> Schedule:
    """DualPipeV's eight phases on every rank (see _dualpipev_rank).

    >>> from pipecc.printing import format_schedule
    >>> print(format_schedule(dualpipev(num_stages=4, num_microbatches=4)))
    rank 0: 0F0 0F1 0F2 3F0 3B0 3W0 3F1 0F3 3BW1 3F2 0BW0 3BW2 3F3 0BW1 3BW3 0B2 0W2 0B3 0W3
    rank 1: 1F0 2F0 1F1 2F1 1F2 2BW0 2F2 1BW0 1F3 2BW1 2F3 1BW1 2BW2 1BW2 2B3 1B3 2W3 1W3
    """
    p, m = num_stages // 2, num_microbatches
    if m < num_stages:
        raise ScheduleError(f"dualpipev needs at least as many micro-batches as stages: num_microbatches={m}, "
                            f"num_stages={num_stages} ({p} ranks x 2).\n"
                            f"Pass num_microbatches={num_stages} or more, or use schedule=\"zbv\" (any m).")
    return Schedule("dualpipev", num_stages, m, v_placement(p), tuple(_dualpipev_rank(p, r, m) for r in range(p)))


def _dualpipev_rank(p: int, r: int, m: int) -> tuple[Action, ...]:
    first, second = r, 2 * p - 1 - r
    out: list[Action] = []
    next_mb = {(s, k): 0 for s in (first, second) for k in (F, B)}
    pending_w: list[Action] = []

    def forward(stage: int) -> None:
        out.append(Action(stage, F, next_mb[(stage, F)]))
        next_mb[(stage, F)] += 1

    def backward(stage: int, split: bool) -> None:
        mb = next_mb[(stage, B)]
        next_mb[(stage, B)] += 1
        out.append(Action(stage, B if split else BW, mb))
        if split:
            pending_w.append(Action(stage, W, mb))

    def weight() -> None:
        if pending_w:
            out.append(pending_w.pop(0))

    for _ in range(2 * (p - r - 1)):  # 1: forwards of the first stage
        forward(first)
    for _ in range(r + 1):  # 2: both stages' forwards
        forward(first), forward(second)
    for _ in range(p - r - 1):  # 3: B, W, F of the second stage (zero bubble)
        backward(second, split=True), weight(), forward(second)
    for i in range(m - 2 * p + r + 1):  # 4: main: F(first)+BW(second), F(second)+BW(first)
        forward(first), backward(second, split=False)
        forward(second), backward(first, split=False)
    for _ in range(p - r - 1):  # 5: BW(second), then F(second)+BW(first)
        backward(second, split=False)
        forward(second), backward(first, split=False)
    split = False
    for i in range(r + 1):  # 6: backwards of both stages, the second half split into B and W
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        backward(second, split)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        backward(first, split)
    for _ in range(p - r - 1):  # 7: W, then B of the first stage
        weight(), backward(first, split)
    for _ in range(r + 1):  # 8: the remaining Ws
        weight()
    while pending_w:
        weight()
    return tuple(out)
