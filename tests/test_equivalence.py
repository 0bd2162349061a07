"""One pipelined step equals the unpartitioned step: every example, stage count, schedule and
micro-batch count, in one process (run_local) and over real gloo processes."""

from __future__ import annotations

import itertools

import pytest
import torch

import pipecc
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks
from models import MODEL_NAMES, build

SCHEDULES = ("gpipe", "1f1b")
MICROBATCHES = (1, 2, 4, 8)


@pytest.mark.parametrize("num_microbatches", MICROBATCHES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_stages", (2, 4))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_run_local_equals_unpartitioned(name: str, num_stages: int, schedule: str, num_microbatches: int) -> None:
    model, inputs, loss_fn, target = build(name)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=num_microbatches, schedule=schedule)
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_gradients_accumulate_over_steps() -> None:
    """Two steps without zero_grad give twice the gradient, as two loss.backward() calls would."""
    model, inputs, loss_fn, target = build("gpt")
    _, expected = reference_step(model, inputs, loss_fn, target, 4)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=4,
                          num_microbatches=4)
    plan.run_local(*inputs, target=target)
    plan.run_local(*inputs, target=target)
    assert_same_grads({n: p.grad / 2 for n, p in plan.named_parameters()}, expected)


def _two_steps(name: str) -> dict[str, torch.Tensor]:
    model, inputs, loss_fn, target = build(name)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=4)
    runner = plan.runner(timeout_s=120.0)
    runner.step(*inputs, target=target)
    runner.step(*inputs, target=target)
    return {n: p.grad.clone() for n, p in runner.named_parameters()}


@pytest.mark.dist
def test_gloo_gradients_accumulate_over_steps_tied_weights_included() -> None:
    """Over two gloo ranks, two steps without zero_grad give twice the gradient, and GPT's tied
    embedding / head weight, held by both ranks, is the same bitwise on each: each step exchanges
    only its own contribution and adds it to what the weight had."""
    _, expected = reference_step(*build("gpt"), 4)
    per_rank = run_ranks(_two_steps, 2, "gpt")
    tied = set(per_rank[0]) & set(per_rank[1])
    assert tied, "GPT's embedding and head should land on different ranks"
    for name in tied:
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name
    for grads in per_rank:
        assert_same_grads({n: g / 2 for n, g in grads.items()}, expected)


def test_plan_shares_the_models_parameters() -> None:
    model, inputs, loss_fn, target = build("mlp")
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p in plan.named_parameters())


def test_fewer_microbatches_than_stages() -> None:
    model, inputs, loss_fn, target = build("resnet")
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=4,
                          num_microbatches=2, schedule="1f1b")
    assert_same_step(model, inputs, loss_fn, target, plan)


def _configs(num_stages: int) -> list[tuple[str, int, str, int]]:
    return [(name, num_stages, schedule, m)
            for name, schedule, m in itertools.product(MODEL_NAMES, SCHEDULES, MICROBATCHES)]


def _dist_steps(configs: list[tuple[str, int, str, int]]) -> list[tuple[float | None, dict[str, torch.Tensor]]]:
    """On each rank: compile every config (deterministic, so every rank gets the same plan) and run one step."""
    results = []
    for name, num_stages, schedule, m in configs:
        model, inputs, loss_fn, target = build(name)
        plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                              num_microbatches=m, schedule=schedule)
        results.append(rank_step(plan, inputs, target))
    return results


@pytest.mark.dist
@pytest.mark.parametrize("world_size", (2, 4))
def test_gloo_equals_unpartitioned(world_size: int) -> None:
    configs = _configs(world_size)
    per_rank = run_ranks(_dist_steps, world_size, configs)
    references = {(name, m): reference_step(*build(name), m) for name, m in itertools.product(MODEL_NAMES, MICROBATCHES)}
    for i, (name, num_stages, schedule, m) in enumerate(configs):
        expected_loss, expected = references[(name, m)]
        losses = [results[i][0] for results in per_rank]
        assert losses[:-1] == [None] * (world_size - 1), "only the last rank returns the loss"
        torch.testing.assert_close(torch.tensor(losses[-1]), expected_loss, rtol=1e-5, atol=1e-6)
        covered: set[str] = set()
        for results in per_rank:
            grads = results[i][1]
            assert_same_grads(grads, expected)  # a tied weight held by two ranks is complete on both
            covered |= set(grads)
        assert covered == set(expected), f"{name} {schedule} m={m}: parameters missing {set(expected) - covered}"
