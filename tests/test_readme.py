"""The README's commands and first Python snippet are the ones that work."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from pipecc.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_python_snippet_runs_and_trains() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert torch.isfinite(namespace["loss"])
    assert all(p.grad is not None for p in model.parameters())


def test_commands_install_pinned_cpu_torch_and_run_pytest() -> None:
    main_job, tests = _blocks("bash")[:2]
    assert main_job.startswith("pip install torch==2.13.0") and "pipecc report" in main_job
    assert tests.strip() == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci and "pytest -q" in ci


def test_main_job_report_command(capsys: pytest.CaptureFixture[str]) -> None:
    report = next(c for c in _blocks("bash")[0].split("&&") if "pipecc report" in c)
    assert main(shlex.split(report)[1:]) == 0
    out = capsys.readouterr().out
    assert "imbalance" in out and "rank 3:" in out
