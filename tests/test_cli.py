"""The pipecc command: report (with pictures), emit, run, python -m pipecc.run under torchrun,
--help, and one clear line plus a hint for bad usage (exit code 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipecc
from examples import mlp
from pipecc.cli import main, parse_bytes
from pipecc.passes.schedules import SCHEDULES
from pipecc.testing import reference_step

REPO = Path(__file__).parent.parent


def test_report_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "examples/mlp.py:build", "--stages", "2", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 stages on 2 ranks" in out and "rank 1: 1F0" in out
    assert "predicted per rank:\nrank  busy ms  idle ms  idle  peak memory\n   0 " in out
    rows = re.findall(r"^rank (\d) +\|(.{100})\|$", out, flags=re.M)  # the ASCII timeline, 100 columns
    assert [r for r, _ in rows] == ["0", "1"] and all("F1" in row and "BW1" in row for _, row in rows)


def test_report_pictures_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, svg, trace = tmp_path / "gpt.png", tmp_path / "gpt.svg", tmp_path / "trace.json"
    argv = ["report", "examples/gpt.py:build", "--stages", "4", "--microbatches", "8", "--schedule", "1f1b"]
    assert main([*argv, "--plot", str(png), "--trace", str(trace)]) == 0
    assert main([*argv, "--plot", str(svg)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk
    assert width >= 1000 and 300 <= height <= 2000
    text = svg.read_text()
    assert all(f"rank {r}" in text for r in range(4)) and "F forward" in text and "BW backward" in text
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} == {f"rank {r}" for r in range(4)}
    assert {e["tid"] for e in events if e["ph"] == "X"} == {0, 1, 2, 3}


def test_report_json_has_the_plan_and_the_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "examples/mlp.py:build", "--stages", "2", "--microbatches", "2", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "pipecc-plan" and len(report["stages"]) == 2
    prediction = report["prediction"]
    assert prediction["step_time_ms"] > 0 and len(prediction["peak_memory_bytes"]) == 2


def test_report_module_path_and_gpipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "examples.resnet:build", "--stages", "4", "--schedule", "gpipe"]) == 0
    assert "schedule gpipe" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["report", "examples/missing.py:build"], "does not exist"),
    (["report", "examples/mlp.py"], "not of the form"),
    (["report", "examples/mlp.py:nothing"], "has no callable 'nothing'"),
    (["report", "examples/mlp.py:build", "--schedule", "zigzag"], "unknown schedule 'zigzag'"),
    (["report", "examples/mlp.py:build", "--microbatches", "3"], "does not divide"),
    (["report", "examples/mlp.py:build", "--memory-limit", "lots"], "cannot read memory size"),
    (["report", "examples/mlp.py:build", "--plot", "out.pdf"], "must end in .png or .svg"),
    (["report", "examples/mlp.py:build", "--width", "2"], "too narrow"),
    (["emit", "examples/mlp.py:build", "--microbatches", "3", "-o", "unused_dir"], "does not divide"),
    (["calibrate", "examples/nope.py:build", "-o", "unused.json"], "does not exist"),
])
def test_bad_usage_is_one_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipecc: error:") and message in err.splitlines()[0]
    assert 2 <= len(err.strip().splitlines()) <= 3  # the error, then how to fix it


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["report"], ["emit", "examples/mlp.py:build"],
                                  ["calibrate", "examples/mlp.py:build"],
                                  ["report", "examples/mlp.py:build", "--stages", "two"]])
def test_malformed_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_plot_without_matplotlib_exits_1_with_the_install_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", "examples/mlp.py:build", "--plot", str(tmp_path / "x.png")]) == 1
    assert 'pip install "pipecc[plot]"' in capsys.readouterr().err


@pytest.mark.parametrize("command, options", [
    ("report", ["--stages", "--microbatches", "--schedule", "--device", "--memory-limit", "--format", "--plot",
                "--trace", "--width"]),
    ("emit", ["--stages", "--microbatches", "--schedule", "--device", "--memory-limit", "--output"]),
    ("run", ["--ranks", "--microbatches", "--schedule", "--steps", "--lr"]),
])
def test_help_is_complete(command: str, options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in options)
    if command != "run":
        assert all(name in " ".join(out.split()) for name in SCHEDULES)  # every registered schedule is listed


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in ("report", "emit", "run"))


def test_emit_writes_a_loadable_plan_and_its_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "plan"
    assert main(["emit", "examples/mlp.py:build", "--stages", "2", "--microbatches", "2", "-o", str(out_dir)]) == 0
    assert "torchrun --nproc-per-node 2 -m pipecc.run" in capsys.readouterr().out
    assert {"plan.json", "rank_0.py", "rank_1.py", "rank_0.pt", "rank_1.pt", "batch.pt"} <= {
        p.name for p in out_dir.iterdir()}
    plan = pipecc.load(out_dir)
    from pipecc.run import load_batch

    inputs, target = load_batch(out_dir / "batch.pt")
    expected_loss, _ = reference_step(*mlp.build(), 2)
    assert float(plan.run_local(*inputs, target=target)) == pytest.approx(float(expected_loss), rel=1e-5)


def _emit_mlp(directory: Path) -> None:
    assert main(["emit", "examples/mlp.py:build", "--stages", "2", "--microbatches", "2", "-o", str(directory)]) == 0


def test_pipecc_run_module_in_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipecc.run import main as run_main

    _emit_mlp(tmp_path / "plan")
    assert run_main([str(tmp_path / "plan"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "one process (no torchrun)" in out and "step 2/2" in out and "predicted" in out
    assert run_main([str(tmp_path / "plan"), "--steps", "1", "--data", "random"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no plan at"),
    (["{plan}", "--data", "{missing}/batch.pt"], "does not exist"),
    (["{plan}", "--steps", "0"], "at least 1"),
])
def test_pipecc_run_bad_usage(argv: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from pipecc.run import main as run_main

    _emit_mlp(tmp_path / "plan")
    capsys.readouterr()
    filled = [a.format(missing=tmp_path / "missing", plan=tmp_path / "plan") for a in argv]
    assert run_main(filled) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipecc.run: error:") and message in err.lower()


@pytest.mark.dist
def test_torchrun_runs_an_emitted_two_rank_plan(tmp_path: Path) -> None:
    """torchrun -m pipecc.run: each process loads its own rank; the losses are the unpartitioned model's."""
    _emit_mlp(tmp_path / "plan")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pipecc.run", str(tmp_path / "plan"), "--steps", "3", "--lr", "0.1",
                           "--timeout", "120"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d/3  loss ([0-9.]+)", done.stdout, flags=re.M)]
    assert len(losses) == 3 and "on 2 torchrun ranks" in done.stdout and "predicted" in done.stdout
    expected_loss, _ = reference_step(*mlp.build(), 2)
    assert losses[0] == pytest.approx(float(expected_loss), abs=2e-6)  # printed with 6 decimals
    assert losses[2] < losses[0]  # it trains


def test_parse_bytes() -> None:
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1e9") == 10**9


@pytest.mark.dist
def test_run_trains_on_two_gloo_ranks(capfd: pytest.CaptureFixture[str]) -> None:
    """zbv: 2 ranks hold 4 stages in a V (the last stage, which logs, is on rank 0)."""
    assert main(["run", "examples/mlp.py:build", "--ranks", "2", "--microbatches", "4", "--steps", "3",
                 "--schedule", "zbv"]) == 0
    out = capfd.readouterr().out  # capfd: the progress lines come from the spawned ranks
    assert "4 stages on 2 ranks, schedule zbv" in out
    assert re.search(r"^step 3/3  loss [0-9.]+  [0-9.]+ ms$", out, flags=re.M)  # a progress line per step
    assert re.search(r"median step time [0-9.]+ ms .* predicted [0-9.]+ ms .* \(measured/predicted [0-9.]+\)", out)
