"""compile_plan(): the passes in data-flow order, each checked by its verifier."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from pipecc.cluster import Cluster
from pipecc.costs import CostTable, DeviceSpec, resolve_device
from pipecc.errors import ConfigError, PipeccError
from pipecc.ir import Captured, Config, Partition, Schedule, Stage
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.order import check_order, order_by_stage, reorder
from pipecc.passes.partition import InFlight, check_partition, partition_candidates
from pipecc.passes.profile import profile_costs
from pipecc.passes.schedules import in_flight as held_microbatches
from pipecc.passes.schedules import schedule_kind
from pipecc.passes.schedules.verify import check_schedule
from pipecc.passes.simulate import simulate
from pipecc.passes.split_backward import needs_split_backward, split_backward_stages
from pipecc.passes.split_stages import check_stages, split_stages
from pipecc.passes.symbolic import stage_formulas, symbolic_costs
from pipecc.plan import Plan

log = logging.getLogger(__name__)


@contextlib.contextmanager
def pass_context(name: str) -> Iterator[None]:
    """Log the pass's time; an error escaping it gets a note naming the pass."""
    start = time.perf_counter()
    try:
        yield
    except PipeccError as err:
        err.add_note(f"(in pass {name})")
        raise
    log.info("pass %s took %.3f s", name, time.perf_counter() - start)


def trace_and_cost(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                   example_target: torch.Tensor, config: Config,
                   device: DeviceSpec | str) -> tuple[Captured, CostTable]:
    """Capture at config.num_microbatches and cost every node (roofline, then profiled times when
    config.cost_model is "profile"): what every candidate of one trace shares."""
    with pass_context("capture"):
        captured = capture(model, example_inputs, loss_fn, example_target, num_microbatches=config.num_microbatches)
    with pass_context("annotate_costs"):
        costs = annotate_costs(captured, resolve_device(device))
    if config.cost_model == "profile":
        with pass_context("profile_costs"):
            cache_dir = Path(config.profile_cache_dir) if config.profile_cache_dir else None
            costs = profile_costs(captured, costs, example_inputs, example_target, cache_dir=cache_dir)
    return captured, costs


def compile_plan(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                 example_target: torch.Tensor, config: Config, device: DeviceSpec | str = "cpu",
                 cluster: Cluster | None = None, *, traced: tuple[Captured, CostTable] | None = None,
                 costs_only: bool = False) -> Plan:
    """Trace, cost, partition, schedule and split `model` into a runnable Plan; `cluster` describes each
    rank (speed, memory, link) when they differ. schedule="auto" reuses one trace (`traced`) for every
    candidate and skips the split backward (`costs_only`) until it has chosen."""
    check_config(config)
    if config.schedule == "auto":
        return compile_auto(model, example_inputs, loss_fn, example_target, config, device, cluster)
    spec = resolve_device(device)
    kind = schedule_kind(config.schedule)
    num_stages, m = config.num_stages, config.num_microbatches

    def in_flight(stage: int) -> int:  # counted on the schedule, which is built before the partition
        return held_microbatches(schedule, stage)

    captured, costs = traced or trace_and_cost(model, example_inputs, loss_fn, example_target, config, spec)
    with pass_context("schedule"):
        schedule = kind.build(num_stages, m, config.num_ranks)
        check_schedule(schedule)
    with pass_context("partition"):  # several candidates only where a rank holds several stages
        parts = partition_candidates(captured, costs, num_stages=num_stages, max_memory_bytes=config.max_memory_bytes,
                                     in_flight=in_flight, stage_to_rank=schedule.stage_to_rank, cluster=cluster)
    split = [split_partition(captured, part, costs, schedule, in_flight, cluster) for part in parts]
    if len(split) > 1:  # the fastest predicted step (the first, the DP's, on ties): rank sums are not the step time
        split.sort(key=lambda c: simulate(schedule, [s.cost for s in c[1]]).step_time_ms)
    captured, stages = split[0]
    if needs_split_backward(schedule) and not costs_only:
        with pass_context("split_backward"):  # F/B/W graphs; a stage that cannot be split logs why
            stages = split_backward_stages(stages)
    formulas = None
    if config.symbolic_sizes:
        with pass_context("symbolic_costs"):  # roofline formulas in the micro-batch size, for what-if questions
            formulas = stage_formulas(symbolic_costs(captured, spec, sequence_dim=config.symbolic_sequence_dim), stages,
                                      [in_flight(s) for s in range(num_stages)])
    return Plan(config=config, device=spec, stages=stages, schedule=schedule,
                input_specs=Plan.batch_specs(example_inputs), target_spec=Plan.batch_specs([example_target])[0],
                capture_method=captured.method, cost_formulas=formulas)


