"""The partition order (pipecc.passes.order): on branchy graphs the best partition over every
topological order, found exactly by the downset DP on small graphs; never worse than the graph's
own order; the reordered graph trains to the same loss and gradients as the model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipecc
from pipecc.cluster import Cluster
from pipecc.costs import DeviceSpec
from pipecc.errors import PartitionError
from pipecc.passes import order as order_pass
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.graph_facts import compute_nodes
from pipecc.passes.order import (best_order, check_order, depth_first_order, downset_order, downsets, greedy_order,
                                 order_by_stage, reorder)
from pipecc.passes.partition import INF, PartitionGraph, check_partition, partition, partition_graph, solve
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks
from models import build_two_towers

CPU = DeviceSpec.preset("cpu")
# TwoTowers on the cpu preset, 2 stages, 2 micro-batches: the graph's order (towers interleaved) cuts
# where a 512-wide tensor of each tower crosses; tower a, then tower b, cuts where only a's 8-wide output does.
GRAPH_ORDER_MS, BEST_ORDER_MS = 0.8810568, 0.756964
TOWER_A = {"a_0", "tanh", "a_1", "tanh_2", "a_2", "tanh_4"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one intra-op thread."""


def _two_towers_graph() -> tuple[pipecc.ir.Captured, PartitionGraph]:
    model, inputs, loss_fn, target = build_two_towers()
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    return captured, partition_graph(captured, annotate_costs(captured, CPU))


def test_two_towers_run_one_after_the_other_for_a_lower_bottleneck() -> None:
    captured, graph = _two_towers_graph()
    assert solve(graph.problem(), 2)[1] == pytest.approx(GRAPH_ORDER_MS, rel=1e-9)
    best = best_order(graph, 2)
    assert (best.method, best.bottleneck_ms) == ("downsets", pytest.approx(BEST_ORDER_MS, rel=1e-9))
    names = [graph.node_names[i] for i in best.order]
    assert set(names[:best.cuts[0]]) == TOWER_A
    part = partition(captured, annotate_costs(captured, CPU), num_stages=2)
    assert part.bottleneck_ms == pytest.approx(BEST_ORDER_MS, rel=1e-9)
    with pytest.raises(PartitionError, match="not contiguous in graph order"):
        check_partition(captured, part)  # until the graph is reordered
    order = order_by_stage(captured, part)
    check_order(captured, order)
    reordered = reorder(captured, order)
    assert [n.name for n in compute_nodes(reordered.graph_module)] == list(order)
    assert [n.name for n in compute_nodes(captured.graph_module)] == list(graph.node_names)  # the input stays
    check_partition(reordered, part)
    assert reorder(reordered, order) is reordered


def test_every_heuristic_order_finds_the_towers_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the downset DP's size the candidate orders run; each keeps a tower together here."""
    _, graph = _two_towers_graph()
    for candidate in (depth_first_order(graph), depth_first_order(graph, large_outputs_last=True), greedy_order(graph)):
        assert solve(graph.problem(candidate), 2)[1] == pytest.approx(BEST_ORDER_MS, rel=1e-9)
    monkeypatch.setattr(order_pass, "MAX_DOWNSETS", 10)  # too many downsets: the three candidates
    best = best_order(graph, 2)
    assert (best.method, best.bottleneck_ms) == ("depth-first", pytest.approx(BEST_ORDER_MS, rel=1e-9))
    monkeypatch.setattr(order_pass, "MAX_DOWNSET_NODES", 0)  # a large graph: one candidate
    best = best_order(graph, 2)
    assert (best.method, best.bottleneck_ms) == ("depth-first, large outputs last",
                                                 pytest.approx(BEST_ORDER_MS, rel=1e-9))


def test_compiled_two_towers_plan_reports_the_lower_bottleneck_and_equals_the_model() -> None:
    model, inputs, loss_fn, target = build_two_towers()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    assert [(s.node_names[0], s.node_names[-1]) for s in plan.stages] == [("a_0", "tanh_4"), ("b_0", "mse_loss")]
    assert max(s.cost.time_ms for s in plan.stages) == pytest.approx(BEST_ORDER_MS, rel=1e-6)
    assert_same_step(model, inputs, loss_fn, target, plan)


def _gloo_step() -> tuple[float | None, dict[str, torch.Tensor]]:
    model, inputs, loss_fn, target = build_two_towers()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    return rank_step(plan, inputs, target)


