"""Coarsening: the DP on the coarsened graph finds the uncoarsened DP's bottleneck (exact part), and the
sampled part on large graphs stays close to it, on random problems and on real models."""

from __future__ import annotations

import itertools
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples import gpt
from pipecc.costs import DeviceSpec
from pipecc.errors import PartitionError
from pipecc.passes import coarsen as coarsen_pass
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.coarsen import coarsen, exact_boundaries, sample_boundaries, solve_coarsened
from pipecc.passes.partition import CutValue, PartitionProblem, partition_problem, solve

CPU = DeviceSpec.preset("cpu")
INF = float("inf")


@st.composite
def problems(draw: st.DrawFn, max_nodes: int = 9) -> PartitionProblem:
    """Chains where many nodes are free (no time, saved bytes or parameters), as views are."""
    n = draw(st.integers(2, max_nodes))
    free = [draw(st.integers(0, 9)) < 4 for _ in range(n)]
    node_ms = tuple(0.0 if f else draw(st.floats(0.1, 10)) for f in free)
    saved = tuple(0 if f else draw(st.integers(0, 1000)) for f in free)
    params = tuple(() if f else tuple(draw(st.lists(st.sampled_from(["a", "b", "tied"]), max_size=2, unique=True)))
                   for f in free)
    values = []
    for _ in range(draw(st.integers(0, 2 * n))):
        producer = draw(st.integers(0, n - 1))
        size = draw(st.sampled_from([0, 1000, 10**5, 10**6]))
        values.append(CutValue(producer, draw(st.integers(producer + 1, n)), size, size if draw(st.booleans()) else 0,
                               opaque=draw(st.integers(0, 6)) == 0))
    return PartitionProblem(tuple(f"n{i}" for i in range(n)), node_ms, saved, params,
                            {"a": 3000, "b": 500, "tied": 8000}, tuple(values), CPU)


def _is_free(problem: PartitionProblem, i: int) -> bool:
    return problem.node_ms[i] == 0 and problem.saved_bytes[i] == 0 and not problem.node_params[i]


def brute_force_no_free_stage(problem: PartitionProblem, num_stages: int, limit: int | None) -> float:
    """Best bottleneck over partitions in which every stage holds a node that is not free."""
    n, best = problem.num_nodes, INF
    for inner in itertools.combinations(range(1, n), num_stages - 1):
        stages = list(zip([0, *inner], [*inner, n]))
        if any(all(_is_free(problem, i) for i in range(a, b)) for a, b in stages):
            continue
        if limit is not None and max(problem.stage_memory_bytes(a, b, 2) for a, b in stages) > limit:
            continue
        best = min(best, max(problem.stage_cost_ms(a, b) for a, b in stages))
    return best


def _solve(problem: PartitionProblem, num_stages: int, limit: int | None) -> float:
    try:
        return solve(problem, num_stages, max_memory_bytes=limit, in_flight=lambda s: 2)[1]
    except PartitionError:
        return INF


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(1, 4), st.sampled_from([None, 20_000, 60_000]))
def test_exact_coarsening_keeps_the_bottleneck(problem: PartitionProblem, num_stages: int, limit: int | None) -> None:
    """Equal to the uncoarsened DP except where only a stage of free nodes reaches it; always equal
    to the best partition without such a stage, and never better than the uncoarsened DP."""
    num_stages = min(num_stages, problem.num_nodes)
    kept = exact_boundaries(problem)
    coarse = coarsen(problem, kept)
    fine = _solve(problem, num_stages, limit)
    coarse_best = _solve(coarse.problem, num_stages, limit) if len(kept) + 1 >= num_stages else INF
    assert coarse_best >= fine * (1 - 1e-9)
    if coarse_best != pytest.approx(fine, rel=1e-9):  # only a free-node stage is better
        no_free_stage = brute_force_no_free_stage(problem, num_stages, limit)
        if no_free_stage < INF:  # else more stages than busy nodes: every partition has a free-node stage
            assert coarse_best == pytest.approx(no_free_stage, rel=1e-9)
        assert fine < no_free_stage


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_nodes=12), st.data())
def test_a_partition_on_kept_boundaries_costs_the_same_coarse_and_fine(problem: PartitionProblem,
                                                                      data: st.DataObject) -> None:
    kept = exact_boundaries(problem)
    coarse = coarsen(problem, kept)
    k = data.draw(st.integers(0, len(kept)))
    chosen = sorted(data.draw(st.lists(st.integers(1, len(kept)), min_size=k, max_size=k, unique=True))) if kept.size else []
    fine_cuts = coarse.fine_cuts(chosen)
    for (a, b), (fa, fb) in zip(zip([0, *chosen], [*chosen, coarse.problem.num_nodes]),
                                zip([0, *fine_cuts], [*fine_cuts, problem.num_nodes])):
        assert coarse.problem.stage_cost_ms(a, b) == pytest.approx(problem.stage_cost_ms(fa, fb), rel=1e-9, abs=1e-12)
        assert coarse.problem.stage_memory_bytes(a, b, 3) == problem.stage_memory_bytes(fa, fb, 3)


