"""Auto-configuration (the Pipette / Alpa idea, on pipecc's own simulator): for a cluster and a global
batch, try every rank count x stages per rank x micro-batch count x registered schedule, partition each
under the ranks' memory, simulate one step, and keep the fastest predicted plan that fits.

One trace and cost table per micro-batch count serves every candidate with that count: a candidate
is a partition DP, a stage split and a simulation, not a new capture.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from pipecc.cluster import Cluster
from pipecc.costs import CostTable, DeviceSpec
from pipecc.errors import ConfigError, PipeccError
from pipecc.ir import Captured, Config, ScheduleCandidate, ScheduleChoice
from pipecc.plan import Plan
from pipecc.printing import format_bytes

if TYPE_CHECKING:
    from pipecc.passes.schedules import ScheduleKind

log = logging.getLogger(__name__)

MAX_MICROBATCHES = 32  # past this, per-op overhead of tiny micro-batches dominates on every device we model


@dataclass(frozen=True)
class ConfigCandidate:
    """One configuration tried: its predicted step, or why it was left out."""

    num_ranks: int
    num_stages: int
    num_microbatches: int
    schedule: str
    step_time_ms: float | None  # None: it could not be built (see note)
    bubble_ratio: float | None
    peak_memory_bytes: tuple[int, ...]  # per rank, simulated
    note: str = ""  # "" when it fits; else why it was left out

    @property
    def fits(self) -> bool:
        return self.step_time_ms is not None and not self.note

    @property
    def label(self) -> str:
        """`1f1b, 2 ranks x 1, 4 mb` (ranks x stages per rank, micro-batches): unique within one search."""
        ranks = f"{self.num_ranks} rank{'s' if self.num_ranks > 1 else ''}"
        return f"{self.schedule}, {ranks} x {self.num_stages // self.num_ranks}, {self.num_microbatches} mb"


@dataclass(frozen=True)
class AutoConfig:
    """Every candidate (in search order), the chosen one, and its compiled plan."""

    candidates: tuple[ConfigCandidate, ...]
    chosen: ConfigCandidate
    plan: Plan = field(compare=False, repr=False)

    def choice(self) -> ScheduleChoice:
        """The candidates as the plan report shows them (fastest first, left-out ones last, each labelled
        with its ranks and micro-batches), and why the chosen one won."""
        order = sorted(self.candidates, key=lambda c: (c.step_time_ms is None, c.step_time_ms or 0.0))
        rows = tuple(ScheduleCandidate(c.label, c.num_stages, c.step_time_ms, c.bubble_ratio, c.peak_memory_bytes,
                                       c.note) for c in order)
        fitting = sum(c.fits for c in self.candidates)
        reason = (f"fastest predicted step of the {fitting} of {len(self.candidates)} configurations (ranks x stages "
                  "per rank x micro-batches x schedule) that fit every rank's memory")
        return ScheduleChoice(rows, self.chosen.label, reason)


def rank_counts(cluster: Cluster | None, num_ranks: int | None) -> list[int]:
    """The rank counts to try: the cluster's (or `num_ranks`), and every power of two below it."""
    total = cluster.num_ranks if cluster is not None else num_ranks
    if total is None:
        raise ConfigError("num_stages=\"auto\" needs to know the ranks it may use.\n"
                          "Pass num_ranks=N, or cluster= a Cluster (one RankSpec per rank).")
    if cluster is not None and num_ranks is not None and num_ranks != cluster.num_ranks:
        raise ConfigError(f"num_ranks={num_ranks} but the cluster describes {cluster.num_ranks} ranks.\n"
                          "Pass one of them, or make them agree.")
    return sorted({total, *(1 << k for k in range(total.bit_length()) if 1 << k < total)})


def microbatch_counts(batch_size: int) -> list[int]:
    """Every divisor of the batch size up to MAX_MICROBATCHES: micro-batches must be equal."""
    return [m for m in range(1, min(batch_size, MAX_MICROBATCHES) + 1) if batch_size % m == 0]


def stages_per_rank_options(kind: ScheduleKind) -> list[int]:
    """A fixed placement's v, or v and 2v for schedules that loop any number of stages over a rank.
    On one rank only one stage is tried: more stages there add nothing but their boundaries."""
    v = kind.stages_per_rank
    return [v] if kind.fixed_stages_per_rank else [v, 2 * v]


