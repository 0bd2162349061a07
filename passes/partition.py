"""Partition: node -> stage, minimising the slowest stage, exactly along one topological order.

A stage is a contiguous range [i, j) of compute nodes in a topological order. Which order is
`pipecc.passes.order`'s choice: the graph's own unless another has a strictly lower bottleneck (on
small graphs the best over all topological orders, found exactly), after which the pipeline
reorders the graph so that stages are contiguous in graph order. Along one order, a stage's cost
is its F+B+W compute, divided by the speed of the rank it runs on, plus the time to move every
value that crosses its two boundaries (activations forward, their gradients backward) over
the link to the neighbouring stage's rank; a boundary between two stages on the same rank
costs nothing. A value that skips stages is relayed by every stage in between, so it is
charged on every boundary it crosses. The min-max over all ways to cut the order into
`num_stages` ranges is found by dynamic programming, O(num_stages * N^2) work done as
N*num_stages vector operations; `pipecc.passes.coarsen` shrinks N first on large graphs.

Placement (`stage_to_rank`, e.g. (0, 1, 1, 0) for a V-shaped schedule): the objective stays
the slowest *stage*, each timed on its own rank. Interleaved and V schedules (Narayanan et al.
2021, section 2.2; Qi et al. 2024, ZB-V) reach their bubble only when every chunk takes the
same time, and a rank's busy time per micro-batch is then its number of stages times the
bottleneck; the per-stage objective keeps the DP exact, where the sum over a rank's
non-adjacent stages would need the DP to remember every open rank's load. When the stages come
out unequal, the rank sums do too: `pipecc.passes.rank_balance` then moves the cuts to lower the
largest rank sum (a local search from the DP's cuts, never worse than them by that measure), and
`partition_candidates` offers both for compile_plan to simulate. The memory limit
is per rank: each rank's limit is split into per-stage caps (equally, and in proportion to the
micro-batches each stage holds; the better result is kept), so a plan never exceeds a rank's
limit, but with several stages per rank under a tight limit a feasible partition can be missed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import fx

from pipecc.cluster import Cluster, LinkSpec
from pipecc.costs import CostTable, DeviceSpec
from pipecc.errors import ConfigError, PartitionError
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
class StagePlace:
    """Where one stage runs: its rank, that rank's speed, and the links to the previous and next
    stage's ranks (None where that stage is on the same rank, or there is none: nothing is sent)."""

    rank: int
    speed: float
    link_in: LinkSpec | None
    link_out: LinkSpec | None


def place_stages(device: DeviceSpec, num_stages: int, stage_to_rank: Sequence[int] | None = None,
                 cluster: Cluster | None = None) -> tuple[StagePlace, ...]:
    """Each stage's StagePlace; one stage per rank on identical ranks by default.

    >>> [p.link_in is None for p in place_stages(DeviceSpec.preset("cpu"), 4, (0, 1, 1, 0))]
    [True, False, True, False]
    """
    placed = tuple(range(num_stages)) if stage_to_rank is None else tuple(stage_to_rank)
    if len(placed) != num_stages or not all(isinstance(r, int) and r >= 0 for r in placed):
        raise ConfigError(f"stage_to_rank={placed!r} must give a rank (an int >= 0) for each of the "
                          f"{num_stages} stages.\nPass one rank per stage, e.g. {tuple(range(num_stages))}.")
    num_ranks = max(placed) + 1
    missing = sorted(set(range(num_ranks)) - set(placed))
    if missing:
        raise ConfigError(f"stage_to_rank={placed} leaves ranks {missing} without a stage.\n"
                          f"Number the ranks 0..{len(set(placed)) - 1} and give each at least one stage.")
    cluster = Cluster.uniform(num_ranks) if cluster is None else cluster
    if cluster.num_ranks != num_ranks:
        raise ConfigError(f"the cluster describes {cluster.num_ranks} ranks but the schedule places its "
                          f"{num_stages} stages on {num_ranks}.\nDescribe exactly {num_ranks} ranks, or change "
                          "num_stages or the schedule.")
    default = LinkSpec.of(device)

    def link(a: int, b: int) -> LinkSpec | None:
        if not (0 <= a < num_stages and 0 <= b < num_stages) or placed[a] == placed[b]:
            return None
        return cluster.link(placed[a], placed[b], default)

    return tuple(StagePlace(r, cluster.ranks[r].speed, link(s - 1, s), link(s, s + 1)) for s, r in enumerate(placed))


