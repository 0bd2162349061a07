"""Local gloo launches: results come back by rank; a failing rank fails the launch fast, by name."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from pipecc.errors import PipelineRuntimeError
from pipecc.runtime.launch import spawn_local


def _rank_and_sum() -> tuple[int, float]:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), float(value)


def _rank_one_fails_while_rank_zero_waits() -> None:
    if dist.get_rank() == 1:
        raise ValueError("stage 1 broke")
    dist.recv(torch.empty(1), src=1)  # would wait for the default gloo timeout (30 min)


@pytest.mark.dist
def test_results_by_rank() -> None:
    assert spawn_local(_rank_and_sum, 2) == [(0, 3.0), (1, 3.0)]


@pytest.mark.dist
def test_failing_rank_stops_the_others() -> None:
    start = time.perf_counter()
    with pytest.raises(PipelineRuntimeError, match="rank 1 failed: ValueError: stage 1 broke"):
        spawn_local(_rank_one_fails_while_rank_zero_waits, 2)
    assert time.perf_counter() - start < 60  # not the 30-minute gloo timeout
