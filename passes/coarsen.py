"""Coarsen: shrink a PartitionProblem before the DP, so compile time grows about linearly.

The DP is O(num_stages * N^2) in the number of places a cut may go. Two reductions:

1. Exact (`exact_boundaries`): a boundary no value may cross (an opaque value crosses it)
   is never cut, so it goes. A boundary next to a *free* node (no time, no saved bytes, no
   parameters: views, getitem, size) goes when the boundary on the free node's other side
   carries no more traffic (bytes and messages, both directions) and can be cut: moving a
   cut across a free node changes neither stage's compute nor weights, and only lowers its
   traffic and received activations, on any link and at any speed. So every partition
   whose stages each hold a node that is not free has an equal-or-better partition on the
   kept boundaries, and the DP on the merged nodes finds the same bottleneck (property
   test: tests/test_coarsen.py). Not covered: an optimum that needs a stage made only of
   free nodes, which does no work; on graphs with more than SMALL_GRAPH_NODES nodes
   pipecc accepts that, below it the DP runs on the original graph.
2. Sampled (`sample_boundaries`), only when more than `max_dp_nodes` boundaries remain:
   the graph is cut into about max_dp_nodes/2 spans of equal time (and node count), each
   keeping its cheapest boundary (where the fewest bytes cross: between blocks, at
   articulation points of the residual stream). The DP solves that, then is solved again
   with every boundary near each chosen cut added back, until the cuts stop moving; each
   round keeps the last cuts, so the bottleneck never gets worse. This is a local search,
   not a proof: tests compare it with the exact DP, and the benchmark prints the gap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipecc.cluster import Cluster, LinkSpec
from pipecc.passes.partition import InFlight, PartitionProblem, solve

log = logging.getLogger(__name__)

SMALL_GRAPH_NODES = 256  # below this the DP on the original graph takes well under 0.1 s: no coarsening
MAX_DP_NODES = 1024  # about 0.3 s of DP for 8 stages on one core (benchmarks/compile_scaling.py)
MAX_REFINE_ROUNDS = 16  # each round moves a cut at most `window` boundaries; they settle in a few


@dataclass(frozen=True)
class Coarsening:
    """A PartitionProblem over groups of consecutive nodes, and where each group starts in the original."""

    problem: PartitionProblem  # one node per group
    starts: tuple[int, ...]  # index in the original problem of each group's first node

    def fine_cuts(self, cuts: Sequence[int]) -> list[int]:
        """Cut positions in the original problem for cut positions in the coarse one."""
        return [self.starts[c] for c in cuts]


def coarsen(problem: PartitionProblem, boundaries: Sequence[int] | np.ndarray) -> Coarsening:
    """Merge the nodes between consecutive kept `boundaries` (sorted, each in 1..N-1) into one node:
    times and saved bytes add up, parameters are the union, and each kept boundary keeps the traffic
    crossing it. Any partition cutting only at kept boundaries costs the same in both problems.

    >>> from pipecc.costs import DeviceSpec
    >>> p = PartitionProblem(("a", "b", "c"), (1.0, 2.0, 4.0), (0, 0, 0), ((), (), ()), {}, (), DeviceSpec.preset("cpu"))
    >>> c = coarsen(p, [2])
    >>> c.problem.node_names, c.problem.node_ms, c.starts
    (('a..b', 'c'), (3.0, 4.0), (0, 2))
    """
    n = problem.num_nodes
    starts = np.concatenate([[0], np.asarray(boundaries, dtype=np.int64)])
    assert np.all(np.diff(starts) > 0) and starts[-1] < n, "boundaries must be sorted, inside the graph"
    ends = np.append(starts[1:], n)
    group_of = np.cumsum(np.isin(np.arange(n), starts[1:]))
    names = tuple(problem.node_names[a] if b - a == 1 else f"{problem.node_names[a]}..{problem.node_names[b - 1]}"
                  for a, b in zip(starts.tolist(), ends.tolist()))
    params: list[dict[str, None]] = [{} for _ in starts]
    for i, node_params in enumerate(problem.node_params):
        if node_params:
            params[group_of[i]].update(dict.fromkeys(node_params))
    coarse = PartitionProblem(
        node_names=names,
        node_ms=tuple(np.add.reduceat(np.asarray(problem.node_ms, dtype=np.float64), starts).tolist()),
        saved_bytes=tuple(int(x) for x in np.add.reduceat(np.asarray(problem.saved_bytes, dtype=np.int64), starts)),
        node_params=tuple(tuple(p) for p in params),
        param_bytes=problem.param_bytes,
        values=(),  # a value crosses coarse boundary k exactly when it crosses original boundary starts[k]
        device=problem.device,
        boundary_traffic=problem.traffic.at(np.append(starts, n)),
    )
    return Coarsening(coarse, tuple(starts.tolist()))


def exact_boundaries(problem: PartitionProblem) -> np.ndarray:
    """The inner boundaries (1..N-1) worth cutting: cuttable, and not beaten by the boundary across
    a free neighbour (see the module docstring). Sorted."""
    n = problem.num_nodes
    traffic = problem.traffic
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    stats = np.stack([traffic.forward_bytes, traffic.forward_messages, traffic.grad_bytes, traffic.grad_messages])
    free = ((np.asarray(problem.node_ms) == 0) & (np.asarray(problem.saved_bytes) == 0)
            & np.array([not p for p in problem.node_params]))
    b = np.arange(1, n)
    cuttable = traffic.cuttable
    # towards b+1: node b is free and boundary b+1 carries no more (ties keep the later boundary)
    right = np.zeros(n - 1, dtype=bool)
    inner = b + 1 <= n - 1
    right[inner] = (cuttable[b[inner] + 1] & free[b[inner]]
                    & np.all(stats[:, b[inner] + 1] <= stats[:, b[inner]], axis=0))
    # towards b-1: node b-1 is free and boundary b-1 carries strictly less (so two boundaries never drop each other)
    left = np.zeros(n - 1, dtype=bool)
    inner = b - 1 >= 1
    lower, here = stats[:, b[inner] - 1], stats[:, b[inner]]
    left[inner] = (cuttable[b[inner] - 1] & free[b[inner] - 1]
                   & np.all(lower <= here, axis=0) & np.any(lower < here, axis=0))
    return b[cuttable[b] & ~right & ~left]


def sample_boundaries(problem: PartitionProblem, candidates: np.ndarray, num_spans: int) -> np.ndarray:
    """One boundary per span, the one with the least traffic (earliest on ties): spans split the graph
    into `num_spans` pieces of equal weight, weight = half time share, half node share. Sorted."""
    n = problem.num_nodes
    prefix_ms = np.concatenate([[0.0], np.cumsum(problem.node_ms)])
    total_ms = prefix_ms[-1]
    position = 0.5 * candidates / n + (0.5 * prefix_ms[candidates] / total_ms if total_ms > 0 else 0.5 * candidates / n)
    span = np.minimum((position * num_spans).astype(np.int64), num_spans - 1)
    comm = problem.traffic.transfer_ms(LinkSpec.of(problem.device))[candidates]
    order = np.lexsort((candidates, comm, span))
    first = np.ones(len(order), dtype=bool)
    first[1:] = span[order][1:] != span[order][:-1]
    return np.sort(candidates[order][first])


def solve_coarsened(problem: PartitionProblem, num_stages: int, *, max_memory_bytes: int | None = None,
                    in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
                    cluster: Cluster | None = None, max_dp_nodes: int = MAX_DP_NODES) -> tuple[list[int], float]:
    """`partition.solve` on a coarsened problem: the cuts (in the original problem) and the bottleneck.
    Exact on the kept boundaries; see the module docstring for what is kept."""
    options = dict(max_memory_bytes=max_memory_bytes, in_flight=in_flight, stage_to_rank=stage_to_rank,
                   cluster=cluster)
    n = problem.num_nodes
    if n <= SMALL_GRAPH_NODES:
        return solve(problem, num_stages, **options)
    candidates = exact_boundaries(problem)
    log.info("coarsen: %d nodes, %d boundaries worth cutting", n, len(candidates))
    if len(candidates) + 1 < num_stages:
        return solve(problem, num_stages, **options)  # raises the PartitionError that names the original graph
    if len(candidates) + 1 <= max_dp_nodes:
        return _solve_on(problem, candidates, num_stages, options)
    sampled = sample_boundaries(problem, candidates, max(num_stages, max_dp_nodes // 2))
    cuts, bottleneck = _solve_on(problem, sampled, num_stages, options)
    window = max(1, (max_dp_nodes - len(sampled)) // (2 * max(1, num_stages - 1)))
    for round_ in range(MAX_REFINE_ROUNDS):
        at = np.searchsorted(candidates, cuts)
        near = np.concatenate([candidates[max(0, p - window):p + window + 1] for p in at]) if cuts else sampled[:0]
        new_cuts, new_bottleneck = _solve_on(problem, np.union1d(sampled, near), num_stages, options)
        log.info("coarsen: refine round %d, bottleneck %.6f -> %.6f ms", round_, bottleneck, new_bottleneck)
        if new_cuts == cuts or new_bottleneck > bottleneck:
            break
        cuts, bottleneck = new_cuts, new_bottleneck
    return cuts, bottleneck


def _solve_on(problem: PartitionProblem, boundaries: np.ndarray, num_stages: int,
              options: dict[str, object]) -> tuple[list[int], float]:
    coarse = coarsen(problem, boundaries)
    cuts, bottleneck = solve(coarse.problem, num_stages, **options)  # type: ignore[arg-type]
    return coarse.fine_cuts(cuts), bottleneck