@pytest.mark.dist
def test_reordered_two_towers_over_gloo_equal_unpartitioned() -> None:
    per_rank = run_ranks(_gloo_step, 2)
    expected_loss, expected = reference_step(*build_two_towers(), 2)
    assert per_rank[0][0] is None
    torch.testing.assert_close(torch.tensor(per_rank[1][0]), expected_loss, rtol=1e-5, atol=1e-6)
    covered: set[str] = set()
    for _, grads in per_rank:
        assert_same_grads(grads, expected)
        covered |= set(grads)
    assert covered == set(expected)


def test_check_order_names_the_node_before_its_input() -> None:
    captured, graph = _two_towers_graph()
    names = list(graph.node_names)
    with pytest.raises(PartitionError, match=r"puts tanh \(position 0\) before its input a_0 \(position 1\)"):
        check_order(captured, [names[1], names[0], *names[2:]])
    with pytest.raises(PartitionError, match="15 compute nodes"):
        check_order(captured, names[:-1])


def test_chain_models_keep_the_graph_order() -> None:
    """One topological order: no search at all, and the same cuts as the plain DP."""
    graph = _random_graph_chain(5)
    assert order_pass.has_one_order(graph)
    best = best_order(graph, 2)
    assert (best.order, best.method) == (tuple(range(5)), "graph order")


# ---------------------------------------------------------------------------- random small graphs

def _random_graph_chain(n: int) -> PartitionGraph:
    users = tuple((i + 1,) for i in range(n))
    return PartitionGraph(tuple(f"n{i}" for i in range(n)), (1.0,) * n, (0,) * n, ((),) * n, {}, (1000,) * n,
                          (1000,) * n, (False,) * n, users, ((),) + tuple((i,) for i in range(n - 1)), CPU)


@st.composite
def random_graphs(draw: st.DrawFn, max_nodes: int = 7) -> PartitionGraph:
    """A random DAG of 2..max_nodes nodes: each reads 0-2 earlier ones; sinks (and some others) feed
    the output. Times, saved bytes, value sizes (some 0, some large), a few opaque values, and a
    parameter shared by two nodes."""
    n = draw(st.integers(2, max_nodes))
    after = [tuple(sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=2))))) if i else () for i in range(n)]
    users: list[list[int]] = [[] for _ in range(n)]
    for i, inputs in enumerate(after):
        for j in inputs:
            users[j].append(i)
    for j in range(n):
        if not users[j] or draw(st.booleans()) and draw(st.booleans()):
            users[j].append(n)
    sizes = [draw(st.sampled_from([0, 4_000, 40_000, 400_000])) for _ in range(n)]
    params = [draw(st.sampled_from([(), ("w",), ("shared",)])) for _ in range(n)]
    return PartitionGraph(
        node_names=tuple(f"n{i}" for i in range(n)),
        node_ms=tuple(draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0])) for _ in range(n)),
        saved_bytes=tuple(draw(st.sampled_from([0, 10_000])) for _ in range(n)),
        node_params=tuple(params),
        param_bytes={"w": 3000, "shared": 8000},
        value_bytes=tuple(sizes),
        grad_bytes=tuple(size if draw(st.booleans()) else 0 for size in sizes),
        opaque=tuple(draw(st.integers(0, 9)) == 0 for _ in range(n)),
        users=tuple(tuple(u) for u in users),
        after=tuple(after),
        device=CPU,
    )


def _topological_orders(graph: PartitionGraph) -> list[tuple[int, ...]]:
    """Every topological order, by extending each prefix with each node whose inputs it holds."""
    orders: list[tuple[int, ...]] = [()]
    for _ in range(graph.num_nodes):
        orders = [(*prefix, i) for prefix in orders for i in range(graph.num_nodes)
                  if i not in prefix and all(j in prefix for j in graph.after[i])]
    return orders


PLACEMENTS = {  # num_stages -> (stage_to_rank, cluster) options: one stage per equal rank, a V, unequal ranks
    "one per rank": lambda p: (None, None),
    "v": lambda p: ((0, 1, 1, 0), None) if p == 4 else (None, None),
    "unequal": lambda p: (None, Cluster.of([1.0, 0.5, 2.0, 1.0][:p])),
}


def _options(num_stages: int, limit: int | None, placement: str) -> dict[str, object]:
    stage_to_rank, cluster = PLACEMENTS[placement](num_stages)
    return dict(max_memory_bytes=limit, in_flight=lambda s: 2, stage_to_rank=stage_to_rank, cluster=cluster)