def _random_chain(n: int, seed: int) -> PartitionProblem:
    """A long chain like a real model: block-sized bumps of time, a residual value crossing each boundary,
    skip values over a few nodes, free views between ops."""
    rng = np.random.default_rng(seed)
    node_ms = [0.0 if i % 3 == 2 else float(rng.uniform(0.1, 1.0) * (3.0 if i % 12 < 3 else 1.0)) for i in range(n)]
    values = [CutValue(i, i + 1, 4096, 4096) for i in range(n)]
    values += [CutValue(i, min(n, i + int(rng.integers(2, 9))), int(rng.integers(1, 5)) * 4096, 4096) for i in range(0, n, 5)]
    return PartitionProblem(tuple(f"n{i}" for i in range(n)), tuple(node_ms), tuple(int(rng.integers(0, 4096)) for _ in range(n)),
                            tuple((f"w{i // 3}",) if i % 3 == 0 else () for i in range(n)),
                            {f"w{k}": 16384 for k in range(n // 3 + 1)}, tuple(values), CPU)


@pytest.mark.parametrize("seed", range(3))
def test_sampled_coarsening_on_a_long_chain_is_close_to_exact(seed: int) -> None:
    problem = _random_chain(600, seed)
    _, exact = solve(problem, 6)
    cuts, sampled = solve_coarsened(problem, 6, max_dp_nodes=64)
    assert len(cuts) == 5 and all(0 < a < b < problem.num_nodes for a, b in zip(cuts, cuts[1:]))
    bounds = [0, *cuts, problem.num_nodes]
    assert max(problem.stage_cost_ms(a, b) for a, b in zip(bounds, bounds[1:])) == pytest.approx(sampled)
    print(f"\nseed {seed}: exact bottleneck {exact:.4f} ms, sampled to 64 DP nodes {sampled:.4f} ms "
          f"(+{100 * (sampled / exact - 1):.2f}%)")
    assert exact * (1 - 1e-9) <= sampled <= exact * 1.01


def test_sample_boundaries_keeps_the_cheapest_boundary_of_each_span() -> None:
    problem = _random_chain(120, 0)
    candidates = exact_boundaries(problem)
    kept = sample_boundaries(problem, candidates, 10)
    assert len(kept) <= 10 and set(kept) <= set(candidates.tolist())
    comm = [problem.comm_ms(int(b)) for b in candidates]
    assert min(problem.comm_ms(int(b)) for b in kept) == min(comm)


def test_coarsened_partition_of_gpt_equals_the_uncoarsened_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs, loss_fn, target = gpt.build(n_layers=8, d_model=32, n_heads=2, vocab_size=512, seq_len=16)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=4)
    problem = partition_problem(captured, annotate_costs(captured, CPU))
    monkeypatch.setattr(coarsen_pass, "SMALL_GRAPH_NODES", 0)
    kept = exact_boundaries(problem)
    print(f"\ngpt 8 layers: {problem.num_nodes} nodes, {len(kept) + 1} after exact coarsening")
    assert len(kept) + 1 < 0.8 * problem.num_nodes  # views, getitems and sizes merge away
    for num_stages in (2, 4, 8):
        _, exact = solve(problem, num_stages)
        _, coarse = solve_coarsened(problem, num_stages)
        _, sampled = solve_coarsened(problem, num_stages, max_dp_nodes=48)
        print(f"{num_stages} stages: bottleneck exact {exact:.4f}, coarsened {coarse:.4f}, sampled to 48 {sampled:.4f} ms")
        assert coarse == pytest.approx(exact, rel=1e-9)
        assert exact * (1 - 1e-9) <= sampled <= exact * 1.01


def test_coarsen_merges_groups_and_keeps_boundary_traffic() -> None:
    problem = PartitionProblem(("a", "b", "c", "d"), (1.0, 0.0, 2.0, 3.0), (10, 0, 20, 30), (("w",), (), ("w",), ()),
                               {"w": 100}, (CutValue(0, 3, 8, 8), CutValue(1, 2, 4, 0)), CPU)
    merged = coarsen(problem, [2])
    assert merged.starts == (0, 2)
    assert merged.problem.node_names == ("a..b", "c..d")
    assert merged.problem.node_ms == (1.0, 5.0) and merged.problem.saved_bytes == (10, 50)
    assert merged.problem.node_params == (("w",), ("w",))
    traffic = merged.problem.traffic  # boundaries 0, 2 (both values cross it) and 4 of the original
    assert traffic.forward_bytes.tolist() == [0, 12, 0] and traffic.grad_bytes.tolist() == [0, 8, 0]
    assert traffic.forward_messages.tolist() == [0, 2, 0] and traffic.grad_messages.tolist() == [0, 1, 0]
    assert merged.fine_cuts([1]) == [2]


@pytest.mark.parametrize("name", ["pipecc.passes.coarsen", "pipecc.passes.partition", "pipecc.cluster"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
