"""Renderers of a Timeline: the prediction table, the ASCII timeline, Chrome trace events and the Gantt chart."""

from __future__ import annotations

import doctest
import json
import sys
from pathlib import Path
from textwrap import dedent

import pytest

import pipecc.render
from pipecc.errors import ConfigError, PipeccError
from pipecc.ir import StageCost
from pipecc.passes.schedules.gpipe import gpipe
from pipecc.passes.schedules.one_f_one_b import one_f_one_b
from pipecc.passes.simulate import Timeline, simulate
from pipecc.render import chrome_trace, format_timeline, plot_timeline, write_trace


def _unit_timeline(schedule: str = "gpipe", num_stages: int = 2, num_microbatches: int = 2) -> Timeline:
    """F = 1 ms, B = W = 1 ms (BW = 2 ms), no transfer time."""
    unit = StageCost(1, 0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 0, 0, 0.0)
    sched = {"gpipe": gpipe, "1f1b": one_f_one_b}[schedule](num_stages, num_microbatches)
    return simulate(sched, [unit] * sched.num_stages)


def test_docstring_examples() -> None:
    result = doctest.testmod(pipecc.render)
    assert result.failed == 0 and result.attempted > 0


def test_ascii_timeline_of_gpipe() -> None:
    # rank 0: F0 [0, 1), F1 [1, 2), idle until BW0 [5, 7), BW1 [7, 9); one column per 0.5 ms
    assert format_timeline(_unit_timeline(), width=18) == dedent("""\
        timeline: 9.000 ms, one column = 0.500 ms; F forward, B backward (input), W backward (weight), BW backward, . idle
        rank 0  |F0F1......BW0=BW1=|
        rank 1  |..F0F1BW0=BW1=....|""")


def test_ascii_timeline_places_every_compute_action() -> None:
    timeline = _unit_timeline("1f1b", 4, 8)
    text = format_timeline(timeline, width=200)
    rows = text.splitlines()[1:]
    assert len(rows) == 4
    for rank, row in enumerate(rows):
        assert row.startswith(f"rank {rank}")
        for mb in range(8):
            assert f"F{mb}" in row and f"BW{mb}" in row
    with pytest.raises(ConfigError, match="too narrow"):
        format_timeline(timeline, width=3)


def test_chrome_trace_has_one_track_per_rank() -> None:
    timeline = _unit_timeline("1f1b", 4, 8)
    trace = json.loads(json.dumps(chrome_trace(timeline)))
    tracks = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == {r: f"rank {r}" for r in range(4)}
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 4 * 8 * 2  # F and BW of every micro-batch on every stage
    assert {e["tid"] for e in complete} == set(range(4))
    assert max(e["ts"] + e["dur"] for e in complete) == pytest.approx(timeline.step_time_ms * 1e3)


def test_write_trace(tmp_path: Path) -> None:
    path = write_trace(_unit_timeline(), tmp_path / "t.json")
    assert json.loads(path.read_text())["displayTimeUnit"] == "ms"


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_an_image(tmp_path: Path, suffix: str) -> None:
    path = plot_timeline(_unit_timeline("1f1b", 4, 8), tmp_path / f"gantt{suffix}")
    data = path.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    else:
        text = data.decode()
        assert "<svg" in text and "rank 3" in text and "F forward" in text and "BW backward" in text


def test_plot_rejects_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must end in .png or .svg"):
        plot_timeline(_unit_timeline(), tmp_path / "gantt.pdf")


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(PipeccError, match=r'pip install "pipecc\[plot\]"'):
        plot_timeline(_unit_timeline(), tmp_path / "gantt.png")


def test_ascii_timeline_too_narrow_for_labels_shows_kind_letters() -> None:
    rows = format_timeline(_unit_timeline("1f1b", 4, 8), width=20).splitlines()[1:]
    cells = [row.split("|")[1] for row in rows]
    assert all(len(c) == 20 and set(c) <= set(".FB=-0123456789") for c in cells)
    assert all("F" in c and "B" in c for c in cells)
