"""Golden plans: the report of every example under fixed settings is tests/golden/<name>.txt, and
compiling twice gives the same report and the same plan.json. PIPECC_ACCEPT=1 rewrites the files."""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import pytest

import pipecc

GOLDEN = Path(__file__).parent / "golden"
NUM_STAGES = {"mlp": 2, "gpt": 4, "bert": 2, "resnet": 4, "unet": 4}  # 4 micro-batches, 1f1b


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one intra-op thread."""


def compile_example(name: str) -> pipecc.Plan:
    model, inputs, loss_fn, target = importlib.import_module(f"examples.{name}").build()
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=NUM_STAGES[name],
                          num_microbatches=4, schedule="1f1b")


@functools.cache
def golden_plan(name: str) -> pipecc.Plan:
    return compile_example(name)


@pytest.mark.parametrize("name", list(NUM_STAGES))
def test_report_matches_golden_file(name: str) -> None:
    report = golden_plan(name).report() + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("PIPECC_ACCEPT") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(report)
        return
    assert path.exists(), f"{path} is missing; run with PIPECC_ACCEPT=1 to write it"
    assert report == path.read_text(), f"the {name} plan changed; if that is intended, rerun with PIPECC_ACCEPT=1"


@pytest.mark.parametrize("name", list(NUM_STAGES))
def test_compiling_twice_gives_the_same_plan(name: str, tmp_path: Path) -> None:
    first, second = golden_plan(name), compile_example(name)
    assert second.report() == first.report()
    a, b = first.emit(tmp_path / "a"), second.emit(tmp_path / "b")
    for file in ["plan.json"] + [f"rank_{r}.py" for r in range(first.num_ranks)]:
        assert (a / file).read_bytes() == (b / file).read_bytes(), f"{file} differs between two compiles"