def _solve_or_inf(graph: PartitionGraph, order: tuple[int, ...] | None, num_stages: int,
                  options: dict[str, object]) -> float:
    try:
        return solve(graph.problem(order), num_stages, **options)[1]  # type: ignore[arg-type]
    except PartitionError:
        return INF


PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(random_graphs(max_nodes=7), st.integers(1, 4), st.sampled_from([None, 60_000, 120_000]),
       st.sampled_from(list(PLACEMENTS)))
def test_downset_dp_equals_the_best_partition_over_every_topological_order(graph: PartitionGraph, num_stages: int,
                                                                             limit: int | None, placement: str) -> None:
    num_stages = min(num_stages, graph.num_nodes)
    options = _options(num_stages, limit, placement)
    orders = _topological_orders(graph)
    brute = min(_solve_or_inf(graph, order, num_stages, options) for order in orders)
    exact = downset_order(graph, num_stages, **options)  # type: ignore[arg-type]
    if exact is None:
        assert brute == INF
        return
    order, bottleneck = exact
    assert bottleneck == pytest.approx(brute, rel=1e-9)
    assert order in orders
    assert _solve_or_inf(graph, order, num_stages, options) == pytest.approx(brute, rel=1e-9)


@PROPERTY
@given(random_graphs(max_nodes=8), st.integers(1, 4), st.sampled_from([None, 60_000]),
       st.sampled_from(["exact", "candidates", "large"]), st.sampled_from(list(PLACEMENTS)))
def test_chosen_order_is_topological_and_never_worse_than_the_graphs(graph: PartitionGraph, num_stages: int,
                                                                     limit: int | None, search: str,
                                                                     placement: str) -> None:
    num_stages = min(num_stages, graph.num_nodes)
    options = _options(num_stages, limit, placement)
    own = _solve_or_inf(graph, None, num_stages, options)
    try:
        with pytest.MonkeyPatch.context() as patch:
            if search == "candidates":
                patch.setattr(order_pass, "MAX_DOWNSETS", 0)
            if search == "large":
                patch.setattr(order_pass, "MAX_DOWNSET_NODES", 0)
            best = best_order(graph, num_stages, **options)  # type: ignore[arg-type]
    except PartitionError:
        assert own == INF
        return
    assert sorted(best.order) == list(range(graph.num_nodes))
    position = {node: p for p, node in enumerate(best.order)}
    assert all(position[j] < position[i] for i in range(graph.num_nodes) for j in graph.after[i])
    assert best.bottleneck_ms <= own
    if best.order == tuple(range(graph.num_nodes)):
        assert best.bottleneck_ms == own
    assert _solve_or_inf(graph, best.order, num_stages, options) == pytest.approx(best.bottleneck_ms, rel=1e-12)


def test_downsets_stop_at_the_cap() -> None:
    n = 12  # 12 independent nodes: 4096 downsets
    wide = PartitionGraph(tuple(f"n{i}" for i in range(n)), (1.0,) * n, (0,) * n, ((),) * n, {}, (0,) * n, (0,) * n,
                          (False,) * n, ((n,),) * n, ((),) * n, CPU)
    assert downsets(wide, max_count=100) is None
    assert len(downsets(wide, max_count=5000) or []) == 4096


@pytest.mark.parametrize("schedule, num_stages", [("zbv", 4), ("auto", 2)])
def test_reordered_plans_under_placements_and_auto_equal_the_model(schedule: str, num_stages: int) -> None:
    """A V placement (two stages per rank) and schedule="auto" (one trace shared by every candidate,
    each reordering its own copy) partition the towers along their best order too."""
    model, inputs, loss_fn, target = build_two_towers()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=4, schedule=schedule)
    first = plan.stages[0].node_names
    assert len(first) >= 3 and set(first) <= TOWER_A  # b_0, third in the graph's order, went later
    assert_same_step(model, inputs, loss_fn, target, plan)


class _InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 2
        b = x + 1
        b.add_(a)  # an in-place update: reads of b must stay on its side
        c = x - 1
        return a + b + c


def test_a_node_with_side_effects_keeps_its_place() -> None:
    """The in-place add_ follows every node before it and precedes every node after it, data or not."""
    from pipecc.passes.partition import _order_constraints

    nodes = compute_nodes(torch.fx.symbolic_trace(_InPlace()))
    assert [n.name for n in nodes] == ["mul", "add", "add_", "sub", "add_1", "add_2"]
    after = _order_constraints(nodes, {n.name: i for i, n in enumerate(nodes)})
    assert after == ((), (), (1, 0), (2,), (0, 1, 2), (4, 3, 2))
