"""Every schedule of the literature gives the unpartitioned model's loss and gradients: 2 and 4
ranks (V and interleaved schedules with 2 stages per rank), m = p, m = 2p and m not a multiple
of p, on the GPT example and on the U-Net example (skip connections across stages), in one
process and over real gloo processes."""

from __future__ import annotations

import importlib

import pytest
import torch

import pipecc
from pipecc.errors import ScheduleError
from pipecc.passes.schedules import SCHEDULES
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks

NEW = ("interleaved-1f1b", "looped-bfs", "zb-h1", "zb-h2", "zbv", "v-half", "v-min", "dualpipev")


def build(name: str, batch_size: int = 8):
    return importlib.import_module(f"examples.{name}").build(batch_size=batch_size, seed=0)


def compile_for(name: str, schedule: str, num_ranks: int, m: int, batch_size: int) -> pipecc.Plan:
    model, inputs, loss_fn, target = build(name, batch_size)
    num_stages = num_ranks * SCHEDULES[schedule].stages_per_rank
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=m, schedule=schedule, num_ranks=num_ranks)


def local_cases(model: str, schedule: str) -> list[tuple[int, int, int]]:
    """(ranks, micro-batches, batch size): m = p, m not a multiple of p, m = 2p, on 2 and 4 ranks
    (dualpipev needs m >= 2p: it runs m = 2p and, on 2 ranks, m = 3p). Over gloo: 2 ranks at m = 2p
    (GPT) and m = p (U-Net), 4 ranks at m = p (GPT and U-Net; dualpipev m = 2p)."""
    if schedule == "dualpipev":
        return [(2, 4, 8), (2, 6, 6), (4, 8, 8)] if model == "gpt" else [(2, 4, 8), (4, 8, 8)]
    if model == "gpt":
        return [(2, 2, 8), (2, 3, 6), (2, 4, 8), (4, 2, 8), (4, 6, 6), (4, 8, 8)]
    return [(2, 4, 8), (4, 4, 8)]


@pytest.mark.parametrize("schedule", NEW)
@pytest.mark.parametrize("model", ["gpt", "unet"])
def test_run_local_equals_unpartitioned(model: str, schedule: str) -> None:
    for num_ranks, m, batch_size in local_cases(model, schedule):
        plan = compile_for(model, schedule, num_ranks, m, batch_size)
        assert plan.num_ranks == num_ranks and len(plan.stages) == num_ranks * SCHEDULES[schedule].stages_per_rank
        assert_same_step(*build(model, batch_size), plan)


def test_dualpipev_refuses_too_few_microbatches() -> None:
    with pytest.raises(ScheduleError, match=r"(?s)dualpipev needs at least as many micro-batches as stages: "
                                            r"num_microbatches=2, num_stages=4.*\(in pass schedule\)"):
        compile_for("gpt", "dualpipev", 2, 2, 8)


def test_auto_picks_the_fastest_schedule_that_fits_and_says_why() -> None:
    model, inputs, loss_fn, target = build("gpt")
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=4, schedule="auto")
    choice = plan.schedule_choice
    assert choice is not None and plan.num_ranks == 2
    built = [c for c in choice.candidates if c.step_time_ms is not None]
    assert {c.name for c in choice.candidates} == set(SCHEDULES) | {"zb-auto"}
    fastest = min(c.step_time_ms for c in built if not c.note)
    assert next(c for c in built if c.name == choice.chosen).step_time_ms == fastest
    assert plan.simulate().step_time_ms == pytest.approx(fastest)
    by_name = {c.name: c for c in built}
    assert fastest <= by_name["1f1b"].step_time_ms and fastest <= by_name["zb-h1"].step_time_ms
    report = plan.report()
    assert f"schedule=auto chose {choice.chosen}: fastest predicted step of the" in report
    assert "<-- chosen" in report and "dualpipev" in report
    assert_same_step(model, inputs, loss_fn, target, plan)

    # under a memory limit below what the fastest needed, auto keeps to the limit and says which schedules did not fit
    limit = int(min(max(c.peak_memory_bytes) for c in built if c.name == choice.chosen)) - 1
    lean = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=4, schedule="auto", max_memory_bytes=limit)
    assert lean.schedule_choice is not None and max(lean.simulate().peak_memory_bytes) <= limit
    assert any(c.note for c in lean.schedule_choice.candidates)


def _dist_steps(cases: list[tuple[str, str, int, int, int]]) -> list[tuple[float | None, dict[str, torch.Tensor]]]:
    """On each rank: compile every case (deterministic, so every rank gets the same plan) and run one step."""
    results = []
    for model, schedule, num_ranks, m, batch_size in cases:
        plan = compile_for(model, schedule, num_ranks, m, batch_size)
        _, inputs, _, target = build(model, batch_size)
        results.append(rank_step(plan, inputs, target))
    return results


def dist_cases(world_size: int) -> list[tuple[str, str, int, int, int]]:
    if world_size == 2:  # both models; m = 2p on GPT, m = p on U-Net (dualpipev: m = 2p)
        return [(model, s, 2, m if s != "dualpipev" else 4, 8) for s in NEW for model, m in (("gpt", 4), ("unet", 2))]
    return [(model, s, 4, 8 if s == "dualpipev" else 4, 8) for s in NEW for model in ("gpt", "unet")]  # m = p


@pytest.mark.dist
@pytest.mark.parametrize("world_size", (2, 4))
def test_gloo_equals_unpartitioned(world_size: int) -> None:
    cases = dist_cases(world_size)
    per_rank = run_ranks(_dist_steps, world_size, cases)
    for i, (model, schedule, num_ranks, m, batch_size) in enumerate(cases):
        expected_loss, expected = reference_step(*build(model, batch_size), m)
        losses = [results[i][0] for results in per_rank]
        loss_rank = SCHEDULES[schedule].build(num_ranks * SCHEDULES[schedule].stages_per_rank, m).stage_to_rank[-1]
        assert [loss is not None for loss in losses] == [r == loss_rank for r in range(world_size)]
        loss = losses[loss_rank]
        torch.testing.assert_close(torch.tensor(loss), expected_loss, rtol=1e-5, atol=1e-6)
        covered: set[str] = set()
        for results in per_rank:
            assert_same_grads(results[i][1], expected)
            covered |= set(results[i][1])
        assert covered == set(expected), f"{model} {schedule} m={m}: parameters missing {set(expected) - covered}"
