"""Pictures of a Timeline: a per-rank prediction table, an ASCII timeline, a Gantt chart
(matplotlib, PNG or SVG) and Chrome / Perfetto trace events.

Each renderer takes a `Timeline` (pipecc.passes.simulate), so a measured timeline can be
drawn the same way as the predicted one. Only compute actions (F, B, W, BW) are drawn; the
gaps between them are the bubble (waiting for a neighbour's message, or nothing to do).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipecc.errors import ConfigError, PipeccError
from pipecc.ir import ActionKind
from pipecc.passes.simulate import TimedAction, Timeline
from pipecc.printing import format_bytes

# Colours of the compute kinds, shared by the Gantt chart and the legend (colour-blind safe: Okabe-Ito).
KIND_COLOURS = {ActionKind.F: "#0072B2", ActionKind.B: "#E69F00", ActionKind.W: "#009E73", ActionKind.BW: "#D55E00"}
KIND_NAMES = {ActionKind.F: "F forward", ActionKind.B: "B backward (input grads)",
              ActionKind.W: "W backward (weight grads)", ActionKind.BW: "BW backward (input + weight)"}
# ASCII fill after the label, so a long action reads as one block: F0------ BW0=======
_FILL = {ActionKind.F: "-", ActionKind.B: "=", ActionKind.W: "~", ActionKind.BW: "="}


def compute_events(timeline: Timeline) -> list[TimedAction]:
    """The F/B/W/BW events of `timeline`, in rank then time order."""
    return sorted((e for e in timeline.events if e.action.kind.is_compute), key=lambda e: (e.rank, e.start_ms))


def _num_ranks(timeline: Timeline) -> int:
    return len(timeline.busy_ms)


def _stages_per_rank(timeline: Timeline) -> dict[int, set[int]]:
    stages: dict[int, set[int]] = {r: set() for r in range(_num_ranks(timeline))}
    for e in timeline.events:
        stages[e.rank].add(e.action.stage)
    return stages


def _label(event: TimedAction, several_stages: bool) -> str:
    """`F3` for micro-batch 3's forward; `2F3` (stage first) where the rank holds several stages."""
    a = event.action
    return f"{a.stage if several_stages else ''}{a.kind.value}{a.microbatch}"


def format_prediction(timeline: Timeline) -> str:
    """Per rank: compute time, idle time, idle share and peak memory of one step.

    >>> print(format_prediction(Timeline((), 10.0, (8.0, 6.0), (2**20, 2**21))))
    rank  busy ms  idle ms  idle  peak memory
       0    8.000    2.000   20%      1.0 MiB
       1    6.000    4.000   40%      2.0 MiB
    """
    lines = ["rank  busy ms  idle ms  idle  peak memory"]
    for rank, (busy, idle, peak) in enumerate(zip(timeline.busy_ms, timeline.idle_ms, timeline.peak_memory_bytes)):
        share = idle / timeline.step_time_ms if timeline.step_time_ms else 0.0
        lines.append(f"{rank:>4}  {busy:>7.3f}  {idle:>7.3f}  {100 * share:>3.0f}%  {format_bytes(peak):>11}")
    return "\n".join(lines)


def format_timeline(timeline: Timeline, *, width: int = 100) -> str:
    """The step as one text row per rank, `width` columns for the whole step time.

    Each compute action is its label (`F3`, `BW0`; `2F3` with several stages on a rank) filled
    to its length with `-` (F), `=` (B, BW) or `~` (W); `.` is idle. An action too short for its
    label shows its kind letter (F, B or W) only; a larger `width` shows more labels.
    """
    if width < 10:
        raise ConfigError(f"timeline width {width} is too narrow.\nUse at least 10 columns.")
    step = timeline.step_time_ms or 1.0
    ms_per_col = step / width
    stages = _stages_per_rank(timeline)
    rows = []
    for rank in range(_num_ranks(timeline)):
        cells = ["."] * width
        for event in (e for e in compute_events(timeline) if e.rank == rank):
            first = min(width - 1, round(event.start_ms / ms_per_col))
            last = max(first + 1, min(width, round(event.end_ms / ms_per_col)))
            text = _label(event, len(stages[rank]) > 1)
            if len(text) > last - first:  # too short for its label: its kind letter only
                text = event.action.kind.value[0]
            text = (text + _FILL[event.action.kind] * (last - first))[: last - first]
            cells[first:last] = list(text)
        rows.append(f"rank {rank:<3}|{''.join(cells)}|")
    header = (f"timeline: {step:.3f} ms, one column = {ms_per_col:.3f} ms; "
              "F forward, B backward (input), W backward (weight), BW backward, . idle")
    return "\n".join([header, *rows])


