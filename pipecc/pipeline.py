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
from pipecc.costs import DeviceSpec, resolve_device
from pipecc.errors import ConfigError, PipeccError
from pipecc.ir import Config
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.partition import check_partition, partition
from pipecc.passes.profile import profile_costs
from pipecc.passes.schedules import schedule_kind
from pipecc.passes.schedules.verify import check_schedule
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


def compile_plan(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                 example_target: torch.Tensor, config: Config, device: DeviceSpec | str = "cpu",
                 cluster: Cluster | None = None) -> Plan:
    """Trace, cost, partition, schedule and split `model` into a runnable Plan; `cluster` describes each
    rank (speed, memory, link) when they differ."""
    check_config(config)
    spec = resolve_device(device)
    kind = schedule_kind(config.schedule)
    num_stages, m = config.num_stages, config.num_microbatches

    def in_flight(stage: int) -> int:
        return kind.in_flight(num_stages, m, stage)

    with pass_context("capture"):
        captured = capture(model, example_inputs, loss_fn, example_target, num_microbatches=m)
    with pass_context("annotate_costs"):
        costs = annotate_costs(captured, spec)
    if config.cost_model == "profile":
        with pass_context("profile_costs"):
            cache_dir = Path(config.profile_cache_dir) if config.profile_cache_dir else None
            costs = profile_costs(captured, costs, example_inputs, example_target, cache_dir=cache_dir)
    with pass_context("schedule"):
        schedule = kind.generate(num_stages, m)
        check_schedule(schedule)
    with pass_context("partition"):
        part = partition(captured, costs, num_stages=num_stages, max_memory_bytes=config.max_memory_bytes,
                         in_flight=in_flight, stage_to_rank=schedule.stage_to_rank, cluster=cluster)
        check_partition(captured, part)
    with pass_context("split_stages"):
        stages = split_stages(captured, part, costs, stage_to_rank=schedule.stage_to_rank, in_flight=in_flight,
                              cluster=cluster)
        check_stages(stages)
    if needs_split_backward(schedule):
        with pass_context("split_backward"):  # F/B/W graphs; a stage that cannot be split logs why
            stages = split_backward_stages(stages)
    formulas = None
    if config.symbolic_sizes:
        with pass_context("symbolic_costs"):  # roofline formulas in the micro-batch size, for what-if questions
            formulas = stage_formulas(symbolic_costs(captured, spec), stages, [in_flight(s) for s in range(num_stages)])
    return Plan(config=config, device=spec, stages=stages, schedule=schedule,
                input_specs=Plan.batch_specs(example_inputs), target_spec=Plan.batch_specs([example_target])[0],
                capture_method=captured.method, cost_formulas=formulas)


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
