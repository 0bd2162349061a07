"""The examples in docstrings print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["pipecc.costs", "pipecc.passes.insert_comm", "pipecc.passes.simulate",
           "pipecc.passes.schedules.gpipe", "pipecc.passes.schedules.one_f_one_b"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