def chrome_trace(timeline: Timeline, *, name: str = "pipecc predicted step") -> dict[str, object]:
    """Chrome / Perfetto trace events (JSON object form): one track (thread) per rank,
    one complete event per compute action, times in microseconds.

    Load the written file in chrome://tracing or ui.perfetto.dev.
    """
    events: list[dict[str, object]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": name}}]
    for rank in range(_num_ranks(timeline)):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for e in compute_events(timeline):
        events.append({
            "name": str(e.action), "cat": e.action.kind.value, "ph": "X", "pid": 0, "tid": e.rank,
            "ts": round(e.start_ms * 1e3, 3), "dur": round((e.end_ms - e.start_ms) * 1e3, 3),
            "args": {"stage": e.action.stage, "microbatch": e.action.microbatch, "kind": KIND_NAMES[e.action.kind]},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"step_time_ms": timeline.step_time_ms, "bubble_ratio": timeline.bubble_ratio}}


def write_trace(timeline: Timeline, path: str | Path) -> Path:
    """Write `chrome_trace(timeline)` to `path` as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timeline), indent=1) + "\n", encoding="utf-8")
    return path


PLOT_FORMATS = (".png", ".svg")


def plot_timeline(timeline: Timeline, path: str | Path, *, title: str = "pipecc predicted step") -> Path:
    """Draw the per-rank Gantt chart of `timeline` into `path` (.png or .svg); returns the path.

    One row per rank (rank 0 on top), one bar per compute action coloured by kind, the
    micro-batch number on bars wide enough to hold it, and a legend of the kinds drawn.
    Needs matplotlib (`pip install "pipecc[plot]"`).
    """
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"cannot draw a plot into {str(path)!r}: the file name must end in .png or .svg.\n"
                          "Pass --plot timeline.png or --plot timeline.svg.")
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        from matplotlib.patches import Patch
    except ImportError:
        raise PipeccError("drawing a plot needs matplotlib, which is not installed.\n"
                          'Install it with: pip install "pipecc[plot]" (or pip install matplotlib).') from None
    num_ranks = _num_ranks(timeline)
    events = compute_events(timeline)
    stages = _stages_per_rank(timeline)
    step = timeline.step_time_ms or 1.0
    figure = Figure(figsize=(12, 1.2 + 0.6 * num_ranks), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    renderer_width_px = 12 * 120 * 0.85  # the axes' approximate width, to decide which labels fit
    for e in events:
        y = num_ranks - 1 - e.rank
        axes.barh(y, e.end_ms - e.start_ms, left=e.start_ms, height=0.8, color=KIND_COLOURS[e.action.kind],
                  edgecolor="white", linewidth=0.5)
        several = len(stages[e.rank]) > 1
        label = f"{e.action.stage}:{e.action.microbatch}" if several else str(e.action.microbatch)
        bar_px = (e.end_ms - e.start_ms) / step * renderer_width_px
        if bar_px >= 7 * len(label):
            axes.text((e.start_ms + e.end_ms) / 2, y, label, ha="center", va="center", fontsize=8, color="white")
    axes.set_yticks(range(num_ranks), [f"rank {r}" for r in reversed(range(num_ranks))])
    axes.set_xlim(0, step)
    axes.set_ylim(-0.6, num_ranks - 0.4)
    axes.set_xlabel("time (ms)")
    kinds = [k for k in KIND_COLOURS if any(e.action.kind is k for e in events)]
    figure.legend(handles=[Patch(color=KIND_COLOURS[k], label=KIND_NAMES[k]) for k in kinds],
                  loc="outside lower center", ncol=len(kinds), frameon=False, fontsize=9)
    several = any(len(s) > 1 for s in stages.values())
    axes.set_title(f"{title}: {timeline.step_time_ms:.3f} ms, bubble {100 * timeline.bubble_ratio:.1f}% "
                   f"(numbers on bars: {'stage:micro-batch' if several else 'micro-batch'})", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path)
    return path
