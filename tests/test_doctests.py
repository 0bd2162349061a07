"""The examples in docstrings print what they say: every pipecc module that has one is run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import pipecc
import pipecc.passes


def _modules_with_examples() -> list[str]:
    """pipecc.passes lives in passes/ (package-dir), so it is walked on its own path."""
    found = []
    infos = [*pkgutil.walk_packages(pipecc.__path__, "pipecc."),
             *pkgutil.walk_packages(pipecc.passes.__path__, "pipecc.passes.")]
    for info in infos:
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and ">>>" in Path(spec.origin).read_text():
            found.append(info.name)
    return sorted(found)


MODULES = _modules_with_examples()


def test_the_passes_are_found() -> None:
    assert {"pipecc.passes.simulate", "pipecc.passes.split_backward", "pipecc.passes.schedules.v_shape"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
