"""Heterogeneous ranks: the partitioner balances time, not layers, across unequal ranks, holds each rank
to its own memory, and the plan still computes the unpartitioned model's step, locally and over gloo."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import pipecc
from examples import gpt, mlp
from pipecc.cluster import Cluster, LinkSpec, RankSpec
from pipecc.errors import ConfigError, PartitionError
from pipecc.costs import DeviceSpec
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.partition import partition_problem, place_stages, solve
from pipecc.passes.simulate import simulate
from pipecc.testing import assert_same_grads, assert_same_step, rank_step, reference_step, run_ranks

MLP_SIZES = dict(num_layers=24, hidden=64, in_features=32, out_features=8)


def _compile(module: object, cluster: Cluster | None, num_stages: int = 2, schedule: str = "1f1b",
             **sizes: int) -> tuple[pipecc.Plan, tuple]:
    model, inputs, loss_fn, target = module.build(**sizes)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=4, schedule=schedule, cluster=cluster)
    return plan, (model, inputs, loss_fn, target)


def _work_ms(plan: pipecc.Plan, cluster: Cluster) -> list[float]:
    """Per rank, its compute at the reference speed: the work it was given, whatever its speed."""
    work = [0.0] * plan.num_ranks
    for stage in plan.stages:
        work[stage.rank] += stage.cost.compute_ms * cluster.ranks[stage.rank].speed
    return work


@pytest.mark.parametrize("slow_rank", (0, 1))
def test_a_rank_twice_as_slow_gets_about_half_the_work(slow_rank: int) -> None:
    speeds = [1.0, 1.0]
    speeds[slow_rank] = 0.5
    cluster = Cluster.of(speeds)
    plan, (model, inputs, loss_fn, target) = _compile(mlp, cluster, **MLP_SIZES)
    work = _work_ms(plan, cluster)
    ratio = work[slow_rank] / work[1 - slow_rank]
    busy = [stage.cost.compute_ms for stage in plan.stages]
    print(f"\nslow rank {slow_rank}: work ms {work}, slow/fast work {ratio:.3f}, compute ms at rank speed {busy}")
    assert 0.4 <= ratio <= 0.6
    assert max(busy) / min(busy) <= 1.25  # time, not work, is balanced
    uniform, _ = _compile(mlp, None, **MLP_SIZES)
    even = _work_ms(uniform, Cluster.uniform(2))
    assert 0.8 <= even[0] / even[1] <= 1.25  # the same model on equal ranks splits about evenly
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_v_schedule_on_unequal_ranks_balances_ranks_and_sends_nothing_within_a_rank() -> None:
    """zbv puts stages (0, 1, 1, 0) on ranks: stages 1 and 2 share rank 1, so nothing crosses between them."""
    cluster = Cluster.of([1.0, 0.5])
    model, inputs, loss_fn, target = mlp.build(**MLP_SIZES)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=4, num_microbatches=4,
                          schedule="zbv", cluster=cluster)
    assert [s.rank for s in plan.stages] == [0, 1, 1, 0]
    assert plan.stages[1].cost.send_forward_ms == 0 and plan.stages[2].cost.send_backward_ms == 0
    assert plan.stages[0].cost.send_forward_ms > 0
    work = _work_ms(plan, cluster)
    print(f"\nzbv on speeds (1, 0.5): work ms per rank {work}, slow/fast {work[1] / work[0]:.3f}")
    assert 0.35 <= work[1] / work[0] <= 0.65
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_slow_rank_predicted_step_is_faster_than_an_even_split() -> None:
    """The simulator agrees: the time-balanced plan beats splitting the layers evenly on these ranks."""
    cluster = Cluster.of([1.0, 0.5])
    balanced, _ = _compile(mlp, cluster, **MLP_SIZES)
    even, _ = _compile(mlp, None, **MLP_SIZES)
    slowed = []
    for stage in even.stages:  # the even plan's stages, timed on these ranks
        speed, cost = cluster.ranks[stage.rank].speed, stage.cost
        slowed.append(replace(cost, forward_ms=cost.forward_ms / speed, backward_input_ms=cost.backward_input_ms / speed,
                              backward_weight_ms=cost.backward_weight_ms / speed))
    even_ms = simulate(even.schedule, slowed).step_time_ms
    balanced_ms = balanced.simulate().step_time_ms
    print(f"\npredicted step: time-balanced {balanced_ms:.3f} ms, even layers {even_ms:.3f} ms "
          f"({even_ms / balanced_ms:.2f}x)")
    assert balanced_ms < even_ms


def test_each_rank_keeps_to_its_own_memory() -> None:
    plan, _ = _compile(gpt, None, num_stages=2)
    memory = [s.cost.memory_bytes for s in plan.stages]
    small = min(memory) - 1  # rank 0 can no longer hold what the even plan gave it... unless it takes less
    cluster = Cluster((RankSpec(memory_capacity_bytes=small), RankSpec()))
    limited, _ = _compile(gpt, cluster, num_stages=2)
    assert limited.stages[0].cost.memory_bytes <= small
    tiny = Cluster((RankSpec(memory_capacity_bytes=1000), RankSpec(memory_capacity_bytes=2000)))
    with pytest.raises(PartitionError, match=r"fits their memory \(rank 0: 1000 B, rank 1: 2\.0 KiB\)") as info:
        _compile(gpt, tiny, num_stages=2)
    assert any("<-- here" in note for note in info.value.__notes__)


def test_a_slow_link_moves_the_cut_to_where_less_crosses() -> None:
    model, inputs, loss_fn, target = gpt.build()
    captured = capture(model, inputs, loss_fn, target, num_microbatches=4)
    problem = partition_problem(captured, annotate_costs(captured, DeviceSpec.preset("cpu")))
    slow = Cluster(tuple(RankSpec(link=LinkSpec(bandwidth_bytes_per_s=2e7, latency_ms=1.0)) for _ in range(2)))
    places = place_stages(problem.device, 2, None, slow)
    (fast_cut,), _ = solve(problem, 2)
    (slow_cut,), bottleneck = solve(problem, 2, cluster=slow)
    kept = max(problem.stage_cost_ms(0, fast_cut, places[0]), problem.stage_cost_ms(fast_cut, problem.num_nodes, places[1]))
    crossing = problem.traffic.forward_bytes
    print(f"\ncut {fast_cut} -> {slow_cut}; bytes crossing {crossing[fast_cut]:.0f} -> {crossing[slow_cut]:.0f}; "
          f"bottleneck on the slow link {kept:.3f} -> {bottleneck:.3f} ms")
    assert bottleneck < kept and crossing[slow_cut] < crossing[fast_cut]


def test_cluster_json_round_trip_and_bad_clusters(tmp_path: object) -> None:
    cluster = Cluster((RankSpec(speed=2.0, memory_capacity_bytes=1 << 30, link=LinkSpec(1e9, 0.1), name="a"),
                       RankSpec(name="b")))
    path = tmp_path / "cluster.json"  # type: ignore[operator]
    path.write_text(__import__("json").dumps(cluster.to_json()))
    assert Cluster.load(path) == cluster
    with pytest.raises(ConfigError, match=r"speed=0; it must be a positive number"):
        RankSpec(speed=0)
    with pytest.raises(ConfigError, match=r"cluster rank 0 has unknown fields \['bogus'\]"):
        Cluster.from_json({"ranks": [{"speed": 1.0, "bogus": 1}]})
    with pytest.raises(ConfigError, match=r"cannot read the cluster description"):
        Cluster.from_json({"nodes": []})
    with pytest.raises(ConfigError, match=r"cluster describes 3 ranks but the schedule places its 2 stages on 2"):
        _compile(mlp, Cluster.of([1.0, 1.0, 1.0]), num_layers=4)


def _gloo_step(speeds: list[float]) -> tuple[float | None, dict[str, torch.Tensor], list[int]]:
    model, inputs, loss_fn, target = mlp.build(**MLP_SIZES)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=4,
                          cluster=Cluster.of(speeds))
    return (*rank_step(plan, inputs, target), [s.cost.num_nodes for s in plan.stages])


@pytest.mark.dist
def test_gloo_run_on_unequal_ranks_equals_unpartitioned() -> None:
    per_rank = run_ranks(_gloo_step, 2, [1.0, 0.5])
    expected_loss, expected = reference_step(*mlp.build(**MLP_SIZES), 4)
    assert per_rank[0][0] is None
    torch.testing.assert_close(torch.tensor(per_rank[1][0]), expected_loss, rtol=1e-5, atol=1e-6)
    covered: set[str] = set()
    for _, grads, _ in per_rank:
        assert_same_grads(grads, expected)
        covered |= set(grads)
    assert covered == set(expected)
    nodes = per_rank[0][2]
    assert nodes[1] < nodes[0]  # the slow rank holds fewer nodes