@dataclass(frozen=True)
class Traffic:
    """Per boundary k (before node k, k = 0..N): what crosses it, summed over the values crossing."""

    forward_bytes: np.ndarray
    forward_messages: np.ndarray
    grad_bytes: np.ndarray
    grad_messages: np.ndarray
    cuttable: np.ndarray  # bool: no opaque value crosses it

    def at(self, boundaries: np.ndarray) -> Traffic:
        """The traffic at the given boundaries only, in their order."""
        return Traffic(self.forward_bytes[boundaries], self.forward_messages[boundaries], self.grad_bytes[boundaries],
                       self.grad_messages[boundaries], self.cuttable[boundaries])

    def forward_ms(self, boundary: int, link: LinkSpec | None) -> float:
        """Time to send the activations crossing `boundary` over `link` (0 for None: same rank)."""
        if link is None:
            return 0.0
        return link.transfer_ms(float(self.forward_bytes[boundary]), float(self.forward_messages[boundary]))

    def backward_ms(self, boundary: int, link: LinkSpec | None) -> float:
        """Time to send their gradients back over `link` (0 for None: same rank)."""
        if link is None:
            return 0.0
        return link.transfer_ms(float(self.grad_bytes[boundary]), float(self.grad_messages[boundary]))

    def transfer_ms(self, link: LinkSpec | None) -> np.ndarray:
        """Per boundary, activations forward plus gradients back over `link` (zeros for None)."""
        if link is None:
            return np.zeros(len(self.cuttable))
        return (link.transfer_ms(self.forward_bytes, self.forward_messages)
                + link.transfer_ms(self.grad_bytes, self.grad_messages))


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
    # A coarsened problem carries its boundaries' traffic from the original one (which is where
    # its values live) instead of rebuilding every value: see pipecc.passes.coarsen.
    boundary_traffic: Traffic | None = field(default=None, compare=False, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @cached_property
    def traffic(self) -> Traffic:
        """Boundary sums by difference arrays: O(N + values), however far each value skips."""
        if self.boundary_traffic is not None:
            return self.boundary_traffic
        n = self.num_nodes
        columns = np.zeros((5, n + 2), dtype=np.float64)
        if self.values:
            v = np.array([(x.producer, x.last_use, x.forward_bytes, x.grad_bytes, x.opaque) for x in self.values],
                         dtype=np.float64).reshape(-1, 5)
            first = v[:, 0].astype(np.int64) + 1
            last = np.minimum(v[:, 1].astype(np.int64), n - 1)  # boundary n (the graph output) is never cut
            keep = first <= last
            weights = np.stack([v[:, 2], v[:, 2] > 0, v[:, 3], v[:, 3] > 0, v[:, 4]])[:, keep]
            for row in range(5):
                np.add.at(columns[row], first[keep], weights[row])
                np.add.at(columns[row], last[keep] + 1, -weights[row])
        sums = np.cumsum(columns, axis=1)[:, :n + 1]
        return Traffic(sums[0], sums[1], sums[2], sums[3], sums[4] == 0)

    @cached_property
    def _default_comm_ms(self) -> np.ndarray:
        return self.traffic.transfer_ms(LinkSpec.of(self.device))

    def comm_ms(self, boundary: int) -> float:
        """Time to move what crosses `boundary` both ways over the device's link."""
        return float(self._default_comm_ms[boundary])

    def link_ms(self, boundary: int, link: LinkSpec | None) -> float:
        """Time to move what crosses `boundary` both ways over `link` (0 for None: same rank)."""
        return float(self.traffic.transfer_ms(link)[boundary])

    def activation_bytes(self, boundary: int) -> int:
        return int(self.traffic.forward_bytes[boundary])

    def cuttable(self, boundary: int) -> bool:
        return bool(self.traffic.cuttable[boundary])

    def stage_cost_ms(self, start: int, stop: int, place: StagePlace | None = None) -> float:
        """Cost of one stage holding nodes [start, stop): compute (at its rank's speed) plus traffic
        at both ends (over its links; the device's link for both when `place` is None)."""
        if not (self.cuttable(start) and self.cuttable(stop)):
            return INF
        compute = sum(self.node_ms[start:stop])
        if place is None:
            return compute + self.comm_ms(start) + self.comm_ms(stop)
        return compute / place.speed + self.link_ms(start, place.link_in) + self.link_ms(stop, place.link_out)

    def stage_param_bytes(self, start: int, stop: int) -> int:
        names = {name for params in self.node_params[start:stop] for name in params}
        return sum(self.param_bytes.get(name, 0) for name in names)

    def stage_memory_bytes(self, start: int, stop: int, in_flight: int) -> int:
        """Weights and their grads, plus `in_flight` micro-batches of saved and received activations."""
        activations = sum(self.saved_bytes[start:stop]) + self.activation_bytes(start)
        return 2 * self.stage_param_bytes(start, stop) + in_flight * activations


@dataclass(frozen=True)
class PartitionGraph:
    """The compute nodes in graph order, what each costs, what value it produces and which nodes read
    it, and which must come before it: what a PartitionProblem is built from, along any topological order.

    >>> g = PartitionGraph(("a", "b", "c"), (1.0, 2.0, 4.0), (0, 0, 0), ((), (), ()), {}, (8, 4, 4),
    ...                    (0, 0, 0), (False,) * 3, ((1, 2), (3,), (3,)), ((), (0,), (0,)), DeviceSpec.preset("cpu"))
    >>> [(v.producer, v.last_use, v.forward_bytes) for v in g.problem((0, 2, 1)).values]
    [(0, 2, 8), (1, 3, 4), (2, 3, 4)]
    """

    node_names: tuple[str, ...]
    node_ms: tuple[float, ...]  # F+B+W per node
    saved_bytes: tuple[int, ...]
    node_params: tuple[tuple[str, ...], ...]
    param_bytes: Mapping[str, int]
    value_bytes: tuple[int, ...]  # of each node's value: 0 unless a tensor
    grad_bytes: tuple[int, ...]  # of its gradient: 0 when none flows back through it
    opaque: tuple[bool, ...]  # not a tensor nor a constant: no boundary may cut it
    users: tuple[tuple[int, ...], ...]  # indices of the nodes reading each value; num_nodes: the graph output
    after: tuple[tuple[int, ...], ...]  # indices of the nodes each node must follow (its inputs, side effects)
    device: DeviceSpec

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    def problem(self, order: Sequence[int] | None = None) -> PartitionProblem:
        """The PartitionProblem along `order` (node indices, a topological order; default: graph order)."""
        n = self.num_nodes
        order = range(n) if order is None else order
        position = [0] * (n + 1)
        for p, i in enumerate(order):
            position[i] = p
        position[n] = n
        values = []
        for p, i in enumerate(order):
            last_use = max((position[u] for u in self.users[i]), default=p)
            if last_use > p:
                values.append(CutValue(p, last_use, self.value_bytes[i], self.grad_bytes[i], self.opaque[i]))
        return PartitionProblem(
            node_names=tuple(self.node_names[i] for i in order),
            node_ms=tuple(self.node_ms[i] for i in order),
            saved_bytes=tuple(self.saved_bytes[i] for i in order),
            node_params=tuple(self.node_params[i] for i in order),
            param_bytes=self.param_bytes,
            values=tuple(values),
            device=self.device,
        )


def partition_graph(captured: Captured, costs: CostTable) -> PartitionGraph:
    """The captured graph and its costs as a PartitionGraph. A node with side effects (an in-place
    update, an assert) keeps its place: it follows every node before it and precedes every node after."""
    gm = captured.graph_module
    nodes = compute_nodes(gm)
    n = len(nodes)
    index = {node.name: i for i, node in enumerate(nodes)}
    needs_grad = grad_nodes(gm)
    kinds = [value_kind(node) for node in nodes]
    sizes = [tensor_bytes(node) if kind is ValueKind.TENSOR else 0 for node, kind in zip(nodes, kinds)]
    return PartitionGraph(
        node_names=tuple(index),
        node_ms=tuple(costs[n.name].total_ms for n in nodes),
        saved_bytes=tuple(costs[n.name].saved_bytes for n in nodes),
        node_params=tuple(costs[n.name].param_names for n in nodes),
        param_bytes=dict(costs.param_bytes),
        value_bytes=tuple(sizes),
        grad_bytes=tuple(size if node.name in needs_grad else 0 for node, size in zip(nodes, sizes)),
        opaque=tuple(kind is ValueKind.OPAQUE for kind in kinds),
        users=tuple(tuple(index.get(user.name, n) for user in node.users) for node in nodes),
        after=_order_constraints(nodes, index),
        device=costs.device,
    )


def _order_constraints(nodes: Sequence[fx.Node], index: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
    """Per node, the nodes it must follow: its compute inputs; for a node with side effects, every node
    since the previous one with side effects; and after it, that node."""
    after: list[list[int]] = [[index[a.name] for a in node.all_input_nodes if a.name in index] for node in nodes]
    barrier, since = None, []
    for i, node in enumerate(nodes):
        if barrier is not None:
            after[i].append(barrier)
        if _has_side_effects(node):
            after[i].extend(since)
            barrier, since = i, []
        else:
            since.append(i)
    return tuple(tuple(dict.fromkeys(a)) for a in after)


def _has_side_effects(node: fx.Node) -> bool:
    """An op fx calls impure (random ops aside: pipecc seeds each dropout by its index), or an in-place method."""
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).endswith("__"):
        return True
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # torch before 2.6 has no impure_random, and calls no random op impure
        return node.is_impure()


def partition_problem(captured: Captured, costs: CostTable) -> PartitionProblem:
    """Reduce the captured graph and its costs to a PartitionProblem along the graph's order."""
    return partition_graph(captured, costs).problem()


STAGE_SLACKS = (0.1, 0.5, INF)  # bounds on stage growth that compile_plan tries; partition() alone uses the first


def partition(captured: Captured, costs: CostTable, *, num_stages: int,
              max_memory_bytes: int | None = None, in_flight: InFlight = lambda stage: 1,
              stage_to_rank: Sequence[int] | None = None, cluster: Cluster | None = None,
              stage_slack: float | None = STAGE_SLACKS[0]) -> Partition:
    """Assign each compute node to one of `num_stages` contiguous stages so that the slowest stage
    (compute at its rank's speed + traffic across its cuts) is as fast as possible, within each
    rank's memory. Stage s runs on rank `stage_to_rank[s]` (default: rank s) of `cluster`
    (default: identical ranks). Deterministic. Where a rank holds several stages, the cuts then
    move to lower the largest sum of a rank's stages, no stage growing more than `stage_slack`
    (a fraction) above the slowest (`pipecc.passes.rank_balance`, a local search; None: they stay).

    Stages are contiguous in the best topological order (`pipecc.passes.order`: the graph's own
    unless another is strictly better), not necessarily the graph's: `order.reorder(captured,
    order.order_by_stage(captured, partition))` makes them contiguous in the graph too."""
    return partition_candidates(captured, costs, num_stages=num_stages, max_memory_bytes=max_memory_bytes,
                                in_flight=in_flight, stage_to_rank=stage_to_rank, cluster=cluster,
                                stage_slacks=() if stage_slack is None else (stage_slack,))[-1]


def partition_candidates(captured: Captured, costs: CostTable, *, num_stages: int,
                         max_memory_bytes: int | None = None, in_flight: InFlight = lambda stage: 1,
                         stage_to_rank: Sequence[int] | None = None, cluster: Cluster | None = None,
                         stage_slacks: Sequence[float] = STAGE_SLACKS) -> tuple[Partition, ...]:
    """The min-max-stage partition of `partition`, then, where a rank holds several stages, the
    rank-balanced one under each bound in `stage_slacks`: the distinct ones, in that order. The
    largest rank sum never goes up along the tuple, but the step time need not follow it, so
    compile_plan simulates each and keeps the fastest."""
    from pipecc.passes.order import best_order  # order and rank_balance build on this module
    from pipecc.passes.rank_balance import RankBalance, balance_ranks_coarsened, rank_costs, several_stages_per_rank

    graph = partition_graph(captured, costs)
    best = best_order(graph, num_stages, max_memory_bytes=max_memory_bytes, in_flight=in_flight,
                      stage_to_rank=stage_to_rank, cluster=cluster)
    names = [graph.node_names[i] for i in best.order]

    def as_partition(cuts: Sequence[int], bottleneck_ms: float, max_rank_ms: float) -> Partition:
        bounds = [0, *cuts, graph.num_nodes]
        stage_of = {name: s for s in range(num_stages) for name in names[bounds[s]:bounds[s + 1]]}
        return Partition(num_stages=num_stages, stage_of=stage_of, bottleneck_ms=bottleneck_ms, max_rank_ms=max_rank_ms)

    if not several_stages_per_rank(stage_to_rank):
        return (as_partition(best.cuts, best.bottleneck_ms, best.bottleneck_ms),)
    problem = graph.problem(best.order)
    options = dict(max_memory_bytes=max_memory_bytes, in_flight=in_flight, stage_to_rank=stage_to_rank, cluster=cluster)
    found = [rank_costs(problem, best.cuts, **options)]  # type: ignore[arg-type]
    found += [balance_ranks_coarsened(problem, best.cuts, stage_slack=slack, **options)  # type: ignore[arg-type]
              for slack in stage_slacks]
    distinct: dict[tuple[int, ...], RankBalance] = {}
    for balanced in found:  # the first of equal cuts: the DP's, then the tightest bound's
        distinct.setdefault(balanced.cuts, balanced)
    return tuple(as_partition(b.cuts, b.bottleneck_ms, b.max_rank_ms) for b in distinct.values())


def solve(problem: PartitionProblem, num_stages: int, *, max_memory_bytes: int | None = None,
          in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
          cluster: Cluster | None = None) -> tuple[list[int], float]:
    """The inner cut positions (num_stages - 1 of them) of an optimal partition, and its bottleneck."""
    n = problem.num_nodes
    if num_stages < 1:
        raise PartitionError(f"num_stages={num_stages}; it must be at least 1.")
    if num_stages > n:
        raise PartitionError(
            f"num_stages={num_stages} but the graph has only {n} compute nodes, and every stage needs one.\n"
            f"Use num_stages <= {n}, or a deeper model."
        )
    places = place_stages(problem.device, num_stages, stage_to_rank, cluster)
    limits = rank_memory_limits(places, cluster, max_memory_bytes)
    tables = StageTables(problem, places, [in_flight(s) for s in range(num_stages)])
    best = minmax_over_caps(n, num_stages, tables.cost_ms, stage_memory_caps(places, limits, in_flight))
    if best[1] == INF:
        raise _infeasible(problem, tables, places, limits, in_flight)
    return best


def rank_memory_limits(places: Sequence[StagePlace], cluster: Cluster | None,
                       max_memory_bytes: int | None) -> tuple[int | None, ...]:
    """Per rank, the bytes it may hold: its capacity in `cluster` and at most `max_memory_bytes`."""
    num_ranks = max(p.rank for p in places) + 1
    if cluster is None:
        return (max_memory_bytes,) * num_ranks
    return tuple(cluster.memory_limit(r, max_memory_bytes) for r in range(num_ranks))


def stage_memory_caps(places: Sequence[StagePlace], limits: Sequence[int | None],
                      in_flight: InFlight) -> list[tuple[int | None, ...]]:
    """Ways to split each rank's limit among its stages (caps summing to at most the limit): equal
    shares, and shares in proportion to the micro-batches each stage holds. One stage per rank: its limit."""
    by_rank: dict[int, list[int]] = {}
    for s, place in enumerate(places):
        by_rank.setdefault(place.rank, []).append(s)

    def split(weight: Callable[[int], int]) -> tuple[int | None, ...]:
        caps: list[int | None] = [None] * len(places)
        for rank, stages in by_rank.items():
            limit = limits[rank]
            if limit is not None:
                total = sum(weight(s) for s in stages)
                for s in stages:
                    caps[s] = limit * weight(s) // total
        return tuple(caps)

    return list(dict.fromkeys([split(lambda s: 1), split(in_flight)]))


StageCosts = Callable[[int, Sequence[int | None]], np.ndarray]  # (stop, per-stage memory caps) -> (stages, stop)


def minmax_over_caps(n: int, num_stages: int, cost_ms: StageCosts,
                     caps_options: Sequence[Sequence[int | None]]) -> tuple[list[int], float]:
    """The best `_minmax` over ways to split the memory limits into per-stage caps (the first on ties)."""
    best: tuple[list[int], float] = ([], INF)
    for caps in caps_options:
        result = _minmax(n, num_stages, lambda stop, caps=caps: cost_ms(stop, caps))
        if result[1] < best[1]:
            best = result
    return best


def _minmax(n: int, num_stages: int, cost: Callable[[int], np.ndarray]) -> tuple[list[int], float]:
    """min over cuts 0 < c1 < ... < c_{p-1} < n of max over stages s of cost(stop)[s, start].

    `cost(stop)` gives every stage's cost of the range [start, stop) at once, shape (stages, stop),
    so each `stop` is a handful of numpy operations whatever the number of stages (numpy, not
    torch: at these sizes the per-call overhead is the cost, and numpy's is several times lower)."""
    best = np.full((num_stages, n + 1), INF)
    choice = np.zeros((num_stages, n + 1), dtype=np.int64)
    later_stage = np.arange(1, num_stages)[:, None]
    rows = np.arange(num_stages - 1)
    for stop in range(1, n + 1):
        stage_cost = cost(stop)
        best[0, stop] = stage_cost[0, 0]
        if num_stages > 1:
            candidates = np.maximum(best[:-1, :stop], stage_cost[1:])
            candidates[np.arange(stop) < later_stage] = INF  # earlier stages need one node each
            starts = np.argmin(candidates, axis=1)  # the first minimum: ties go to the earliest cut
            best[1:, stop] = candidates[rows, starts]
            choice[1:, stop] = starts
    cuts: list[int] = []
    stop = n
    for stage in range(num_stages - 1, 0, -1):
        stop = int(choice[stage, stop])
        cuts.append(stop)
    return cuts[::-1], float(best[num_stages - 1, n])


class StageTables:
    """Vector forms of PartitionProblem.stage_cost_ms / stage_memory_bytes for every stage and start at once."""

    def __init__(self, problem: PartitionProblem, places: Sequence[StagePlace], in_flight: Sequence[int]) -> None:
        self.problem = problem
        traffic = problem.traffic
        self.time_prefix = _prefix(problem.node_ms)
        self.saved_prefix = _prefix(problem.saved_bytes)
        self.activation = traffic.forward_bytes
        self.blocked = ~traffic.cuttable
        self.inverse_speed, self.link_in_ms, self.link_out_ms = stage_link_ms(places, traffic)
        self.in_flight = np.array([[float(k)] for k in in_flight])
        single, self.shared_uses = split_params(problem.node_params, problem.param_bytes)
        self.single_param_prefix = _prefix(single)

    def cost_ms(self, stop: int, caps: Sequence[int | None]) -> np.ndarray:
        """(stages, stop): the time of [start, stop) as each stage; INF where it cannot be cut or
        does not fit that stage's memory cap."""
        compute = (self.time_prefix[stop] - self.time_prefix[:stop]) * self.inverse_speed
        value = compute + self.link_in_ms[:, :stop] + self.link_out_ms[:, stop:stop + 1]
        value[:, self.unusable_starts(stop)] = INF
        if any(cap is not None for cap in caps):
            limit = np.array([[INF if cap is None else float(cap)] for cap in caps])
            value[self.memory_bytes(stop) > limit] = INF
        return value

    def unusable_starts(self, stop: int) -> np.ndarray:
        """(stop,) bool: the starts from which no stage may reach `stop` (a boundary that cannot be cut)."""
        return self.blocked[:stop] | self.blocked[stop]

    def param_bytes(self, stop: int) -> np.ndarray:
        value = self.single_param_prefix[stop] - self.single_param_prefix[:stop]
        if self.shared_uses:
            # A parameter read at several nodes counts once per stage: it is in [start, stop)
            # exactly when its last use before `stop` is at or after `start`.
            last_use_hist = np.zeros(stop + 1)
            for size, where in self.shared_uses:
                k = bisect.bisect_left(where, stop) - 1
                if k >= 0:
                    last_use_hist[where[k]] += size
            value = value + np.cumsum(last_use_hist[::-1])[::-1][:stop]
        return value

    def memory_bytes(self, stop: int) -> np.ndarray:
        """(stages, stop): weights and grads plus each stage's in-flight activations of [start, stop)."""
        activations = self.saved_prefix[stop] - self.saved_prefix[:stop] + self.activation[:stop]
        return 2 * self.param_bytes(stop) + self.in_flight * activations


def stage_link_ms(places: Sequence[StagePlace], traffic: Traffic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stage, 1 / its rank's speed (stages, 1), and the time to move what crosses each boundary over
    its link in and its link out (stages, boundaries)."""
    link_ms = {link: traffic.transfer_ms(link) for p in places for link in (p.link_in, p.link_out)}
    return (np.array([[1.0 / p.speed] for p in places]), np.stack([link_ms[p.link_in] for p in places]),
            np.stack([link_ms[p.link_out] for p in places]))


def split_params(node_params: Sequence[Sequence[str]],
                 param_bytes: Mapping[str, int]) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """Per node, the bytes of the parameters it alone reads; and (bytes, reading nodes) of each parameter
    several nodes read, which a stage holds once however many of its nodes read it."""
    uses: dict[str, list[int]] = {}
    for i, params in enumerate(node_params):
        for name in dict.fromkeys(params):
            uses.setdefault(name, []).append(i)
    single = np.zeros(len(node_params))
    shared: list[tuple[int, list[int]]] = []
    for name, where in uses.items():
        size = param_bytes.get(name, 0)
        if len(where) == 1:
            single[where[0]] += size
        else:
            shared.append((size, where))
    return single, shared


def _prefix(values: Sequence[float]) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])


def _infeasible(problem: PartitionProblem, tables: StageTables, places: Sequence[StagePlace],
                limits: Sequence[int | None], in_flight: InFlight) -> PartitionError:
    """Why no partition exists: too few cuttable boundaries, or (with enough of them) the memory limits."""
    num_stages = len(places)
    inner = [k for k in range(1, problem.num_nodes) if problem.cuttable(k)]
    if len(inner) < num_stages - 1:
        return PartitionError(
            f"no way to cut the graph into {num_stages} stages: only {len(inner)} of its {problem.num_nodes - 1} "
            "boundaries can be cut (the values crossing the others are tuples or objects, which cannot be sent).\n"
            f"Use num_stages <= {len(inner) + 1}."
        )
    assert any(x is not None for x in limits), "a cuttable partition exists, so only a memory limit can rule it out"
    cuts, smallest = _minmax(problem.num_nodes, num_stages,
                             lambda stop: np.where(tables.blocked[:stop] | tables.blocked[stop], INF,
                                                   tables.memory_bytes(stop)))
    one_per_rank = len({p.rank for p in places}) == num_stages
    if one_per_rank and len(set(limits)) == 1:
        limit = limits[0]
        err = PartitionError(
            f"no partition into {num_stages} stages fits max_memory_bytes={limit} ({format_bytes(limit)}); "
            f"the smallest feasible limit is {int(smallest)} bytes ({format_bytes(smallest)}).\n"
            "Raise max_memory_bytes to at least that, use more stages, or a schedule with fewer micro-batches "
            "in flight (1f1b holds at most num_stages, gpipe all of them)."
        )
    else:
        shown = ", ".join(f"rank {r}: {'no limit' if x is None else format_bytes(x)}" for r, x in enumerate(limits))
        err = PartitionError(
            f"no partition into {num_stages} stages on {len(limits)} ranks fits their memory ({shown}); "
            f"the least-memory partition needs {format_bytes(smallest)} for its largest stage.\n"
            "Raise the ranks' memory limits, use more stages or ranks, or a schedule with fewer micro-batches "
            "in flight (1f1b holds at most num_stages, gpipe all of them)."
        )
    err.add_note(_memory_table(problem, cuts, places, limits, in_flight))
    return err


def _memory_table(problem: PartitionProblem, cuts: Sequence[int], places: Sequence[StagePlace],
                  limits: Sequence[int | None], in_flight: InFlight) -> str:
    """Per stage of the least-memory partition: its nodes and bytes, `<-- here` on the largest."""
    bounds = [0, *cuts, problem.num_nodes]
    rows = []
    for s, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        held = in_flight(s)
        weights = 2 * problem.stage_param_bytes(start, stop)  # the weights and their gradients
        total = problem.stage_memory_bytes(start, stop, held)
        rank = places[s].rank
        rows.append((total, f"stage {s} (rank {rank}): {problem.node_names[start]}..{problem.node_names[stop - 1]}, "
                            f"{format_bytes(total)} = weights+grads {format_bytes(weights)} + {held} in flight "
                            f"x {format_bytes((total - weights) / held)} activations"))
    peak = max(row[0] for row in rows)
    shown = ", ".join("none" if x is None else format_bytes(x) for x in limits)
    lines = [f"the partition needing the least memory (rank limits {shown}):"]
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
