"""The partitioner: exact (brute force agrees), deterministic, better than hand splits, honest about memory."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pipecc
from examples import gpt, mlp
from pipecc.cluster import Cluster, LinkSpec, RankSpec
from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError, PartitionError
from pipecc.ir import Captured, Partition
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.partition import (CutValue, PartitionProblem, check_partition, partition, partition_problem,
                                    place_stages, solve)

CPU = DeviceSpec.preset("cpu")
INF = float("inf")


# --- brute force ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    problem: PartitionProblem
    num_stages: int
    max_memory_bytes: int | None
    in_flight_table: tuple[int, ...]

    def in_flight(self, stage: int) -> int:
        return self.in_flight_table[stage]


def brute_force(problem: PartitionProblem, num_stages: int, limit: int | None,
                in_flight: Callable[[int], int]) -> tuple[float, float]:
    """(best bottleneck under the limit, smallest memory limit any cuttable partition fits), by enumeration
    with the scalar reference methods; INF where none exists."""
    n = problem.num_nodes
    best, least_memory = INF, INF
    for inner in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *inner, n]
        stages = list(zip(bounds, bounds[1:]))
        time_ms = max(problem.stage_cost_ms(i, j) for i, j in stages)
        if time_ms == INF:
            continue
        memory = max(problem.stage_memory_bytes(i, j, in_flight(s)) for s, (i, j) in enumerate(stages))
        least_memory = min(least_memory, memory)
        if limit is None or memory <= limit:
            best = min(best, time_ms)
    return best, least_memory


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 8))
    names = tuple(f"n{i}" for i in range(n))
    node_ms = tuple(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n)))
    saved = tuple(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)))
    param_bytes = {f"p{k}": draw(st.integers(0, 5000)) for k in range(4)}
    params = [list(draw(st.lists(st.sampled_from(sorted(param_bytes)), max_size=2, unique=True))) for _ in range(n)]
    if n >= 3 and draw(st.booleans()):  # a tied weight read near both ends, like an embedding and its LM head
        first, last = draw(st.integers(0, n // 3)), draw(st.integers(n - 1 - n // 3, n - 1))
        param_bytes["tied"] = draw(st.integers(1, 20000))
        params[first].append("tied")
        params[last].append("tied")
    values = []
    for _ in range(draw(st.integers(0, 2 * n))):
        producer = draw(st.integers(0, n - 1))
        last_use = draw(st.integers(producer + 1, n))  # n: read by the graph output; may skip many boundaries
        size = draw(st.integers(0, 10**6))
        values.append(CutValue(producer, last_use, size, size if draw(st.booleans()) else 0,
                               opaque=draw(st.integers(0, 4)) == 0))
    problem = PartitionProblem(names, node_ms, saved, tuple(tuple(p) for p in params), param_bytes,
                               tuple(values), CPU)
    num_stages = draw(st.integers(1, min(5, n)))
    in_flight_table = tuple(draw(st.lists(st.integers(1, 4), min_size=num_stages, max_size=num_stages)))
    limit = None
    if draw(st.booleans()):
        whole = problem.stage_memory_bytes(0, n, max(in_flight_table))
        limit = draw(st.integers(0, max(whole, 1)))
    return Case(problem, num_stages, limit, in_flight_table)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_dp_matches_brute_force(case: Case) -> None:
    problem, p, limit = case.problem, case.num_stages, case.max_memory_bytes
    expected, least_memory = brute_force(problem, p, limit, case.in_flight)
    if expected == INF:
        with pytest.raises(PartitionError) as info:
            solve(problem, p, max_memory_bytes=limit, in_flight=case.in_flight)
        if least_memory < INF:  # memory, not cuttability, ruled every partition out: the message says how much
            assert f"smallest feasible limit is {int(least_memory)} bytes" in str(info.value)
        return
    cuts, bottleneck = solve(problem, p, max_memory_bytes=limit, in_flight=case.in_flight)
    assert bottleneck == pytest.approx(expected, rel=1e-9, abs=1e-9)
    bounds = [0, *cuts, problem.num_nodes]
    assert len(cuts) == p - 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
    stages = list(zip(bounds, bounds[1:]))
    assert max(problem.stage_cost_ms(i, j) for i, j in stages) == pytest.approx(bottleneck, rel=1e-9, abs=1e-9)
    if limit is not None:
        assert all(problem.stage_memory_bytes(i, j, case.in_flight(s)) <= limit for s, (i, j) in enumerate(stages))


@st.composite
def placements(draw: st.DrawFn, num_stages: int) -> tuple[tuple[int, ...], Cluster]:
    """A stage -> rank map using every rank (numbered by first stage), and ranks of unequal speed and link."""
    raw = draw(st.lists(st.integers(0, num_stages - 1), min_size=num_stages, max_size=num_stages))
    numbering: dict[int, int] = {}
    stage_to_rank = tuple(numbering.setdefault(r, len(numbering)) for r in raw)
    ranks = tuple(RankSpec(speed=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
                           link=draw(st.sampled_from([None, LinkSpec(1e9, 0.2), LinkSpec(4e9, 0.0)])))
                  for _ in numbering)
    return stage_to_rank, Cluster(ranks)


def placed_brute_force(problem: PartitionProblem, num_stages: int, limit: int | None, in_flight: Callable[[int], int],
                       stage_to_rank: Sequence[int], cluster: Cluster) -> float:
    """Best slowest stage (each timed on its rank) over partitions whose ranks' summed memory fits `limit`."""
    places = place_stages(CPU, num_stages, stage_to_rank, cluster)
    n, best = problem.num_nodes, INF
    for inner in itertools.combinations(range(1, n), num_stages - 1):
        stages = list(zip([0, *inner], [*inner, n]))
        time_ms = max(problem.stage_cost_ms(i, j, places[s]) for s, (i, j) in enumerate(stages))
        per_rank = [0] * cluster.num_ranks
        for s, (i, j) in enumerate(stages):
            per_rank[stage_to_rank[s]] += problem.stage_memory_bytes(i, j, in_flight(s))
        if limit is None or max(per_rank) <= limit:
            best = min(best, time_ms)
    return best


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.data())
def test_placed_dp_matches_brute_force(case: Case, data: st.DataObject) -> None:
    """Exact with one stage per rank; with several, never over a rank's memory and exact without a limit."""
    problem, p, limit = case.problem, case.num_stages, case.max_memory_bytes
    stage_to_rank, cluster = data.draw(placements(p))
    expected = placed_brute_force(problem, p, limit, case.in_flight, stage_to_rank, cluster)
    one_per_rank = len(set(stage_to_rank)) == p
    try:
        cuts, bottleneck = solve(problem, p, max_memory_bytes=limit, in_flight=case.in_flight,
                                 stage_to_rank=stage_to_rank, cluster=cluster)
    except PartitionError:
        assert expected == INF or not (one_per_rank or limit is None)
        return
    places = place_stages(CPU, p, stage_to_rank, cluster)
    stages = list(zip([0, *cuts], [*cuts, problem.num_nodes]))
    assert max(problem.stage_cost_ms(i, j, places[s]) for s, (i, j) in enumerate(stages)) == pytest.approx(bottleneck)
    per_rank = [0] * cluster.num_ranks
    for s, (i, j) in enumerate(stages):
        per_rank[stage_to_rank[s]] += problem.stage_memory_bytes(i, j, case.in_flight(s))
    assert limit is None or max(per_rank) <= limit
    if one_per_rank or limit is None:
        assert bottleneck == pytest.approx(expected, rel=1e-9, abs=1e-9)
    else:
        assert bottleneck >= expected * (1 - 1e-9)


