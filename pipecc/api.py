"""The library front door: pipecc.compile and pipecc.load."""

from __future__ import annotations

import os
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from pipecc.cluster import Cluster
from pipecc.costs import DeviceSpec
from pipecc.ir import Config
from pipecc.plan import Plan


def compile(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, loss_fn: Callable[..., torch.Tensor],
            example_target: torch.Tensor, num_stages: int | str, num_microbatches: int | str,
            schedule: str | None = None,
            device: DeviceSpec | str = "cpu", max_memory_bytes: int | None = None, cost_model: str = "analytic",
            profile_cache_dir: str | Path | None = None, cluster: Cluster | str | Path | None = None,
            symbolic_sizes: bool = False, symbolic_sequence_dim: int | None = None, num_ranks: int | None = None) -> Plan:
    """Compile `model` into a pipeline Plan of `num_stages` balanced stages.

    `num_ranks` (default: the schedule's placement) sets how many ranks share the stages: the V
    schedules (zbv, v-half, v-min, dualpipev) put 2 stages on each rank, interleaved-1f1b and
    looped-bfs put v = num_stages / num_ranks (default 2). `schedule="auto"` compiles every
    schedule on num_ranks (default num_stages) ranks and keeps the fastest that fits max_memory_bytes.

    `example_inputs` and `example_target` are one full batch (dim 0 is the batch); the step
    splits them into `num_microbatches` equal micro-batches and averages their losses.
    The plan shares `model`'s parameters: gradients land in their `.grad`.

    `cost_model="profile"` times every node on real tensors instead of estimating it from the
    device spec; the times are cached in `profile_cache_dir` (default: $PIPECC_CACHE_DIR, or
    ~/.cache/pipecc).

    `symbolic_sizes=True` keeps every stage's time and memory as formulas in the micro-batch size:
    `plan.what_if(microbatch_size=2 * b)` then predicts a step without tracing again, and
    `plan.report(formulas=True)` prints them. `symbolic_sequence_dim=1` (for (batch, tokens) inputs)
    makes the sequence length a symbol T too: `plan.what_if(b, sequence_length=2 * T)`.

    `cluster` (a Cluster or its JSON file) gives each rank's speed relative to `device`, its
    memory and its link: stages are then balanced on time at each rank's speed, within each
    rank's memory. Default: identical ranks.

    `num_stages="auto"` searches rank counts (the cluster's or `num_ranks`, and powers of two below),
    stages per rank, micro-batch counts (every divisor of the batch, or `num_microbatches` when it
    is an int) and schedules (every registered one, or `schedule` when given), simulates each, and
    returns the fastest predicted plan that fits every rank's memory; its report lists every candidate.
    """
    from pipecc.pipeline import check_config, compile_plan

    if schedule is None:
        schedule = "auto" if num_stages == "auto" else "1f1b"

    device_name = device.name if isinstance(device, DeviceSpec) else device
    config = Config(num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                    device=device_name, max_memory_bytes=max_memory_bytes, cost_model=cost_model,
                    profile_cache_dir=str(default_cache_dir(profile_cache_dir)) if cost_model == "profile" else None,
                    symbolic_sizes=symbolic_sizes or symbolic_sequence_dim is not None,
                    symbolic_sequence_dim=symbolic_sequence_dim, num_ranks=num_ranks)
    if cluster is not None and not isinstance(cluster, Cluster):
        cluster = Cluster.load(cluster)
    if num_stages == "auto":
        from pipecc.autoconfig import autoconfigure

        fixed_m = None if num_microbatches == "auto" else num_microbatches
        base = dataclasses.replace(config, num_stages=1, num_microbatches=fixed_m or 1, schedule="1f1b")
        check_config(base)
        return autoconfigure(model, example_inputs, loss_fn, example_target, base, device=device, cluster=cluster,
                             num_microbatches=fixed_m, schedules=None if schedule == "auto" else [schedule]).plan
    return compile_plan(model, example_inputs, loss_fn, example_target, config, device, cluster=cluster)


def default_cache_dir(given: str | Path | None = None) -> Path:
    """`given`, else $PIPECC_CACHE_DIR, else ~/.cache/pipecc: where profiled costs are kept."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get("PIPECC_CACHE_DIR") or Path.home() / ".cache" / "pipecc")


def load(directory: str | Path, *, rank: int | None = None) -> Plan:
    """Read a plan written by `plan.save`/`plan.emit`: every rank's stages, or only `rank`'s."""
    from pipecc.passes.codegen import load_plan

    return load_plan(Path(directory), rank=rank)
