"""The README's commands, snippets and schedule list are the ones that work."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from pipecc.cli import main, make_parser
from pipecc.passes.schedules import SCHEDULES
from pipecc.run import make_parser as make_run_parser

ROOT = Path(__file__).parent.parent
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
SCHEDULES_BLOCK = re.compile(r"(<!-- schedules:[^\n]*-->\n)(.*?)(<!-- /schedules -->)", flags=re.S)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_python_snippet_runs_and_trains() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert torch.isfinite(namespace["loss"])
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_snippet_trains_like_eager() -> None:
    torch._dynamo.reset()
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[1], "README.md", "exec"), namespace)
    from examples import gpt

    model, (tokens,), loss_fn, target = gpt.build(batch_size=8)
    expected = loss_fn(model(tokens), target)
    torch.testing.assert_close(namespace["loss"].detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    trained = dict(namespace["model"].named_parameters())
    expected.backward()
    for name, param in model.named_parameters():  # one SGD step with lr 0.1 from the same weights
        torch.testing.assert_close(trained[name].detach(), (param - 0.1 * param.grad).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_commands_install_pinned_cpu_torch_and_run_pytest() -> None:
    main_job, tests = _blocks("bash")[:2]
    assert main_job.startswith('pip install torch==2.13.0 && pip install -e ".[plot]" && pipecc report')
    assert tests.strip() == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci and "pytest -q" in ci


def test_main_job_report_command_draws_the_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = next(c for c in _blocks("bash")[0].split("&&") if "pipecc report" in c)
    argv = shlex.split(report)[1:]
    assert argv[argv.index("--plot") + 1] == "gpt.png"
    argv[argv.index("--plot") + 1] = str(tmp_path / "gpt.png")  # not into the checkout
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "imbalance" in out and "rank 3:" in out and "predicted per rank" in out
    assert (tmp_path / "gpt.png").read_bytes().startswith(b"\x89PNG")


def test_cli_block_parses() -> None:
    """Every command of the CLI section names a subcommand and flags that exist."""
    lines = [line for line in _blocks("bash")[2].splitlines() if line.strip()]
    assert len(lines) >= 4
    for line in lines:
        words = shlex.split(line)
        if words[0] == "pipecc":
            make_parser().parse_args(words[1:])
        else:
            assert words[:3] == ["torchrun", "--nproc-per-node", "2"] and words[3:5] == ["-m", "pipecc.run"]
            make_run_parser().parse_args(words[5:])


def _schedule_lines() -> str:
    return "".join(f"- `{kind.name}`: {kind.summary}\n" for kind in SCHEDULES.values())


def test_schedule_list_matches_the_registry() -> None:
    """The README lists every registered schedule, one line each, with its summary from the code.
    PIPECC_ACCEPT=1 rewrites the list from the registry."""
    match = SCHEDULES_BLOCK.search(README)
    assert match, "README.md lost its <!-- schedules --> block"
    if os.environ.get("PIPECC_ACCEPT") == "1":
        README_PATH.write_text(SCHEDULES_BLOCK.sub(lambda m: m.group(1) + _schedule_lines() + m.group(3), README))
        return
    assert match.group(2) == _schedule_lines(), (
        "README.md's schedule list differs from SCHEDULES; rewrite it with "
        "PIPECC_ACCEPT=1 python -m pytest tests/test_readme.py")
