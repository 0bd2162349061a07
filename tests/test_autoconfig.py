"""Auto-configuration: num_stages="auto" returns the fastest predicted configuration that fits memory,
with every candidate in the report, and the plan it returns still computes the unpartitioned step."""

from __future__ import annotations

import pytest
import torch

import pipecc
from examples import mlp
from pipecc.autoconfig import AutoConfig, autoconfigure, microbatch_counts, rank_counts
from pipecc.cluster import Cluster
from pipecc.errors import ConfigError
from pipecc.ir import Config
from pipecc.passes.schedules import SCHEDULES
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks

SIZES = dict(num_layers=8, hidden=64, in_features=32, out_features=8)


def _model() -> tuple:
    return mlp.build(**SIZES)


def _auto(cluster: Cluster | None = None, num_ranks: int | None = None, max_memory_bytes: int | None = None,
          num_microbatches: int | None = None) -> AutoConfig:
    model, inputs, loss_fn, target = _model()
    config = Config(num_stages=1, num_microbatches=1, max_memory_bytes=max_memory_bytes, num_ranks=num_ranks)
    return autoconfigure(model, inputs, loss_fn, target, config, cluster=cluster, num_microbatches=num_microbatches)


@pytest.fixture(scope="module")
def two_ranks() -> AutoConfig:
    """The whole search for 2 ranks, no memory limit (several tests read it)."""
    return _auto(num_ranks=2)


def test_search_space_covers_ranks_schedules_and_microbatches(two_ranks: AutoConfig) -> None:
    assert rank_counts(None, 4) == [1, 2, 4] and rank_counts(Cluster.uniform(6), None) == [1, 2, 4, 6]
    assert microbatch_counts(12) == [1, 2, 3, 4, 6, 12]
    seen = {(c.num_ranks, c.num_microbatches, c.schedule) for c in two_ranks.candidates}
    one_stage_per_rank = [s for s, kind in SCHEDULES.items() if kind.stages_per_rank == 1 or not kind.fixed_stages_per_rank]
    assert seen == ({(2, m, s) for m in (1, 2, 4, 8) for s in SCHEDULES}
                    | {(1, m, s) for m in (1, 2, 4, 8) for s in one_stage_per_rank})
    per_rank = {(c.schedule, c.num_stages // c.num_ranks) for c in two_ranks.candidates if c.num_ranks == 2}
    assert ("zbv", 2) in per_rank and ("interleaved-1f1b", 2) in per_rank and ("interleaved-1f1b", 4) in per_rank
    assert len({c.label for c in two_ranks.candidates}) == len(two_ranks.candidates)


def test_chosen_is_the_fastest_fitting_candidate_and_no_hand_written_config_is_faster(two_ranks: AutoConfig) -> None:
    result = two_ranks
    fitting = [c for c in result.candidates if c.fits]
    assert result.chosen in fitting
    assert result.chosen.step_time_ms == min(c.step_time_ms for c in fitting)
    assert result.plan.simulate().step_time_ms == pytest.approx(result.chosen.step_time_ms)
    model, inputs, loss_fn, target = _model()
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 2, 4, 8):
            hand = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                                  num_microbatches=m, schedule=schedule)
            assert result.chosen.step_time_ms <= hand.simulate().step_time_ms * (1 + 1e-9)
    print("\n" + result.plan.report().split("schedule:")[0])


def test_compile_auto_reports_every_candidate_and_computes_the_same_step() -> None:
    model, inputs, loss_fn, target = _model()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages="auto",
                          num_microbatches="auto", num_ranks=2)
    report = plan.report()
    assert "fastest predicted step of the" in report and "<-- chosen" in report
    assert "1f1b, 2 ranks x 1, 4 mb" in report and "gpipe, 1 rank x 1, 1 mb" in report
    assert plan.num_ranks <= 2
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_memory_limit_rules_out_configurations_and_the_choice_fits(two_ranks: AutoConfig) -> None:
    peaks = sorted(max(c.peak_memory_bytes) for c in two_ranks.candidates if c.fits)
    limit = peaks[len(peaks) // 2]  # about half the configurations fit
    limited = _auto(num_ranks=2, max_memory_bytes=limit)
    assert max(limited.chosen.peak_memory_bytes) <= limit
    left_out = [c for c in limited.candidates if not c.fits]
    assert left_out and all(c.note for c in left_out)
    print(f"\nlimit {limit} B: {len(left_out)} of {len(limited.candidates)} left out, e.g. "
          f"{left_out[0].label}: {left_out[0].note}")


def test_unequal_ranks_are_searched_with_their_speeds() -> None:
    result = _auto(cluster=Cluster.of([1.0, 0.25]), num_microbatches=4)
    two_rank = [c for c in result.candidates if c.num_ranks == 2 and c.schedule == "1f1b"]
    one_rank = [c for c in result.candidates if c.num_ranks == 1 and c.schedule == "1f1b"]
    assert two_rank[0].step_time_ms is not None and one_rank[0].step_time_ms is not None
    stages = result.plan.stages
    if result.chosen.num_ranks == 2:  # the slow rank, if used, holds less of the model
        work = [sum(s.cost.compute_ms for s in stages if s.rank == r) for r in (0, 1)]
        assert work[1] * 0.25 <= work[0] * 1.0 + 1e-9


def test_auto_needs_ranks_and_says_when_nothing_fits() -> None:
    model, inputs, loss_fn, target = _model()
    with pytest.raises(ConfigError, match=r"needs to know the ranks it may use.*\nPass num_ranks=N, or cluster="):
        pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages="auto", num_microbatches=2)
    with pytest.raises(ConfigError, match=r"none of the \d+ configurations fits.*\nRaise max_memory_bytes"):
        pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages="auto", num_microbatches=2,
                       num_ranks=2, max_memory_bytes=1000)


def _gloo_auto_step() -> tuple[float | None, dict[str, torch.Tensor], int]:
    model, inputs, loss_fn, target = _model()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages="auto",
                          num_microbatches=4, schedule="1f1b", cluster=Cluster.of([1.0, 0.5]))
    return (*rank_step(plan, inputs, target), plan.num_ranks)


@pytest.mark.dist
def test_auto_plan_runs_over_gloo_and_equals_unpartitioned() -> None:
    per_rank = run_ranks(_gloo_auto_step, 2)
    assert per_rank[0][2] == 2, "two ranks beat one for this model at m=4"
    expected_loss, expected = reference_step(*_model(), 4)
    torch.testing.assert_close(torch.tensor(per_rank[-1][0]), expected_loss, rtol=1e-5, atol=1e-6)
    for _, grads, _ in per_rank:
        assert_same_grads(grads, expected)


def test_cli_report_auto_prints_every_candidate(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pipecc.cli import main

    cluster = tmp_path / "cluster.json"  # type: ignore[operator]
    cluster.write_text('{"ranks": [{"speed": 1.0}, {"speed": 0.5}]}')
    assert main(["report", "examples/mlp.py:build", "--auto", "--microbatches", "4", "--schedule", "1f1b",
                 "--cluster", str(cluster)]) == 0
    out = capsys.readouterr().out
    assert "1f1b, 2 ranks x 1, 4 mb" in out and "1f1b, 1 rank x 1, 4 mb" in out and "<-- chosen" in out
    assert "gpipe" not in out.split("schedule:")[0]  # --schedule fixes the schedule
