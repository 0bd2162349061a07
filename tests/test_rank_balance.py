"""Rank balance: with several stages per rank, the cuts never get worse by the largest rank sum than the
DP's, stay within memory, match brute force on small cases, and make the GPT example's zbv step faster."""

from __future__ import annotations

import itertools
import random
from typing import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipecc
from examples import gpt
from pipecc.cluster import Cluster, RankSpec
from pipecc.costs import CostTable
from pipecc.errors import PartitionError
from pipecc.ir import Captured
from pipecc.passes import rank_balance
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.partition import (STAGE_SLACKS, CutValue, PartitionProblem, partition, partition_candidates,
                                    place_stages, rank_memory_limits, solve)
from pipecc.passes.rank_balance import RankBalance, balance_ranks, balance_ranks_coarsened
from tests.test_coarsen import _random_chain
from tests.test_partition import CPU, INF, Case, cases

V_AND_LOOPS = {  # the placements of zbv / v-half / v-min / dualpipev and of interleaved-1f1b
    2: [(0, 0)],
    3: [(0, 1, 0), (0, 1, 1)],
    4: [(0, 1, 1, 0), (0, 1, 0, 1)],
    5: [(0, 1, 2, 0, 1), (0, 1, 1, 0, 0)],
    6: [(0, 1, 2, 2, 1, 0), (0, 1, 2, 0, 1, 2), (0, 1, 0, 1, 0, 1)],
}


def rank_key(problem: PartitionProblem, cuts: Sequence[int], stage_to_rank: Sequence[int], cluster: Cluster | None,
             in_flight: Sequence[int], limit: int | None) -> tuple[float, float]:
    """(largest rank sum, slowest stage) from the scalar reference methods; INF when a rank's memory is over."""
    places = place_stages(CPU, len(stage_to_rank), stage_to_rank, cluster)
    bounds = [0, *cuts, problem.num_nodes]
    stages = list(enumerate(zip(bounds, bounds[1:])))
    per_rank_ms = [0.0] * (max(stage_to_rank) + 1)
    per_rank_bytes = [0] * len(per_rank_ms)
    for s, (i, j) in stages:
        per_rank_ms[stage_to_rank[s]] += problem.stage_cost_ms(i, j, places[s])
        per_rank_bytes[stage_to_rank[s]] += problem.stage_memory_bytes(i, j, in_flight[s])
    limits = rank_memory_limits(places, cluster, limit)
    if any(x is not None and used > x for used, x in zip(per_rank_bytes, limits)):
        return INF, INF
    return max(per_rank_ms), max(problem.stage_cost_ms(i, j, places[s]) for s, (i, j) in stages)


def brute_force(problem: PartitionProblem, stage_to_rank: Sequence[int], cluster: Cluster | None,
                in_flight: Sequence[int], limit: int | None, max_stage_ms: float = INF) -> tuple[float, float]:
    """The best (largest rank sum, slowest stage) over every way to cut the problem with no stage
    slower than `max_stage_ms`."""
    keys = (rank_key(problem, inner, stage_to_rank, cluster, in_flight, limit)
            for inner in itertools.combinations(range(1, problem.num_nodes), len(stage_to_rank) - 1))
    return min((key for key in keys if key[1] <= max_stage_ms), default=(INF, INF))


def _solve_and_balance(case: Case, stage_to_rank: Sequence[int], cluster: Cluster | None,
                       stage_slack: float) -> tuple[list[int], RankBalance] | None:
    options = dict(max_memory_bytes=case.max_memory_bytes, in_flight=case.in_flight, stage_to_rank=stage_to_rank,
                   cluster=cluster)
    try:
        cuts, _ = solve(case.problem, len(stage_to_rank), **options)
    except PartitionError:
        return None
    return cuts, balance_ranks(case.problem, cuts, **options, stage_slack=stage_slack)


