"""The pipecc command: report, run, and one clear line for bad usage (exit code 2)."""

from __future__ import annotations

import pytest

from pipecc.cli import main, parse_bytes


def test_report_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "examples/mlp.py:build", "--stages", "2", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 stages on 2 ranks" in out and "rank 1: 1F0" in out


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
])
def test_bad_usage_is_one_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipecc: error:") and message in err


def test_parse_bytes() -> None:
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1e9") == 10**9


@pytest.mark.dist
def test_run_trains_on_two_gloo_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "examples/mlp.py:build", "--ranks", "2", "--microbatches", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "median step time" in out