def autoconfigure(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                  example_target: torch.Tensor, config: Config, *, device: DeviceSpec | str = "cpu",
                  cluster: Cluster | None = None, num_microbatches: int | None = None,
                  schedules: Sequence[str] | None = None) -> AutoConfig:
    """The fastest predicted configuration that fits every rank's memory, its plan, and the table of candidates.

    Tries rank counts `rank_counts(cluster, config.num_ranks)` (a cluster's first r ranks for r ranks),
    every registered schedule (or `schedules`) with its stages per rank, and every micro-batch count
    dividing the batch (or `num_microbatches`). `config` supplies the rest (device, memory limit,
    cost model). Ties go to fewer ranks, then fewer micro-batches, then registry order.
    """
    from pipecc.passes.schedules import SCHEDULES, schedule_kind
    from pipecc.pipeline import trace_and_cost

    names = list(SCHEDULES) if schedules is None else [schedule_kind(n).name for n in schedules]
    batch_size = example_inputs[0].shape[0] if example_inputs else example_target.shape[0]
    counts = [num_microbatches] if num_microbatches is not None else microbatch_counts(batch_size)
    traced: dict[int, tuple[Captured, CostTable]] = {}
    candidates: list[tuple[ConfigCandidate, Config, Cluster | None]] = []
    for num_ranks in rank_counts(cluster, config.num_ranks):
        ranks = None if cluster is None else Cluster(cluster.ranks[:num_ranks], name=cluster.name)
        for m in counts:
            if m not in traced:
                traced[m] = trace_and_cost(model, example_inputs, loss_fn, example_target,
                                           dataclasses.replace(config, num_microbatches=m), device)
            for name in names:
                for v in stages_per_rank_options(SCHEDULES[name]) if num_ranks > 1 else [1]:
                    if SCHEDULES[name].fixed_stages_per_rank and SCHEDULES[name].stages_per_rank != v:
                        continue  # a V needs two stages per rank, so it needs two ranks to be a pipeline
                    sub = dataclasses.replace(config, schedule=name, num_stages=v * num_ranks, num_microbatches=m,
                                              num_ranks=num_ranks)
                    candidate = _evaluate(model, example_inputs, loss_fn, example_target, sub, device, ranks, traced[m])
                    log.info("auto-configuration: %s", candidate)
                    candidates.append((candidate, sub, ranks))
    fitting = [entry for entry in candidates if entry[0].fits]
    if not fitting:
        raise ConfigError(
            f"num_stages=\"auto\": none of the {len(candidates)} configurations fits; for example "
            + "; ".join(f"{c.schedule} on {c.num_ranks} ranks, m={c.num_microbatches}: {c.note}"
                        for c, _, _ in candidates[:3]) + ".\n"
            "Raise max_memory_bytes (or the ranks' memory), use more ranks, or a smaller batch."
        )
    chosen, chosen_config, chosen_cluster = min(fitting, key=lambda entry: entry[0].step_time_ms or 0.0)
    from pipecc.pipeline import compile_plan

    plan = compile_plan(model, example_inputs, loss_fn, example_target, chosen_config, device, chosen_cluster,
                        traced=traced[chosen.num_microbatches])
    result = AutoConfig(tuple(c for c, _, _ in candidates), chosen, plan)
    plan = Plan(config=plan.config, device=plan.device, stages=plan.stages, schedule=plan.schedule,
                input_specs=plan.input_specs, target_spec=plan.target_spec, capture_method=plan.capture_method,
                cost_formulas=plan.cost_formulas, schedule_choice=result.choice())
    return dataclasses.replace(result, plan=plan)


def _evaluate(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
              example_target: torch.Tensor, config: Config, device: DeviceSpec | str, cluster: Cluster | None,
              traced: tuple[Captured, CostTable]) -> ConfigCandidate:
    """Partition, split and simulate one configuration (no split backward: costs only)."""
    from pipecc.pipeline import compile_plan

    def candidate(step: float | None, bubble: float | None, peak: tuple[int, ...], note: str) -> ConfigCandidate:
        return ConfigCandidate(config.num_ranks or config.num_stages, config.num_stages, config.num_microbatches,
                               config.schedule, step, bubble, peak, note)

    try:
        plan = compile_plan(model, example_inputs, loss_fn, example_target, config, device, cluster,
                            traced=traced, costs_only=True)
        timeline = plan.simulate()
    except PipeccError as err:
        return candidate(None, None, (), str(err).splitlines()[0])
    limits = list(_memory_limits(config, cluster, plan.num_ranks))
    over = [r for r, (peak, limit) in enumerate(zip(timeline.peak_memory_bytes, limits))
            if limit is not None and peak > limit]
    note = f"rank {over[0]} over its memory ({format_bytes(timeline.peak_memory_bytes[over[0]])})" if over else ""
    return candidate(timeline.step_time_ms, timeline.bubble_ratio, timeline.peak_memory_bytes, note)


def _memory_limits(config: Config, cluster: Cluster | None, num_ranks: int) -> Iterator[int | None]:
    for rank in range(num_ranks):
        yield cluster.memory_limit(rank, config.max_memory_bytes) if cluster is not None else config.max_memory_bytes