def split_partition(captured: Captured, part: Partition, costs: CostTable, schedule: Schedule, in_flight: InFlight,
                    cluster: Cluster | None) -> tuple[Captured, tuple[Stage, ...]]:
    """The graph reordered so that `part`'s stages are contiguous in it, and split into those stages."""
    with pass_context("order"):  # stages may be contiguous in another topological order: make it the graph's
        order = order_by_stage(captured, part)
        check_order(captured, order)
        captured = reorder(captured, order)
        check_partition(captured, part)
    with pass_context("split_stages"):
        stages = split_stages(captured, part, costs, stage_to_rank=schedule.stage_to_rank, in_flight=in_flight,
                              cluster=cluster)
        check_stages(stages)
    return captured, stages


COST_MODELS = ("analytic", "profile")


def check_config(config: Config) -> None:
    for field in ("num_stages", "num_microbatches"):
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{field}={value!r}; it must be a positive integer.\n"
                              f"Pass {field}=1 or more (num_stages=1 runs the whole model as one stage).")
    if config.cost_model not in COST_MODELS:
        raise ConfigError(f"cost_model={config.cost_model!r}; it must be one of {', '.join(COST_MODELS)}.\n"
                          "Pass cost_model=\"analytic\" (roofline on the device spec) or \"profile\" (measured).")
    limit = config.max_memory_bytes
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"max_memory_bytes={limit!r}; it must be positive, an int number of bytes (or None for no limit).\n"
                          "Pass an int, e.g. max_memory_bytes=20 * 2**30 for 20 GiB.")


def compile_auto(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                 example_target: torch.Tensor, config: Config, device: DeviceSpec | str = "cpu",
                 cluster: Cluster | None = None) -> Plan:
    """schedule="auto": every registered schedule (and the zero-bubble search) on
    num_ranks = config.num_ranks or config.num_stages ranks, each with its own placement (V and
    interleaved: 2 stages per rank), partitioned and simulated on one trace; the fastest predicted
    step among those that fit max_memory_bytes wins. The plan's report shows every candidate."""
    import dataclasses

    from pipecc.ir import ScheduleCandidate, ScheduleChoice
    from pipecc.passes.schedules import SCHEDULES
    from pipecc.passes.schedules.auto import zero_bubble_search

    num_ranks = config.num_ranks or config.num_stages
    limit, m = config.max_memory_bytes, config.num_microbatches
    captured, costs = trace_and_cost(model, example_inputs, loss_fn, example_target, config, device)

    def build(name: str, costs_only: bool) -> Plan:
        kind = SCHEDULES["zb-h1" if name == "zb-auto" else name]
        sub = dataclasses.replace(config, schedule=kind.name, num_stages=num_ranks * kind.stages_per_rank,
                                  num_ranks=num_ranks)
        plan = compile_plan(model, example_inputs, loss_fn, example_target, sub, device, cluster,
                            traced=(captured, costs), costs_only=costs_only)
        if name == "zb-auto":  # the search runs on zb-h1's partition (one stage per rank)
            searched = zero_bubble_search([s.cost for s in plan.stages], m, limit)
            plan = Plan(config=sub, device=plan.device, stages=plan.stages, schedule=searched,
                        input_specs=plan.input_specs, target_spec=plan.target_spec,
                        capture_method=plan.capture_method)
        return plan

    candidates: list[ScheduleCandidate] = []
    for name in [*SCHEDULES, "zb-auto"]:
        stages = num_ranks * SCHEDULES.get(name, SCHEDULES["zb-h1"]).stages_per_rank
        try:
            timeline = build(name, costs_only=True).simulate()
        except PipeccError as err:
            candidates.append(ScheduleCandidate(name, stages, None, None, (), str(err).splitlines()[0]))
            continue
        over = limit is not None and max(timeline.peak_memory_bytes) > limit
        candidates.append(ScheduleCandidate(name, stages, timeline.step_time_ms, timeline.bubble_ratio,
                                            timeline.peak_memory_bytes, "over the memory limit" if over else ""))
    fitting = [c for c in candidates if c.step_time_ms is not None and not c.note]
    if not fitting:
        raise ConfigError(f"schedule=\"auto\": no schedule fits on {num_ranks} ranks"
                          f"{f' within max_memory_bytes={limit}' if limit else ''}; "
                          + "; ".join(f"{c.name}: {c.note}" for c in candidates) + ".\n"
                          "Raise max_memory_bytes, use more ranks, or more micro-batches.")
    # equal predicted steps (to 1 ns): the one with less peak memory, then registry order (min keeps the first)
    best = min(fitting, key=lambda c: (round(c.step_time_ms or 0.0, 6), max(c.peak_memory_bytes)))
    why = (f"fastest predicted step of the {len(fitting)} schedules that fit"
           + (f" in {limit} bytes per rank" if limit is not None else " (no memory limit)"))
    chosen = build(best.name, costs_only=False)
    return Plan(config=dataclasses.replace(config, num_stages=len(chosen.stages), num_ranks=num_ranks),
                device=chosen.device, stages=chosen.stages, schedule=chosen.schedule,
                input_specs=chosen.input_specs, target_spec=chosen.target_spec,
                capture_method=chosen.capture_method, schedule_choice=ScheduleChoice(tuple(candidates), best.name, why))