def test_boundary_between_stages_on_one_rank_is_free_and_links_are_the_slower_end() -> None:
    skip = CutValue(1, 3, 2_000_000, 2_000_000)  # crosses boundaries 2 and 3
    problem = _chain([1.0] * 4, [skip])
    slow = LinkSpec(1e9, 0.5)
    cluster = Cluster((RankSpec(link=slow), RankSpec(speed=2.0)))
    places = place_stages(CPU, 3, (0, 0, 1), cluster)
    assert [(p.rank, p.speed, p.link_in, p.link_out) for p in places] == [
        (0, 1.0, None, None), (0, 1.0, None, slow), (1, 2.0, slow, None)]
    crossing = 2 * slow.transfer_ms(2_000_000, 1)
    assert problem.stage_cost_ms(0, 2, places[0]) == pytest.approx(2.0)  # boundary 2 stays on rank 0
    assert problem.stage_cost_ms(2, 3, places[1]) == pytest.approx(1.0 + crossing)
    assert problem.stage_cost_ms(3, 4, places[2]) == pytest.approx(0.5 + crossing)


@pytest.mark.parametrize("stage_to_rank, cluster, message", [
    ((0, 2), None, r"leaves ranks \[1\] without a stage"),
    ((0, 1, 2), None, r"must give a rank .* for each of the 2 stages"),
    ((0, 1), Cluster.of([1.0, 1.0, 1.0]), r"cluster describes 3 ranks but the schedule places its 2 stages on 2"),
])
def test_bad_placement_is_a_config_error(stage_to_rank: tuple[int, ...], cluster: Cluster | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        solve(_chain([1.0, 1.0, 1.0]), 2, stage_to_rank=stage_to_rank, cluster=cluster)


def _chain(node_ms: Sequence[float], values: Sequence[CutValue] = ()) -> PartitionProblem:
    n = len(node_ms)
    return PartitionProblem(tuple(f"n{i}" for i in range(n)), tuple(node_ms), (0,) * n, ((),) * n, {},
                            tuple(values), CPU)


def test_skip_value_is_charged_on_every_boundary_it_crosses() -> None:
    skip = CutValue(0, 4, 2_000_000, 2_000_000)  # 1 ms each way on the cpu link, plus latency
    problem = _chain([1.0] * 5, [skip])
    crossing = CPU.transfer_ms(2_000_000, 1) * 2
    assert [problem.comm_ms(k) for k in range(6)] == pytest.approx([0, crossing, crossing, crossing, crossing, 0])
    assert problem.stage_cost_ms(1, 3) == pytest.approx(2.0 + 2 * crossing)


def test_opaque_values_block_their_boundaries_and_the_error_says_how_many_stages_fit() -> None:
    problem = _chain([1.0] * 4, [CutValue(0, 3, 0, 0, opaque=True)])  # blocks boundaries 1, 2, 3
    assert solve(problem, 1) == ([], 4.0)
    with pytest.raises(PartitionError, match=r"only 0 of its 3 boundaries can be cut.*\nUse num_stages <= 1"):
        solve(problem, 2)
    with pytest.raises(PartitionError, match=r"only 0 of its 3 boundaries"):  # not an OverflowError
        solve(problem, 2, max_memory_bytes=10)


def test_same_problem_gives_the_same_cuts_and_ties_go_to_the_earliest_cut() -> None:
    problem = _chain([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    first = solve(problem, 3)
    assert all(solve(problem, 3) == first for _ in range(3))
    assert solve(_chain([1.0, 0.0, 0.0, 1.0]), 2) == ([1], 1.0)


# --- real models ------------------------------------------------------------------------------


def _captured(module: object, num_microbatches: int = 2, **sizes: int) -> tuple[Captured, PartitionProblem]:
    model, inputs, loss_fn, target = module.build(**sizes)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=num_microbatches)
    costs = annotate_costs(captured, CPU)
    return captured, partition_problem(captured, costs)


def _bottleneck(problem: PartitionProblem, cuts: Sequence[int]) -> float:
    bounds = [0, *cuts, problem.num_nodes]
    return max(problem.stage_cost_ms(i, j) for i, j in zip(bounds, bounds[1:]))


def uniform_layer_cuts(problem: PartitionProblem, num_blocks: int, num_stages: int) -> list[int]:
    """Equal blocks per stage, embedding with the first blocks and the LM head with the last:
    how torch.distributed.pipelining users place split points by hand."""
    assert num_blocks % num_stages == 0
    first_node = {}
    for i, name in enumerate(problem.node_names):
        for k in range(num_blocks):
            if name.startswith(f"blocks_{k}_"):
                first_node.setdefault(k, i)
    return [first_node[s * num_blocks // num_stages] for s in range(1, num_stages)]


def param_count_cuts(problem: PartitionProblem, num_stages: int) -> list[int]:
    """Cut after the node where cumulative parameter bytes (each parameter at its first reader) crosses
    s/num_stages of the total; moved later where a boundary cannot be cut or would leave a stage empty."""
    seen: set[str] = set()
    cumulative = []
    total = 0
    for params in problem.node_params:
        total += sum(problem.param_bytes.get(p, 0) for p in params if p not in seen)
        seen.update(params)
        cumulative.append(total)
    cuts: list[int] = []
    for s in range(1, num_stages):
        cut = next(i + 1 for i, c in enumerate(cumulative) if c >= total * s / num_stages)
        cut = max(cut, cuts[-1] + 1 if cuts else 1)
        while not problem.cuttable(cut):
            cut += 1
        cuts.append(cut)
    assert cuts[-1] < problem.num_nodes
    return cuts


def test_dp_beats_uniform_layer_and_parameter_count_splits_on_gpt() -> None:
    strictly_better = []
    for num_blocks in (4, 8):
        captured, problem = _captured(gpt, vocab_size=8192, d_model=32, n_layers=num_blocks, n_heads=2, seq_len=16)
        for num_stages in (2, 4):
            cuts, dp = solve(problem, num_stages)
            assert _bottleneck(problem, cuts) == pytest.approx(dp)
            uniform = _bottleneck(problem, uniform_layer_cuts(problem, num_blocks, num_stages))
            by_params = _bottleneck(problem, param_count_cuts(problem, num_stages))
            print(f"\ngpt vocab 8192, {num_blocks} blocks, {num_stages} stages: bottleneck ms "
                  f"dp {dp:.3f}  uniform layers {uniform:.3f}  parameter count {by_params:.3f}")
            assert dp <= uniform * (1 + 1e-9) and dp <= by_params * (1 + 1e-9)
            strictly_better.append(dp < 0.95 * uniform)
    assert any(strictly_better)


def test_partition_covers_every_node_and_passes_its_check() -> None:
    captured, problem = _captured(gpt, vocab_size=256, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    part = partition(captured, annotate_costs(captured, CPU), num_stages=3)
    check_partition(captured, part)
    assert set(part.stage_of) == set(problem.node_names)
    again = partition(captured, annotate_costs(captured, CPU), num_stages=3)
    assert again.stage_of == part.stage_of and again.bottleneck_ms == part.bottleneck_ms


# --- memory -----------------------------------------------------------------------------------


def test_memory_limit_error_gives_the_smallest_feasible_limit_and_that_limit_works() -> None:
    model, inputs, loss_fn, target = mlp.build(num_layers=4, hidden=32, in_features=16, out_features=4)

    def compile_with(limit: int) -> pipecc.Plan:
        return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=3,
                              num_microbatches=4, schedule="gpipe", max_memory_bytes=limit)

    with pytest.raises(PartitionError, match=r"max_memory_bytes=1000 .*smallest feasible limit is \d+ bytes") as info:
        compile_with(1000)
    assert any("<-- here" in note for note in info.value.__notes__)
    smallest = int(re.search(r"smallest feasible limit is (\d+) bytes", str(info.value)).group(1))
    plan = compile_with(smallest)
    assert max(stage.cost.memory_bytes for stage in plan.stages) <= smallest
    with pytest.raises(PartitionError, match=f"smallest feasible limit is {smallest} bytes"):
        compile_with(smallest - 1)


# --- check_partition --------------------------------------------------------------------------


class TwoBranches(nn.Module):
    """Two independent branches from the input: graph order a, b, add, c."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


def _two_branches() -> Captured:
    x, target = torch.randn(4, 4), torch.randn(4, 2)
    return capture(TwoBranches(), (x,), torch.nn.functional.mse_loss, target, num_microbatches=1)


def test_check_partition_rejects_backward_flow() -> None:
    captured = _two_branches()
    order = ["a", "b", "add", "c", "mse_loss"]
    assert [n.name for n in captured.graph_module.graph.nodes if n.op.startswith("call")] == order
    backwards = Partition(2, {"a": 1, "b": 1, "add": 1, "c": 0, "mse_loss": 0}, 0.0)
    with pytest.raises(PartitionError, match=r"value add \(stage 1\) flows backwards to c \(stage 0\)"):
        check_partition(captured, backwards)


def test_check_partition_rejects_non_contiguous_stages() -> None:
    captured = _two_branches()
    # Values only flow forward here, but stage 1 is split in two by b on stage 0.
    split = Partition(2, {"a": 1, "b": 0, "add": 1, "c": 1, "mse_loss": 1}, 0.0)
    with pytest.raises(PartitionError, match=r"not contiguous.*b \(stage 0\) comes after a \(stage 1\)"):
        check_partition(captured, split)


@pytest.mark.parametrize("stage_of, message", [
    ({"a": 0, "b": 0, "add": 0, "c": 1}, r"leaves 1 of 5 compute nodes without a stage, first mse_loss"),
    ({"a": 0, "b": 0, "add": 0, "c": 0, "mse_loss": 0}, r"stages \[1\] of 2 hold no compute node"),
    ({"a": 0, "b": 0, "add": 0, "c": 1, "mse_loss": 2}, r"mse_loss is on stage 2, outside 0..1"),
])
def test_check_partition_rejects_missing_empty_and_out_of_range(stage_of: dict[str, int], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        check_partition(_two_branches(), Partition(2, stage_of, 0.0))


def test_more_stages_than_nodes_is_a_partition_error() -> None:
    problem = _chain([1.0, 2.0])
    with pytest.raises(PartitionError, match=r"num_stages=3 but the graph has only 2 compute nodes.*\nUse num_stages <= 2"):
        solve(problem, 3)
    assert math.isclose(solve(problem, 2)[1], 2.0)
