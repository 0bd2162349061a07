"""The one text form of schedules, partitions and plans: for reports, errors and golden tests."""

from __future__ import annotations

from typing import Sequence

from pipecc.ir import Schedule, ScheduleChoice, Stage


def format_schedule(schedule: Schedule) -> str:
    """One line per rank: its actions in order, printed `{stage}{kind}{microbatch}`."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in actions)
                     for r, actions in enumerate(schedule.rank_actions))


def format_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def format_count(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{int(count)}"


def imbalance(stages: Sequence[Stage]) -> float:
    """max / mean of the stage times the partitioner balances (1.0 is perfect)."""
    times = [s.cost.time_ms for s in stages]
    mean = sum(times) / len(times)
    return max(times) / mean if mean > 0 else 1.0


def format_stage_table(stages: Sequence[Stage]) -> str:
    """Per stage: rank, node range, size, work, estimated F/B/W times, traffic and memory."""
    header = ("stage", "rank", "first node", "last node", "nodes", "params", "FLOPs", "F ms", "B ms", "W ms",
              "comm ms", "time ms", "to next", "memory")
    rows = [header]
    for s in stages:
        c = s.cost
        rows.append((str(s.index), str(s.rank), s.node_names[0], s.node_names[-1], str(c.num_nodes),
                     format_count(c.num_params), format_count(c.flops), f"{c.forward_ms:.3f}",
                     f"{c.backward_input_ms:.3f}", f"{c.backward_weight_ms:.3f}", f"{c.comm_ms:.3f}",
                     f"{c.time_ms:.3f}", format_bytes(c.bytes_to_next), format_bytes(c.memory_bytes)))
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_schedule_choice(choice: ScheduleChoice) -> str:
    """schedule="auto"'s candidates: predicted step time, bubble and peak memory, and the choice."""
    rows = [("schedule", "stages", "step ms", "bubble", "peak memory (max rank)", "")]
    for c in choice.candidates:
        if c.step_time_ms is None or c.bubble_ratio is None:
            rows.append((c.name, str(c.num_stages), "-", "-", "-", c.note))
            continue
        mark = "<-- chosen" if c.name == choice.chosen else c.note
        rows.append((c.name, str(c.num_stages), f"{c.step_time_ms:.3f}", f"{100 * c.bubble_ratio:.1f}%",
                     format_bytes(max(c.peak_memory_bytes)), mark))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             + ("  " + r[5] if r[5] else "") for r in rows]
    return "\n".join([f"schedule=auto chose {choice.chosen}: {choice.reason}", *lines])