@st.composite
def placed_cases(draw: st.DrawFn) -> tuple[Case, tuple[int, ...], Cluster | None]:
    """A partition case with at least two stages, a V or looped placement, and ranks of equal or unequal speed."""
    case = draw(cases().filter(lambda c: c.num_stages >= 2))
    stage_to_rank = draw(st.sampled_from(V_AND_LOOPS[case.num_stages]))
    cluster = None
    if draw(st.booleans()):
        cluster = Cluster(tuple(RankSpec(speed=draw(st.sampled_from([0.5, 1.0, 2.0])))
                                for _ in range(max(stage_to_rank) + 1)))
    return case, stage_to_rank, cluster


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(placed_cases(), st.sampled_from(STAGE_SLACKS))
def test_balanced_cuts_are_never_worse_than_the_dp_and_fit_memory(placed: tuple[Case, tuple[int, ...], Cluster | None],
                                                                   stage_slack: float) -> None:
    case, stage_to_rank, cluster = placed
    solved = _solve_and_balance(case, stage_to_rank, cluster, stage_slack)
    if solved is None:
        return
    dp_cuts, balanced = solved
    in_flight = [case.in_flight(s) for s in range(case.num_stages)]
    before = rank_key(case.problem, dp_cuts, stage_to_rank, cluster, in_flight, case.max_memory_bytes)
    after = rank_key(case.problem, balanced.cuts, stage_to_rank, cluster, in_flight, case.max_memory_bytes)
    bounds = [0, *balanced.cuts, case.problem.num_nodes]
    assert all(a < b for a, b in zip(bounds, bounds[1:])), "every stage keeps a node"
    assert after[0] < INF, "within every rank's memory limit, at boundaries that can be cut"
    assert after[0] <= before[0] * (1 + 1e-12)
    assert stage_slack == INF or after[1] <= before[1] * (1 + stage_slack) * (1 + 1e-12)
    assert (balanced.max_rank_ms, balanced.bottleneck_ms) == pytest.approx(after, rel=1e-9, abs=1e-12)


def _small_chain(seed: int) -> tuple[PartitionProblem, tuple[int, ...]]:
    """6 to 9 nodes of 1..5 ms, a value of 0..64 KiB crossing each boundary, and a V or looped placement of 4 stages."""
    rng = random.Random(seed)
    n = rng.randint(6, 9)
    values = tuple(CutValue(i, i + 1, rng.randint(0, 16) * 4096, 4096) for i in range(n))
    problem = PartitionProblem(tuple(f"n{i}" for i in range(n)), tuple(float(rng.randint(1, 5)) for _ in range(n)),
                               (0,) * n, ((),) * n, {}, values, CPU)
    return problem, V_AND_LOOPS[4][seed % 2]


# Of seeds 0..99, these are where the search reaches the brute-force optimum (91 of 100, checked with
# test_how_close_the_search_comes_to_brute_force); the other 9 stop at a local optimum that only a joint
# move of three cuts leaves, 6.6% above it on average.
MATCHING_SEEDS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 25, 28, 29, 30, 31,
                  32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 51, 52, 54, 55, 56, 57, 58, 59,
                  60, 61, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87,
                  88, 89, 90, 91, 92, 94, 95, 96, 97, 98, 99]


@pytest.mark.parametrize("seed", MATCHING_SEEDS)
def test_search_equals_brute_force_on_small_chains(seed: int) -> None:
    problem, stage_to_rank = _small_chain(seed)
    dp_cuts, dp_bottleneck = solve(problem, 4, stage_to_rank=stage_to_rank)
    balanced = balance_ranks(problem, dp_cuts, stage_to_rank=stage_to_rank)
    expected = brute_force(problem, stage_to_rank, None, [1] * 4, None, dp_bottleneck * (1 + STAGE_SLACKS[0]))
    assert (balanced.max_rank_ms, balanced.bottleneck_ms) == pytest.approx(expected, rel=1e-12)


def test_how_close_the_search_comes_to_brute_force() -> None:
    """Over 100 small chains: never worse than the DP, no stage over the bound; prints how often and how far
    it misses brute force (over partitions within the same bound on the slowest stage)."""
    matching, gaps = [], []
    for seed in range(100):
        problem, stage_to_rank = _small_chain(seed)
        dp_cuts, dp_bottleneck = solve(problem, 4, stage_to_rank=stage_to_rank)
        balanced = balance_ranks(problem, dp_cuts, stage_to_rank=stage_to_rank)
        dp = rank_key(problem, dp_cuts, stage_to_rank, None, [1] * 4, None)
        best = brute_force(problem, stage_to_rank, None, [1] * 4, None, dp_bottleneck * (1 + STAGE_SLACKS[0]))
        assert balanced.bottleneck_ms <= dp_bottleneck * (1 + STAGE_SLACKS[0])
        assert best[0] <= balanced.max_rank_ms * (1 + 1e-12) <= dp[0] * (1 + 1e-12)
        if (balanced.max_rank_ms, balanced.bottleneck_ms) == pytest.approx(best, rel=1e-12):
            matching.append(seed)
        else:
            gaps.append(balanced.max_rank_ms / best[0] - 1)
    print(f"search = brute force on {len(matching)} of 100; mean gap elsewhere {sum(gaps) / max(1, len(gaps)):.1%}: "
          f"{matching}")
    assert set(MATCHING_SEEDS) <= set(matching)


