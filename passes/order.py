"""Order: the topological order of the compute nodes that the partitioner cuts into stages.

A stage is a contiguous range of one topological order, and which order matters on a branchy graph
(inception blocks, two towers, U-Net skips): the graph's own order may interleave two branches so
that every cut between them carries a large tensor of one while the other runs. What a partition
costs depends only on its stages' node sets: the nodes before each cut form a *downset* (closed
under inputs), and the boundary after a downset D carries every value produced in D and read
outside it. So the best partition over all topological orders is the best chain of nested downsets
D_1 < D_2 < ... < D_{p-1}, each stage costed as in `PartitionProblem.stage_cost_ms`.

1. Exact, on graphs of at most MAX_DOWNSET_NODES nodes with at most MAX_DOWNSETS downsets
   (`downset_order`): enumerate the downsets, then run the partitioner's own min-max DP with
   downsets in place of positions (a stage goes from a downset to any strict superset). Its
   stages, concatenated and each in graph order, are an order whose partition is optimal over all
   topological orders (tests/test_order.py checks it against every order of small random graphs).
2. Otherwise (`candidate_orders`), a few orders that keep branches together: depth-first from the
   outputs (inputs in argument order; or the branch with the larger output last, so it need not
   wait across a cut), and greedy, the ready node that leaves the fewest bytes live; above
   MAX_DOWNSET_NODES only the second, to keep compile time linear. Not a proof.

`best_order` partitions along the graph's order and along each candidate (the same DP, options and
coarsening as any partition) and keeps the lowest bottleneck; the graph's order wins ties, so a graph
with a single topological order, or one where no other order helps, gives the very same plan.
`reorder` then rewrites the graph so that its order has the stages contiguous, which is what
split_stages and codegen read. A node with side effects keeps its place (see `partition_graph`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from torch import fx

from pipecc.cluster import Cluster
from pipecc.errors import PartitionError
from pipecc.ir import Captured, Partition
from pipecc.passes.coarsen import SMALL_GRAPH_NODES, solve_coarsened
from pipecc.passes.graph_facts import compute_nodes
from pipecc.passes.partition import (INF, InFlight, PartitionGraph, StagePlace, StageTables, Traffic, minmax_over_caps,
                                     place_stages, rank_memory_limits, split_params, stage_link_ms, stage_memory_caps)

log = logging.getLogger(__name__)

MAX_DOWNSET_NODES = SMALL_GRAPH_NODES  # where the partitioner itself is exact; above, candidate orders
MAX_DOWNSETS = 1024  # the downset DP is the partition DP on this many positions: about 0.1 s for 4 stages
RELATIVE_GAIN = 1e-9  # another order must beat the graph's by more than float round-off to be taken


@dataclass(frozen=True)
class OrderedCuts:
    """A topological order (node indices in a PartitionGraph), the cuts of its best partition, and how it was found."""

    order: tuple[int, ...]
    cuts: tuple[int, ...]
    bottleneck_ms: float
    method: str  # "graph order", "downsets", "depth-first", "depth-first, large outputs last", "greedy"


def best_order(graph: PartitionGraph, num_stages: int, *, max_memory_bytes: int | None = None,
               in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
               cluster: Cluster | None = None) -> OrderedCuts:
    """The order (the graph's unless another is strictly better) whose partition has the lowest bottleneck,
    with that partition's cuts. Raises the graph order's PartitionError when no order has a partition.

    >>> from pipecc.costs import DeviceSpec
    >>> g = PartitionGraph(("a", "b", "c"), (1.0, 1.0, 1.0), (0, 0, 0), ((), (), ()), {}, (0, 0, 0),
    ...                    (0, 0, 0), (False,) * 3, ((3,), (2,), (3,)), ((), (), (1,)), DeviceSpec.preset("cpu"))
    >>> best_order(g, 2).order  # c reads b; a is free to go anywhere, but no order is better, so none moves
    (0, 1, 2)
    """
    options = dict(max_memory_bytes=max_memory_bytes, in_flight=in_flight, stage_to_rank=stage_to_rank,
                   cluster=cluster)
    graph_order = tuple(range(graph.num_nodes))
    best: OrderedCuts | None = None
    try:
        cuts, bottleneck = solve_coarsened(graph.problem(), num_stages, **options)  # type: ignore[arg-type]
        best = OrderedCuts(graph_order, tuple(cuts), bottleneck, "graph order")
    except PartitionError as err:
        error = err
    if num_stages == 1 or has_one_order(graph):
        if best is None:
            raise error
        return best
    for method, order in candidate_orders(graph, num_stages, **options):  # type: ignore[arg-type]
        if order == graph_order:
            continue
        try:
            cuts, bottleneck = solve_coarsened(graph.problem(order), num_stages, **options)  # type: ignore[arg-type]
        except PartitionError:
            continue
        if best is None or bottleneck < best.bottleneck_ms * (1 - RELATIVE_GAIN):
            best = OrderedCuts(order, tuple(cuts), bottleneck, method)
    if best is None:
        raise error
    log.info("order: %s, bottleneck %.6f ms", best.method, best.bottleneck_ms)
    return best


def has_one_order(graph: PartitionGraph) -> bool:
    """Whether the graph's order is its only topological order: each node must follow the one before it."""
    return all(i - 1 in graph.after[i] for i in range(1, graph.num_nodes))


def candidate_orders(graph: PartitionGraph, num_stages: int, *, max_memory_bytes: int | None = None,
                     in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
                     cluster: Cluster | None = None) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(method, order) of the orders worth partitioning along: the exact downset order when the graph is
    small enough (nothing else can beat it), else depth-first and greedy orders (one of them on large graphs)."""
    if graph.num_nodes <= MAX_DOWNSET_NODES:
        exact = downset_order(graph, num_stages, max_memory_bytes=max_memory_bytes, in_flight=in_flight,
                              stage_to_rank=stage_to_rank, cluster=cluster)
        if exact is not None:
            yield "downsets", exact[0]
            return
        yield "depth-first", depth_first_order(graph)
        yield "greedy", greedy_order(graph)
    # Above the exact size each candidate costs a coarsened DP (0.15 s on the 48-layer GPT, 971 nodes),
    # so only the one that keeps a branch's large output from waiting across a cut is tried.
    yield "depth-first, large outputs last", depth_first_order(graph, large_outputs_last=True)


# ------------------------------------------------------------------------------------------- exact

def downsets(graph: PartitionGraph, max_count: int) -> list[int] | None:
    """Every downset as a bit mask over node indices, by size (the empty set first, all nodes last), or
    None when there are more than `max_count`.

    >>> from pipecc.costs import DeviceSpec
    >>> g = PartitionGraph(("a", "b", "c"), (1.0,) * 3, (0,) * 3, ((),) * 3, {}, (0,) * 3, (0,) * 3, (False,) * 3,
    ...                    ((1, 2), (3,), (3,)), ((), (0,), (0,)), DeviceSpec.preset("cpu"))
    >>> [bin(m) for m in downsets(g, max_count=10)]
    ['0b0', '0b1', '0b11', '0b101', '0b111']
    """
    n = graph.num_nodes
    needs = [sum(1 << j for j in after) for after in graph.after]
    followers: list[list[int]] = [[] for _ in range(n)]
    for i, after in enumerate(graph.after):
        for j in after:
            followers[j].append(i)
    found, seen = [0], {0}
    level = [(0, tuple(i for i in range(n) if not graph.after[i]))]
    while level:
        next_level = []
        for mask, ready in level:
            for v in ready:
                grown = mask | 1 << v
                if grown in seen:
                    continue
                seen.add(grown)
                found.append(grown)
                if len(found) > max_count:
                    return None
                now_ready = [w for w in followers[v] if needs[w] & ~grown == 0]
                next_level.append((grown, tuple(sorted([r for r in ready if r != v] + now_ready))))
        level = next_level
    return found


def downset_order(graph: PartitionGraph, num_stages: int, *, max_memory_bytes: int | None = None,
                  in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
                  cluster: Cluster | None = None,
                  max_downsets: int | None = None) -> tuple[tuple[int, ...], float] | None:
    """An order whose best partition is the best over every topological order, and that bottleneck: the
    stages of the best chain of downsets, each in graph order. None when there are more than
    `max_downsets` (default MAX_DOWNSETS) downsets, or no chain fits.

    >>> from pipecc.costs import DeviceSpec
    >>> g = PartitionGraph(("a", "b", "c"), (0.0, 1.0, 1.0), (0, 0, 0), ((), (), ()), {}, (0, 8 << 20, 0),
    ...                    (0, 0, 0), (False,) * 3, ((1, 2), (3,), (3,)), ((), (0,), (0,)), DeviceSpec.preset("cpu"))
    >>> order, bottleneck = downset_order(g, 2)  # b's 8 MiB output would cross a cut between b and c
    >>> order, bottleneck
    ((0, 2, 1), 1.0)
    """
    masks = downsets(graph, MAX_DOWNSETS if max_downsets is None else max_downsets)
    if masks is None or len(masks) - 1 < num_stages:
        return None
    places = place_stages(graph.device, num_stages, stage_to_rank, cluster)
    tables = _DownsetTables(graph, masks, places, [in_flight(s) for s in range(num_stages)])
    limits = rank_memory_limits(places, cluster, max_memory_bytes)
    cuts, bottleneck = minmax_over_caps(len(masks) - 1, num_stages, tables.cost_ms,
                                        stage_memory_caps(places, limits, in_flight))
    if bottleneck == INF:
        return None
    chain = [0, *cuts, len(masks) - 1]
    member = tables.member
    order = tuple(int(i) for a, b in zip(chain, chain[1:]) for i in np.flatnonzero(member[b] & ~member[a]))
    return order, bottleneck


class _DownsetTables(StageTables):
    """partition.StageTables with downsets (in `downsets` order) in place of positions: each "prefix" is
    the sum over a downset, and a stage may go from any strict subset of `stop` to it."""

    def __init__(self, graph: PartitionGraph, masks: Sequence[int], places: Sequence[StagePlace],
                 in_flight: Sequence[int]) -> None:
        n = graph.num_nodes
        width = (n + 7) // 8
        packed = np.array([np.frombuffer(m.to_bytes(width, "little"), dtype=np.uint8) for m in masks])
        self.packed = packed.reshape(len(masks), width)
        self.member = np.unpackbits(self.packed, axis=1, count=n, bitorder="little").astype(bool)  # (K, n)
        traffic = self._traffic(graph)
        self.blocked = ~traffic.cuttable
        self.activation = traffic.forward_bytes
        self.time_prefix = self.member @ np.asarray(graph.node_ms, dtype=np.float64)
        self.saved_prefix = self.member @ np.asarray(graph.saved_bytes, dtype=np.float64)
        single, shared = split_params(graph.node_params, graph.param_bytes)
        self.single_param_prefix = self.member @ single
        self.shared_sizes = np.array([float(size) for size, _ in shared])
        self.shared_counts = (np.stack([self.member[:, where].sum(axis=1) for _, where in shared], axis=1)
                              if shared else np.zeros((len(masks), 0)))
        self.inverse_speed, self.link_in_ms, self.link_out_ms = stage_link_ms(places, traffic)
        self.in_flight = np.array([[float(k)] for k in in_flight])

    def _traffic(self, graph: PartitionGraph) -> Traffic:
        """What crosses the boundary after each downset: its values read outside it (none after all nodes)."""
        outside = np.concatenate([~self.member, np.ones((len(self.member), 1), dtype=bool)], axis=1)
        crossing = np.zeros_like(self.member)
        for v, users in enumerate(graph.users):
            if users:
                crossing[:, v] = self.member[:, v] & outside[:, list(users)].any(axis=1)
        crossing[-1] = False  # the last boundary, after every node, is never cut
        x = crossing.astype(np.float64)
        value_bytes = np.asarray(graph.value_bytes, dtype=np.float64)
        grad_bytes = np.asarray(graph.grad_bytes, dtype=np.float64)
        return Traffic(x @ value_bytes, x @ (value_bytes > 0), x @ grad_bytes, x @ (grad_bytes > 0),
                       x @ np.asarray(graph.opaque, dtype=np.float64) == 0)

    def unusable_starts(self, stop: int) -> np.ndarray:
        """Downsets that are not subsets of `stop`, or after which no boundary may be cut."""
        subset = np.all((self.packed[:stop] & ~self.packed[stop]) == 0, axis=1)
        return ~subset | super().unusable_starts(stop)

    def param_bytes(self, stop: int) -> np.ndarray:
        """Per earlier downset D, the parameters read in `stop` but not in D: a shared one when `stop`
        holds more of its readers than D does."""
        value = self.single_param_prefix[stop] - self.single_param_prefix[:stop]
        if len(self.shared_sizes):
            value = value + (self.shared_counts[stop] > self.shared_counts[:stop]) @ self.shared_sizes
        return value


# ------------------------------------------------------------------------------------- heuristics

def depth_first_order(graph: PartitionGraph, large_outputs_last: bool = False) -> tuple[int, ...]:
    """Each node right after the last of its inputs' subgraphs, from the graph's sinks in graph order;
    inputs in argument order, or (large_outputs_last) by the size of their value, largest last.

    >>> from pipecc.costs import DeviceSpec
    >>> g = PartitionGraph(("a", "b", "c", "d"), (1.0,) * 4, (0,) * 4, ((),) * 4, {}, (4, 8, 4, 4), (0,) * 4,
    ...                    (False,) * 4, ((2,), (3,), (3,), (4,)), ((), (), (0,), (1, 2)), DeviceSpec.preset("cpu"))
    >>> depth_first_order(g), depth_first_order(g, large_outputs_last=True)
    ((1, 0, 2, 3), (0, 2, 1, 3))
    """
    n = graph.num_nodes
    followed = {j for after in graph.after for j in after}
    done = [False] * n
    order: list[int] = []

    def inputs(i: int) -> list[int]:
        after = list(graph.after[i])
        return sorted(after, key=lambda j: graph.value_bytes[j]) if large_outputs_last else after

    for root in (i for i in range(n) if i not in followed):
        stack = [(root, iter(inputs(root)))]
        while stack:
            node, pending = stack[-1]
            nxt = next((j for j in pending if not done[j]), None)
            if nxt is None:
                stack.pop()
                if not done[node]:
                    done[node] = True
                    order.append(node)
            else:
                stack.append((nxt, iter(inputs(nxt))))
    return tuple(order)


def greedy_order(graph: PartitionGraph) -> tuple[int, ...]:
    """At each step the ready node that leaves the fewest bytes live (its value, less the inputs it is the
    last to read), the earliest in graph order on ties."""
    n = graph.num_nodes
    readers = [len({u for u in users if u < n}) for users in graph.users]
    to_output = [n in users for users in graph.users]
    waiting = [len(after) for after in graph.after]
    followers: list[list[int]] = [[] for _ in range(n)]
    for i, after in enumerate(graph.after):
        for j in after:
            followers[j].append(i)
    inputs = [[j for j in after if i in graph.users[j]] for i, after in enumerate(graph.after)]
    ready = {i for i in range(n) if waiting[i] == 0}
    order: list[int] = []

    def live_change(i: int) -> int:
        freed = sum(graph.value_bytes[j] for j in inputs[i] if readers[j] == 1 and not to_output[j])
        return graph.value_bytes[i] - freed

    while ready:
        node = min(ready, key=lambda i: (live_change(i), i))
        ready.remove(node)
        order.append(node)
        for j in inputs[node]:
            readers[j] -= 1
        for w in followers[node]:
            waiting[w] -= 1
            if waiting[w] == 0:
                ready.add(w)
    assert len(order) == n, "graph.after has a cycle"
    return tuple(order)


# ----------------------------------------------------------------------------- the graph, reordered

def order_by_stage(captured: Captured, partition: Partition) -> tuple[str, ...]:
    """The compute nodes by stage, each stage in graph order: the order `reorder` gives the graph."""
    nodes = compute_nodes(captured.graph_module)
    return tuple(n.name for n in sorted(nodes, key=lambda n: partition.stage_of[n.name]))


def reorder(captured: Captured, order: Sequence[str]) -> Captured:
    """`captured` with its compute nodes in `order` (a copy of the graph; itself when nothing moves).
    Placeholders and attributes stay first, in their order; node names and meta stay."""
    gm = captured.graph_module
    if [n.name for n in compute_nodes(gm)] == list(order):
        return captured
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for name in order:
        output.prepend(by_name[name])
    reordered = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    reordered.meta.update(gm.meta)
    reordered.recompile()
    return dataclasses.replace(captured, graph_module=reordered)


def check_order(captured: Captured, order: Sequence[str]) -> None:
    """Raise PartitionError unless `order` holds every compute node once and each after its inputs."""
    nodes = compute_nodes(captured.graph_module)
    names = {n.name for n in nodes}
    if sorted(order) != sorted(names):
        extra, missing = sorted(set(order) - names), sorted(names - set(order))
        raise PartitionError(f"the order has {len(order)} nodes for {len(nodes)} compute nodes (not in the graph: "
                             f"{extra[:3]}, missing: {missing[:3]}, or some twice).\nAn order lists each compute node once.")
    position = {name: i for i, name in enumerate(order)}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.name in position and position[arg.name] > position[node.name]:
                raise PartitionError(f"the order puts {node.name} (position {position[node.name]}) before its input "
                                     f"{arg.name} (position {position[arg.name]}).\nAn order is topological: "
                                     "every node after its inputs.")
