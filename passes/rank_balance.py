"""Rank balance: move the partitioner's cuts so that each rank's *sum* of stages is as even as it can make it.

`pipecc.passes.partition` minimises the slowest *stage*, exactly. When a rank holds several stages
(V placements such as (0, 1, 1, 0) for zbv, v-half, v-min and dualpipev; loops such as (0, 1, 0, 1)
for interleaved-1f1b), that rank's busy time per micro-batch is the sum of its stages, and the
min-max-stage optimum can leave those sums far apart: on the GPT example under zbv on 2 ranks the
LM head alone is the bottleneck stage, so the DP is free to make the other stage on its rank as
large as the bottleneck too, and that rank then works a third longer than the other.

`balance_ranks` starts from the DP's cuts and minimises, in order: the largest rank sum (each stage
costed exactly as the DP costs it, `StageTables.cost_ms`: compute at its rank's speed plus traffic
over its links), then the slowest stage, then the other rank sums from the largest down, with no
stage more than `stage_slack` (a fraction) above the DP's slowest stage. Each rank's memory (the
sum of its stages', `StageTables.memory_bytes`) stays within its limit: the DP's per-stage caps
are one way to split that limit, so its cuts always fit, and the search may use any split.

It is a local search, not a proof: coordinate descent over the cut positions, each cut moved to
its best place between its neighbours (all others fixed), round after round; when no single move
helps, on graphs of at most MAX_PAIR_SEARCH_NODES nodes, a move of two cuts at once; until no move
is a strict improvement or MAX_ROUNDS rounds have run. A move is kept only when it strictly lowers
the objective, recomputed from scratch, so the result is never worse than the DP's cuts and the
search always ends. An exact DP would have to carry every open rank's load along the graph (the
stages of a rank are not adjacent), and is not attempted. tests/test_rank_balance.py compares the
search with brute force over every cut position (within the same bound, 10%): on 100 small chains
cut into 4 stages it reaches the optimum on 91, and is 6.6% above it on average on the other 9,
where three cuts must move together.

Why a bound, and why compile_plan tries several (`partition.STAGE_SLACKS`) and simulates each: the
rank sums are not the step time. Unbounded, the rank-sum optimum may be degenerate: on the GPT
example (2 ranks, cpu preset) it is two one-node stages and two of 2.14 ms, 69% above the DP's
slowest stage, which the schedules' warm-up and cool-down pay for (predicted: zbv 6% and
interleaved-1f1b 38% slower than with the DP's cuts). With a spec fitted to a CPU, on the other
hand, the LM head is a stage of its own and a 10% bound keeps zbv's rank sums 30% apart, where 50%
lets them meet (zbv 60.7 ms against 65.7); and interleaved-1f1b is best at 10% (66.5 ms against
73.2 at 50%, 69.5 with the DP's cuts). v-min on the cpu preset is slower with any of them.

Graphs above SMALL_GRAPH_NODES nodes are searched on a coarsened problem (`pipecc.passes.coarsen`):
the boundaries worth cutting, sampled down to about MAX_DP_NODES when more remain, plus every
boundary near the DP's cuts; any partition on kept boundaries costs the same coarse and fine.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipecc.cluster import Cluster
from pipecc.passes.coarsen import MAX_DP_NODES, SMALL_GRAPH_NODES, coarsen, exact_boundaries, sample_boundaries
from pipecc.passes.partition import (INF, STAGE_SLACKS, InFlight, PartitionProblem, StagePlace, StageTables,
                                     place_stages, rank_memory_limits)

log = logging.getLogger(__name__)

MAX_ROUNDS = 32  # each round moves every cut once; on the examples the cuts settle in two or three
MAX_PAIR_SEARCH_NODES = 256  # two-cut moves cost (cut positions)^2 per pair of cuts: only on graphs this small


@dataclass(frozen=True)
class RankBalance:
    """Cut positions (num_stages - 1 of them) and what they cost: the largest rank sum and the slowest stage."""

    cuts: tuple[int, ...]
    max_rank_ms: float  # the largest sum over a rank of its stages' costs
    bottleneck_ms: float  # the slowest stage


def several_stages_per_rank(stage_to_rank: Sequence[int] | None) -> bool:
    """Whether some rank holds more than one stage (None: one stage per rank)."""
    return stage_to_rank is not None and len(set(stage_to_rank)) < len(stage_to_rank)


def balance_ranks(problem: PartitionProblem, cuts: Sequence[int], *, max_memory_bytes: int | None = None,
                  in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
                  cluster: Cluster | None = None, stage_slack: float = STAGE_SLACKS[0]) -> RankBalance:
    """Cuts at least as good as `cuts` (a partition within the memory limits, e.g. the DP's) by the
    largest rank sum, then the slowest stage, with no stage more than `stage_slack` above the slowest
    of `cuts`; the search is described in the module docstring.

    >>> from pipecc.costs import DeviceSpec
    >>> from pipecc.passes.partition import solve
    >>> p = PartitionProblem(tuple("abcdef"), (2.0, 4.0, 2.0, 3.0, 1.0, 1.0), (0,) * 6, ((),) * 6, {}, (),
    ...                      DeviceSpec.preset("cpu"))
    >>> solve(p, 4, stage_to_rank=(0, 1, 0, 1))  # slowest stage 5 ms, but rank 1 sums b + def = 4 + 5
    ([1, 2, 3], 5.0)
    >>> balance_ranks(p, [1, 2, 3], stage_to_rank=(0, 1, 0, 1))  # rank 0: a + cd = 7, rank 1: b + ef = 6
    RankBalance(cuts=(1, 2, 4), max_rank_ms=7.0, bottleneck_ms=5.0)
    """
    search = _Search(problem, place_stages(problem.device, len(cuts) + 1, stage_to_rank, cluster), in_flight,
                     cluster, max_memory_bytes)
    best = [int(c) for c in cuts]
    best_key = start_key = search.key(best)
    assert best_key[0] < INF, "balance_ranks starts from a partition within the memory limits"
    search.max_stage_ms = INF if stage_slack == INF else start_key[1] * (1 + stage_slack)  # not 0 * INF
    pairs = problem.num_nodes <= MAX_PAIR_SEARCH_NODES
    for round_ in range(MAX_ROUNDS):
        moved = _move_each_cut(search, best) or (_move_two_cuts(search, best) if pairs else None)
        if moved is None:
            break
        best, best_key = moved, search.key(moved)
    log.info("rank balance: largest rank sum %.6f -> %.6f ms, slowest stage %.6f -> %.6f ms (%d rounds)",
             start_key[0], best_key[0], start_key[1], best_key[1], round_ + 1)
    return RankBalance(tuple(best), best_key[0], best_key[1])


def _move_each_cut(search: _Search, cuts: list[int]) -> list[int] | None:
    """`cuts` after moving each cut in turn to its best place, keeping each move that strictly improves
    the objective; None when none does."""
    best, best_key = cuts, search.key(cuts)
    for k in range(len(cuts)):
        moved = search.best_move(best, k)
        if search.key(moved) < best_key:
            best, best_key = moved, search.key(moved)
    return None if best is cuts else best


def _move_two_cuts(search: _Search, cuts: list[int]) -> list[int] | None:
    """The first strict improvement that moves two cuts at once (each place of the first, the best place
    of the second), pairs in order; None when there is none. It leaves the plateaus single moves stop on:
    a move of one cut that turns rank A's excess into rank B's leaves the largest sum where it was."""
    key = search.key(cuts)
    for k, l in itertools.combinations(range(len(cuts)), 2):
        low, high = ([0, *cuts][k], [*cuts, search.n][k + 1])
        for x in range(low + 1, high):
            moved = search.best_move([*cuts[:k], x, *cuts[k + 1:]], l)
            if search.key(moved) < key:
                return moved
    return None


def rank_costs(problem: PartitionProblem, cuts: Sequence[int], *, max_memory_bytes: int | None = None,
               in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
               cluster: Cluster | None = None) -> RankBalance:
    """`cuts` as they are, with their largest rank sum and slowest stage (INF when over a memory limit)."""
    search = _Search(problem, place_stages(problem.device, len(cuts) + 1, stage_to_rank, cluster), in_flight,
                     cluster, max_memory_bytes)
    key = search.key(cuts)
    return RankBalance(tuple(int(c) for c in cuts), key[0], key[1])


class _Search:
    """The objective of a partition and the best place for one cut, from the partitioner's StageTables
    (each stop's table computed once: a search visits every stop a few times)."""

    def __init__(self, problem: PartitionProblem, places: Sequence[StagePlace], in_flight: InFlight,
                 cluster: Cluster | None, max_memory_bytes: int | None) -> None:
        self.n = problem.num_nodes
        self.num_stages = len(places)
        self.tables = StageTables(problem, places, [in_flight(s) for s in range(self.num_stages)])
        limits = rank_memory_limits(places, cluster, max_memory_bytes)
        self.on_rank = np.zeros((self.num_stages, len(limits)))  # stage -> rank, one-hot: (stages, ranks)
        self.on_rank[np.arange(self.num_stages), [p.rank for p in places]] = 1.0
        self.limits = None if all(x is None for x in limits) else np.array([INF if x is None else float(x)
                                                                            for x in limits])
        self.max_stage_ms = INF  # a partition with a slower stage counts as infeasible
        self._cost: dict[int, np.ndarray] = {}
        self._memory: dict[int, np.ndarray] = {}

    def cost(self, stop: int) -> np.ndarray:
        """(stages, stop): the cost of [start, stop) as each stage (INF where it cannot be cut)."""
        if stop not in self._cost:
            self._cost[stop] = self.tables.cost_ms(stop, (None,) * self.num_stages)
        return self._cost[stop]

    def memory(self, stop: int) -> np.ndarray:
        """(stages, stop): the bytes of [start, stop) as each stage."""
        if stop not in self._memory:
            self._memory[stop] = self.tables.memory_bytes(stop)
        return self._memory[stop]

    def stage_costs(self, cuts: Sequence[int]) -> tuple[list[float], list[float]]:
        """Each stage's cost and memory under `cuts`."""
        bounds = [0, *cuts, self.n]
        stages = list(enumerate(zip(bounds, bounds[1:])))
        costs = [float(self.cost(stop)[s, start]) for s, (start, stop) in stages]
        memory = [float(self.memory(stop)[s, start]) for s, (start, stop) in stages] if self.limits is not None else []
        return costs, memory

    def key(self, cuts: Sequence[int]) -> tuple[float, ...]:
        """(largest rank sum, slowest stage, the other rank sums from the largest down); all INF when a
        rank's memory is over its limit, a stage is slower than `max_stage_ms` or a cut cannot be made."""
        costs, memory = self.stage_costs(cuts)
        keys = self._keys(np.array([costs]), np.array([memory]) if memory else None)
        return tuple(float(x) for x in keys[0])

    def _keys(self, costs: np.ndarray, memory: np.ndarray | None) -> np.ndarray:
        """Per row of stage costs (candidates, stages), its key as a row (candidates, 2 + ranks - 1)."""
        bad = ~np.isfinite(costs).all(axis=1) | (costs.max(axis=1) > self.max_stage_ms)
        rank_ms = np.sort(np.where(bad[:, None], 0.0, costs) @ self.on_rank, axis=1)[:, ::-1]  # no INF * 0
        keys = np.concatenate([rank_ms[:, :1], costs.max(axis=1, keepdims=True), rank_ms[:, 1:]], axis=1)
        if memory is not None:
            bad |= (memory @ self.on_rank > self.limits).any(axis=1)
        keys[bad] = INF
        return keys

    def best_move(self, cuts: Sequence[int], k: int) -> list[int]:
        """`cuts` with cut k moved to its best position between its neighbours (the earliest on ties)."""
        bounds = [0, *cuts, self.n]
        start, stop = bounds[k], bounds[k + 2]  # cut k ends stage k (from `start`) and starts stage k + 1
        positions = np.arange(start + 1, stop)
        costs, memory = self.stage_costs(cuts)
        candidate_costs = np.tile(np.array(costs), (len(positions), 1))
        candidate_costs[:, k] = [self.cost(x)[k, start] for x in positions]
        candidate_costs[:, k + 1] = self.cost(stop)[k + 1, positions]
        candidate_memory = None
        if memory:
            candidate_memory = np.tile(np.array(memory), (len(positions), 1))
            candidate_memory[:, k] = [self.memory(x)[k, start] for x in positions]
            candidate_memory[:, k + 1] = self.memory(stop)[k + 1, positions]
        keys = self._keys(candidate_costs, candidate_memory)
        best = np.lexsort(keys.T[::-1])[0]  # lexsort is stable: the earliest position among equal keys
        return [*cuts[:k], int(positions[best]), *cuts[k + 1:]]


def balance_ranks_coarsened(problem: PartitionProblem, cuts: Sequence[int], *, max_memory_bytes: int | None = None,
                            in_flight: InFlight = lambda stage: 1, stage_to_rank: Sequence[int] | None = None,
                            cluster: Cluster | None = None, stage_slack: float = STAGE_SLACKS[0],
                            max_dp_nodes: int = MAX_DP_NODES) -> RankBalance:
    """`balance_ranks` on the problem itself up to SMALL_GRAPH_NODES nodes, else on a coarsened one that
    keeps `cuts` (so the result is never worse than them); cuts in the original problem."""
    options = dict(max_memory_bytes=max_memory_bytes, in_flight=in_flight, stage_to_rank=stage_to_rank,
                   cluster=cluster, stage_slack=stage_slack)
    n = problem.num_nodes
    if n <= SMALL_GRAPH_NODES:
        return balance_ranks(problem, cuts, **options)  # type: ignore[arg-type]
    candidates = exact_boundaries(problem)
    given = np.asarray(cuts, dtype=np.int64)
    if len(candidates) + len(given) > max_dp_nodes:
        sampled = sample_boundaries(problem, candidates, max(len(given) + 1, max_dp_nodes // 2))
        window = max(1, (max_dp_nodes - len(sampled)) // (2 * max(1, len(given))))
        at = np.searchsorted(candidates, given)
        near = [candidates[max(0, p - window):p + window + 1] for p in at]
        candidates = np.unique(np.concatenate([sampled, *near]))
    kept = np.union1d(candidates, given)
    coarse = coarsen(problem, kept)
    balanced = balance_ranks(coarse.problem, np.searchsorted(kept, given).astype(int) + 1, **options)  # type: ignore[arg-type]
    return RankBalance(tuple(coarse.fine_cuts(balanced.cuts)), balanced.max_rank_ms, balanced.bottleneck_ms)
