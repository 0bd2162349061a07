"""Property-based tests of the whole compiler on random small DAG models.

Models are chains of random blocks over a (batch, channels, length) tensor: linear, conv, layer /
group / batch norm, activations, residual adds and concatenations reaching back to any earlier
value (long skips that cross stages), and reuse of an earlier linear layer (shared weights, possibly
on two ranks). For every model, stage count, registered schedule and micro-batch count:
- the pipelined step (run_local) equals the unpartitioned one (loss and every gradient, rtol 1e-5);
- the schedule passes the verifier; no stage receives a value from itself or a later stage;
- compiling twice gives byte-identical plan JSON.
One test runs a few generated models over real gloo ranks.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import pipecc
from pipecc.errors import PipeccError
from pipecc.ir import InputKind
from pipecc.passes.codegen import plan_to_json
from pipecc.passes.schedules import SCHEDULES
from pipecc.passes.schedules.verify import check_schedule
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks

KINDS = ("linear", "conv", "layernorm", "groupnorm", "batchnorm", "tanh", "residual", "concat", "shared")
CHANNELS, LENGTH, BATCH = 4, 6, 8
# "auto" searches every schedule (slow, and covered by the schedules' own tests); the rest are generators.
SCHEDULE_NAMES = tuple(name for name in SCHEDULES if name != "auto")
FAST = settings(max_examples=5, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@dataclass(frozen=True)
class Block:
    kind: str
    source: int  # residual / concat: which earlier value (mod the count so far); shared: which linear


class RandomDag(nn.Module):
    """Maps x (B, CHANNELS, LENGTH) through `blocks`, then a linear head to (B, 2)."""

    def __init__(self, blocks: tuple[Block, ...], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = blocks
        self.layers = nn.ModuleList()
        self.linear_layers: list[int] = []  # indices into self.layers of the plain linear layers
        for block in blocks:
            self.layers.append(self._layer(block))
        self.head = nn.Linear(CHANNELS * LENGTH, 2)

    def _layer(self, block: Block) -> nn.Module:
        match block.kind:
            case "linear":
                self.linear_layers.append(len(self.layers))
                return nn.Linear(LENGTH, LENGTH)
            case "conv":
                return nn.Conv1d(CHANNELS, CHANNELS, 3, padding=1)
            case "layernorm":
                return nn.LayerNorm(LENGTH)
            case "groupnorm":
                return nn.GroupNorm(2, CHANNELS)
            case "batchnorm":
                return nn.BatchNorm1d(CHANNELS)
            case "concat":
                return nn.Linear(2 * LENGTH, LENGTH)
            case _:
                return nn.Identity()  # tanh, residual, shared: no parameters of their own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        h = x
        for block, layer in zip(self.blocks, self.layers):
            match block.kind:
                case "tanh":
                    h = torch.tanh(h)
                case "residual":
                    h = h + values[block.source % len(values)]
                case "concat":
                    h = layer(torch.cat([h, values[block.source % len(values)]], dim=-1))
                case "shared":
                    earlier = [i for i in self.linear_layers if self.layers[i] is not layer]
                    h = self.layers[earlier[block.source % len(earlier)]](h) if earlier else h
                case _:
                    h = layer(h)
            values.append(h)
        return self.head(h.flatten(1))


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def make_case(blocks: tuple[Block, ...], seed: int) -> tuple[RandomDag, tuple[torch.Tensor], torch.Tensor]:
    model = RandomDag(blocks, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, CHANNELS, LENGTH, generator=generator)
    return model, (x,), torch.randn(BATCH, 2, generator=generator)


blocks_strategy = st.lists(st.builds(Block, st.sampled_from(KINDS), st.integers(0, 7)), min_size=2, max_size=7)


def compile_or_refuse(model: nn.Module, inputs: tuple[torch.Tensor], target: torch.Tensor, *, num_ranks: int,
                      schedule: str, num_microbatches: int) -> pipecc.Plan | None:
    """The plan, or None when pipecc refuses the configuration by name (too few cuttable boundaries
    for that many stages, or a schedule that needs more micro-batches): refusals must be PipeccErrors
    that say so; anything else fails the test."""
    num_stages = num_ranks * SCHEDULES[schedule].stages_per_rank
    try:
        return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                              num_microbatches=num_microbatches, schedule=schedule)
    except PipeccError as err:
        first = str(err).splitlines()[0]
        if ("stages" in first and ("compute nodes" in first or "boundaries" in first)) or "micro-batch" in first:
            return None
        raise


def check_forward_flow(plan: pipecc.Plan) -> None:
    """Every activation a stage receives was made by an earlier stage (values never go backwards)."""
    made_by = {name: stage.index for stage in plan.stages for name in stage.node_names}
    for stage in plan.stages:
        for spec in stage.inputs:
            if spec.kind is InputKind.ACTIVATION:
                assert made_by[spec.name] < stage.index, f"stage {stage.index} receives {spec.name} " \
                                                         f"from stage {made_by[spec.name]}"


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@FAST
@given(blocks=blocks_strategy, seed=st.integers(0, 2**16), num_ranks=st.integers(1, 4),
       num_microbatches=st.sampled_from((1, 2, 4, 8)))
def test_random_dag_pipelined_step_equals_unpartitioned(schedule: str, blocks: list[Block], seed: int,
                                                        num_ranks: int, num_microbatches: int,
                                                        one_thread: None) -> None:
    model, inputs, target = make_case(tuple(blocks), seed)
    plan = compile_or_refuse(model, inputs, target, num_ranks=num_ranks, schedule=schedule,
                             num_microbatches=num_microbatches)
    event("refused by name" if plan is None else f"ran on {num_ranks} ranks")
    if plan is None:
        return
    check_schedule(plan.schedule)
    check_forward_flow(plan)
    assert_same_step(model, inputs, loss_fn, target, plan)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blocks=blocks_strategy, seed=st.integers(0, 2**16), num_ranks=st.integers(2, 4),
       schedule=st.sampled_from(SCHEDULE_NAMES))
def test_compiling_twice_gives_byte_identical_plan_json(blocks: list[Block], seed: int, num_ranks: int,
                                                        schedule: str, one_thread: None) -> None:
    model, inputs, target = make_case(tuple(blocks), seed)
    plans = [compile_or_refuse(model, inputs, target, num_ranks=num_ranks, schedule=schedule, num_microbatches=4)
             for _ in range(2)]
    if plans[0] is None:
        assert plans[1] is None
        return
    first, second = (json.dumps(plan_to_json(p), sort_keys=True).encode() for p in plans)
    assert first == second


@settings(max_examples=40, deadline=None, derandomize=True)
@given(schedule=st.sampled_from(SCHEDULE_NAMES), num_ranks=st.integers(1, 6), num_microbatches=st.integers(1, 12))
def test_every_generated_schedule_passes_the_verifier(schedule: str, num_ranks: int, num_microbatches: int) -> None:
    kind = SCHEDULES[schedule]
    num_stages = num_ranks * kind.stages_per_rank
    try:
        built = kind.build(num_stages, num_microbatches) if hasattr(kind, "build") \
            else kind.generate(num_stages, num_microbatches)
    except PipeccError as err:  # a schedule may refuse too few micro-batches, by name
        assert "micro-batch" in str(err).splitlines()[0], str(err)
        return
    check_schedule(built)
    assert built.num_stages == num_stages and built.num_microbatches == num_microbatches


# ------------------------------------------------------------------------------ over real gloo ranks

def _generated_cases(count: int) -> list[tuple[tuple[Block, ...], int]]:
    """`count` fixed random models (a seeded generator, so every rank and the parent build the same)."""
    rng = random.Random(6)
    cases = []
    for _ in range(count):
        blocks = tuple(Block(rng.choice(KINDS), rng.randrange(8)) for _ in range(rng.randint(4, 7)))
        cases.append((blocks, rng.randrange(2**16)))
    return cases


GLOO_SCHEDULES = tuple(name for name in ("1f1b", "gpipe", "zb-h1") if name in SCHEDULES)


def _gloo_steps(cases: list[tuple[tuple[Block, ...], int]]) -> list[Any]:
    results = []
    for (blocks, seed), schedule in zip(cases, GLOO_SCHEDULES * len(cases)):
        model, inputs, target = make_case(blocks, seed)
        plan = compile_or_refuse(model, inputs, target, num_ranks=2, schedule=schedule, num_microbatches=4)
        if plan is None:
            results.append(None)
            continue
        results.append(rank_step(plan, inputs, target, timeout_s=60))
    return results


@pytest.mark.dist
def test_generated_models_over_gloo_equal_unpartitioned() -> None:
    cases = _generated_cases(3)
    per_rank = run_ranks(_gloo_steps, 2, cases)
    ran = 0
    for i, (blocks, seed) in enumerate(cases):
        if per_rank[0][i] is None:
            continue
        ran += 1
        model, inputs, target = make_case(blocks, seed)
        expected_loss, expected = reference_step(model, inputs, loss_fn, target, 4)
        torch.testing.assert_close(torch.tensor(per_rank[1][i][0]), expected_loss, rtol=1e-5, atol=1e-6)
        covered: set[str] = set()
        for results in per_rank:
            assert_same_grads(results[i][1], expected)
            covered |= set(results[i][1])
        assert covered == set(expected), f"case {i}: missing gradients {set(expected) - covered}"
    assert ran >= 2, "the generated gloo cases were mostly refused; pick other seeds"
