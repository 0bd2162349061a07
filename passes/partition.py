"""Partition: node -> stage, minimising the slowest stage, exactly, over the graph's order.

A stage is a contiguous range [i, j) of compute nodes in graph (topological) order. Its cost
is its F+B+W compute plus the time to move every value that crosses its two boundaries
(activations forward, their gradients backward). A value that skips stages is relayed by
every stage in between, so it is charged on every boundary it crosses. The min-max over all
ways to cut the order into `num_stages` ranges is found by dynamic programming,
O(num_stages * N^2) work done as N*num_stages vector operations.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, Sequence

import torch
from torch import fx

from pipecc.costs import CostTable, DeviceSpec
from pipecc.errors import PartitionError
from pipecc.ir import Captured, Partition
from pipecc.passes.graph_facts import ValueKind, compute_nodes, grad_nodes, tensor_bytes, value_kind
from pipecc.printing import format_bytes

INF = float("inf")
InFlight = Callable[[int], int]  # stage index -> micro-batches whose activations it holds at once


@dataclass(frozen=True)
class CutValue:
    """A value produced by node `producer` and last read by node `last_use` (N: the graph output)."""

    producer: int
    last_use: int
    forward_bytes: int
    grad_bytes: int  # 0 when no gradient flows back through it
    opaque: bool = False  # not a tensor nor a constant: no boundary may cut it


@dataclass(frozen=True)
class PartitionProblem:
    """The graph reduced to what the partitioner needs: a chain of nodes and the values crossing it."""

    node_names: tuple[str, ...]
    node_ms: tuple[float, ...]  # F+B+W per node
    saved_bytes: tuple[int, ...]
    node_params: tuple[tuple[str, ...], ...]
    param_bytes: Mapping[str, int]
    values: tuple[CutValue, ...]
    device: DeviceSpec

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @cached_property
    def _boundaries(self) -> tuple[list[float], list[int], list[bool]]:
        """Per boundary k (before node k): transfer time, activation bytes in, and whether it may be cut."""
        n = self.num_nodes
        fwd_bytes, fwd_count, grad_bytes, grad_count, opaque = ([0] * (n + 1) for _ in range(5))
        for v in self.values:
            for k in range(v.producer + 1, min(v.last_use, n) + 1):
                if k >= n:
                    break
                fwd_bytes[k] += v.forward_bytes
                fwd_count[k] += 1 if v.forward_bytes else 0
                grad_bytes[k] += v.grad_bytes
                grad_count[k] += 1 if v.grad_bytes else 0
                opaque[k] += 1 if v.opaque else 0
        comm_ms = [self.device.transfer_ms(fwd_bytes[k], fwd_count[k]) +
                   self.device.transfer_ms(grad_bytes[k], grad_count[k]) for k in range(n + 1)]
        cuttable = [opaque[k] == 0 for k in range(n + 1)]
        return comm_ms, fwd_bytes, cuttable

    def comm_ms(self, boundary: int) -> float:
        return self._boundaries[0][boundary]

    def activation_bytes(self, boundary: int) -> int:
        return self._boundaries[1][boundary]

    def cuttable(self, boundary: int) -> bool:
        return self._boundaries[2][boundary]

    def stage_cost_ms(self, start: int, stop: int) -> float:
        """Cost of one stage holding nodes [start, stop): compute plus traffic at both ends."""
        if not (self.cuttable(start) and self.cuttable(stop)):
            return INF
        return sum(self.node_ms[start:stop]) + self.comm_ms(start) + self.comm_ms(stop)

    def stage_param_bytes(self, start: int, stop: int) -> int:
        names = {name for params in self.node_params[start:stop] for name in params}
        return sum(self.param_bytes.get(name, 0) for name in names)

    def stage_memory_bytes(self, start: int, stop: int, in_flight: int) -> int:
        """Weights and their grads, plus `in_flight` micro-batches of saved and received activations."""
        activations = sum(self.saved_bytes[start:stop]) + self.activation_bytes(start)
        return 2 * self.stage_param_bytes(start, stop) + in_flight * activations


def partition_problem(captured: Captured, costs: CostTable) -> PartitionProblem:
    """Reduce the captured graph and its costs to a PartitionProblem."""
    gm = captured.graph_module
    nodes = compute_nodes(gm)
    index = {node.name: i for i, node in enumerate(nodes)}
    needs_grad = grad_nodes(gm)
    values = tuple(_cut_value(node, i, index, needs_grad, len(nodes)) for i, node in enumerate(nodes))
    return PartitionProblem(
        node_names=tuple(n.name for n in nodes),
        node_ms=tuple(costs[n.name].total_ms for n in nodes),
        saved_bytes=tuple(costs[n.name].saved_bytes for n in nodes),
        node_params=tuple(costs[n.name].param_names for n in nodes),
        param_bytes=dict(costs.param_bytes),
        values=tuple(v for v in values if v.last_use > v.producer),
        device=costs.device,
    )


def _cut_value(node: fx.Node, producer: int, index: Mapping[str, int], needs_grad: set[str],
               num_nodes: int) -> CutValue:
    last_use = max((index.get(user.name, num_nodes) for user in node.users), default=producer)
    kind = value_kind(node)
    size = tensor_bytes(node) if kind is ValueKind.TENSOR else 0
    return CutValue(producer, last_use, size, size if node.name in needs_grad else 0, kind is ValueKind.OPAQUE)


def partition(captured: Captured, costs: CostTable, *, num_stages: int,
              max_memory_bytes: int | None = None, in_flight: InFlight = lambda stage: 1) -> Partition:
    """Assign each compute node to one of `num_stages` contiguous stages so that the slowest stage
    (compute + traffic across its cuts) is as fast as possible, within the memory limit. Deterministic."""
    problem = partition_problem(captured, costs)
    cuts, bottleneck = solve(problem, num_stages, max_memory_bytes=max_memory_bytes, in_flight=in_flight)
    bounds = [0, *cuts, problem.num_nodes]
    stage_of = {name: s for s in range(num_stages) for name in problem.node_names[bounds[s]:bounds[s + 1]]}
    return Partition(num_stages=num_stages, stage_of=stage_of, bottleneck_ms=bottleneck)


def solve(problem: PartitionProblem, num_stages: int, *, max_memory_bytes: int | None = None,
          in_flight: InFlight = lambda stage: 1) -> tuple[list[int], float]:
    """The inner cut positions (num_stages - 1 of them) of an optimal partition, and its bottleneck."""
    n = problem.num_nodes
    if num_stages < 1:
        raise PartitionError(f"num_stages={num_stages}; it must be at least 1.")
    if num_stages > n:
        raise PartitionError(
            f"num_stages={num_stages} but the graph has only {n} compute nodes, and every stage needs one.\n"
            f"Use num_stages <= {n}, or a deeper model."
        )
    tables = _VectorTables(problem)
    limit = max_memory_bytes

    def cost(stop: int, stage: int) -> torch.Tensor:
        value = tables.cost_ms(stop)
        if limit is not None:
            value = torch.where(tables.memory_bytes(stop, in_flight(stage)) > limit, INF, value)
        return value

    cuts, bottleneck = _minmax(n, num_stages, cost)
    if bottleneck == INF:
        raise _infeasible(problem, tables, num_stages, limit, in_flight)
    return cuts, bottleneck


def _minmax(n: int, num_stages: int, cost: Callable[[int, int], torch.Tensor]) -> tuple[list[int], float]:
    """min over cuts 0 < c1 < ... < c_{p-1} < n of max over stages of cost(stop, stage)[start]."""
    best = torch.full((num_stages, n + 1), INF, dtype=torch.float64)
    choice = torch.zeros((num_stages, n + 1), dtype=torch.long)
    for stop in range(1, n + 1):
        for stage in range(min(num_stages, stop)):
            stage_cost = cost(stop, stage)  # indexed by start, length stop
            if stage == 0:
                best[0, stop] = stage_cost[0]
                continue
            candidates = torch.maximum(best[stage - 1, :stop], stage_cost)
            candidates[:stage] = INF  # earlier stages need one node each
            start = int(torch.argmin(candidates))  # first minimum: ties go to the earliest cut
            best[stage, stop] = candidates[start]
            choice[stage, stop] = start
    cuts: list[int] = []
    stop = n
    for stage in range(num_stages - 1, 0, -1):
        stop = int(choice[stage, stop])
        cuts.append(stop)
    return cuts[::-1], float(best[num_stages - 1, n])


class _VectorTables:
    """Vector forms of PartitionProblem.stage_cost_ms / stage_memory_bytes over every start at once."""

    def __init__(self, problem: PartitionProblem) -> None:
        n = problem.num_nodes
        self.problem = problem
        self.time_prefix = _prefix(problem.node_ms)
        self.saved_prefix = _prefix(problem.saved_bytes)
        self.comm = torch.tensor([problem.comm_ms(k) for k in range(n + 1)], dtype=torch.float64)
        self.activation = torch.tensor([problem.activation_bytes(k) for k in range(n + 1)], dtype=torch.float64)
        self.blocked = torch.tensor([not problem.cuttable(k) for k in range(n + 1)])
        uses: dict[str, list[int]] = {}
        for i, params in enumerate(problem.node_params):
            for name in dict.fromkeys(params):
                uses.setdefault(name, []).append(i)
        single = [0.0] * n
        self.shared_uses: list[tuple[int, list[int]]] = []
        for name, where in uses.items():
            size = problem.param_bytes.get(name, 0)
            if len(where) == 1:
                single[where[0]] += size
            else:
                self.shared_uses.append((size, where))
        self.single_param_prefix = _prefix(single)

    def cost_ms(self, stop: int) -> torch.Tensor:
        value = self.time_prefix[stop] - self.time_prefix[:stop] + self.comm[:stop] + self.comm[stop]
        if self.blocked[stop]:
            return torch.full_like(value, INF)
        return torch.where(self.blocked[:stop], INF, value)

    def param_bytes(self, stop: int) -> torch.Tensor:
        value = self.single_param_prefix[stop] - self.single_param_prefix[:stop]
        if self.shared_uses:
            # A parameter read at several nodes counts once per stage: it is in [start, stop)
            # exactly when its last use before `stop` is at or after `start`.
            last_use_hist = torch.zeros(stop + 1, dtype=torch.float64)
            for size, where in self.shared_uses:
                k = bisect.bisect_left(where, stop) - 1
                if k >= 0:
                    last_use_hist[where[k]] += size
            value = value + torch.flip(torch.cumsum(torch.flip(last_use_hist, [0]), 0), [0])[:stop]
        return value

    def memory_bytes(self, stop: int, in_flight: int) -> torch.Tensor:
        activations = self.saved_prefix[stop] - self.saved_prefix[:stop] + self.activation[:stop]
        return 2 * self.param_bytes(stop) + in_flight * activations


def _prefix(values: Sequence[float]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.tensor(values, dtype=torch.float64), 0)])


def _infeasible(problem: PartitionProblem, tables: _VectorTables, num_stages: int, limit: int | None,
                in_flight: InFlight) -> PartitionError:
    """Why no partition exists: too few cuttable boundaries, or (with enough of them) the memory limit."""
    inner = [k for k in range(1, problem.num_nodes) if problem.cuttable(k)]
    if len(inner) < num_stages - 1:
        return PartitionError(
            f"no way to cut the graph into {num_stages} stages: only {len(inner)} of its {problem.num_nodes - 1} "
            "boundaries can be cut (the values crossing the others are tuples or objects, which cannot be sent).\n"
            f"Use num_stages <= {len(inner) + 1}."
        )
    assert limit is not None, "a cuttable partition exists, so only the memory limit can rule it out"
    cuts, smallest = _minmax(problem.num_nodes, num_stages,
                             lambda stop, stage: torch.where(tables.cost_ms(stop) == INF, INF,
                                                             tables.memory_bytes(stop, in_flight(stage))))
    err = PartitionError(
        f"no partition into {num_stages} stages fits max_memory_bytes={limit} ({format_bytes(limit)}); "
        f"the smallest feasible limit is {int(smallest)} bytes ({format_bytes(smallest)}).\n"
        "Raise max_memory_bytes to at least that, use more stages, or a schedule with fewer micro-batches "
        "in flight (1f1b holds at most num_stages, gpipe all of them)."
    )
    err.add_note(_memory_table(problem, cuts, limit, in_flight))
    return err


def _memory_table(problem: PartitionProblem, cuts: Sequence[int], limit: int, in_flight: InFlight) -> str:
    """Per stage of the least-memory partition: its nodes and bytes, `<-- here` on the largest."""
    bounds = [0, *cuts, problem.num_nodes]
    rows = []
    for s, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        held = in_flight(s)
        weights = 2 * problem.stage_param_bytes(start, stop)  # the weights and their gradients
        total = problem.stage_memory_bytes(start, stop, held)
        rows.append((total, f"stage {s}: {problem.node_names[start]}..{problem.node_names[stop - 1]}, "
                            f"{format_bytes(total)} = weights+grads {format_bytes(weights)} + {held} in flight "
                            f"x {format_bytes((total - weights) / held)} activations"))
    peak = max(row[0] for row in rows)
    lines = [f"the partition needing the least memory (limit {format_bytes(limit)}):"]
    lines += [text + ("  <-- here" if size == peak else "") for size, text in rows]
    return "\n".join(lines)


def check_partition(captured: Captured, partition: Partition) -> None:
    """Raise PartitionError unless every compute node has one stage, values only flow forward,
    and stages are contiguous, non-empty ranges in graph order."""
    nodes = compute_nodes(captured.graph_module)
    stage_of = partition.stage_of
    missing = [n.name for n in nodes if n.name not in stage_of]
    if missing:
        raise PartitionError(f"partition leaves {len(missing)} of {len(nodes)} compute nodes without a stage, "
                             f"first {missing[0]}.\nEvery compute node needs a stage.")
    for node in nodes:
        if not 0 <= stage_of[node.name] < partition.num_stages:
            raise PartitionError(f"node {node.name} is on stage {stage_of[node.name]}, outside 0..{partition.num_stages - 1}.")
    for node in nodes:
        for user in node.users:
            if user.name in stage_of and stage_of[user.name] < stage_of[node.name]:
                raise PartitionError(
                    f"value {node.name} (stage {stage_of[node.name]}) flows backwards to {user.name} "
                    f"(stage {stage_of[user.name]}).\nA value may only be read on its own stage or a later one."
                )
    for prev, node in zip(nodes, nodes[1:]):
        if stage_of[node.name] < stage_of[prev.name]:
            raise PartitionError(
                f"stages are not contiguous in graph order: {node.name} (stage {stage_of[node.name]}) comes after "
                f"{prev.name} (stage {stage_of[prev.name]}).\nEach stage must be one range of consecutive nodes."
            )
    empty = sorted(set(range(partition.num_stages)) - {stage_of[n.name] for n in nodes})
    if empty:
        raise PartitionError(f"stages {empty} of {partition.num_stages} hold no compute node.\n"
                             "Every stage needs at least one node.")