@pytest.mark.parametrize("stage_to_rank", [(0, 1, 2, 3, 3, 2, 1, 0), (0, 1, 2, 3, 0, 1, 2, 3)])
def test_coarsened_search_on_a_long_chain_is_never_worse_than_the_dp(stage_to_rank: tuple[int, ...]) -> None:
    problem = _random_chain(3000, seed=1)
    options = dict(stage_to_rank=stage_to_rank, max_memory_bytes=None)
    dp_cuts, _ = solve(problem, len(stage_to_rank), **options)
    balanced = balance_ranks_coarsened(problem, dp_cuts, **options, max_dp_nodes=256)
    ones = [1] * len(stage_to_rank)
    assert rank_key(problem, balanced.cuts, stage_to_rank, None, ones, None) == pytest.approx(
        (balanced.max_rank_ms, balanced.bottleneck_ms), rel=1e-9)
    assert balanced.max_rank_ms < rank_key(problem, dp_cuts, stage_to_rank, None, ones, None)[0]


def _gpt_plan(schedule: str, device: str = "cpu") -> pipecc.Plan:
    model, inputs, loss_fn, target = gpt.build()
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=4, num_ranks=2,
                          num_microbatches=8, schedule=schedule, device=device)


def _without_rank_balance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_balance, "several_stages_per_rank", lambda stage_to_rank: False)


def test_gpt_zbv_on_two_ranks_predicts_a_faster_step_than_the_dp_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    balanced = _gpt_plan("zbv").simulate()
    _without_rank_balance(monkeypatch)
    dp_only = _gpt_plan("zbv").simulate()
    assert balanced.step_time_ms < dp_only.step_time_ms
    # 16.19 against 17.08 ms on the cpu preset when written: the LM head alone is the slowest stage,
    # and the DP left the first stage, on the same rank, nearly as slow


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "v-min"])
def test_compile_never_predicts_a_slower_step_than_the_dp_cuts(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """v-min on the cpu preset is slower with every balanced candidate: the DP's cuts stay."""
    chosen = _gpt_plan(schedule).simulate()
    _without_rank_balance(monkeypatch)
    assert chosen.step_time_ms <= _gpt_plan(schedule).simulate().step_time_ms


def _gpt_captured() -> tuple[Captured, CostTable]:
    model, inputs, loss_fn, target = gpt.build()
    captured = capture(model, inputs, loss_fn, target, num_microbatches=8)
    return captured, annotate_costs(captured, CPU)


def test_partition_candidates_start_with_the_dp_and_lower_the_largest_rank_sum() -> None:
    captured, costs = _gpt_captured()
    one_per_rank = partition_candidates(captured, costs, num_stages=2)
    assert len(one_per_rank) == 1 and one_per_rank[0].max_rank_ms == one_per_rank[0].bottleneck_ms
    v = partition_candidates(captured, costs, num_stages=4, stage_to_rank=(0, 1, 1, 0))
    dp = partition(captured, costs, num_stages=4, stage_to_rank=(0, 1, 1, 0), stage_slack=None)
    assert v[0].stage_of == dp.stage_of and len({tuple(p.stage_of.items()) for p in v}) == len(v) >= 2
    assert all(b.max_rank_ms <= a.max_rank_ms for a, b in zip(v, v[1:]))
    assert partition(captured, costs, num_stages=4, stage_to_rank=(0, 1, 1, 0)).stage_of == v[1].stage_of
    assert v[1].bottleneck_ms <= dp.bottleneck_ms * (1 + STAGE_SLACKS[0]) < v[-1].bottleneck_ms
