"""The library front door: pipecc.compile and pipecc.load."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from pipecc.costs import DeviceSpec
from pipecc.ir import Config
from pipecc.plan import Plan


def compile(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, loss_fn: Callable[..., torch.Tensor],
            example_target: torch.Tensor, num_stages: int, num_microbatches: int, schedule: str = "1f1b",
            device: DeviceSpec | str = "cpu", max_memory_bytes: int | None = None) -> Plan:
    """Compile `model` into a pipeline Plan of `num_stages` balanced stages.

    `example_inputs` and `example_target` are one full batch (dim 0 is the batch); the step
    splits them into `num_microbatches` equal micro-batches and averages their losses.
    The plan shares `model`'s parameters: gradients land in their `.grad`.
    """
    from pipecc.pipeline import compile_plan

    device_name = device.name if isinstance(device, DeviceSpec) else device
    config = Config(num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                    device=device_name, max_memory_bytes=max_memory_bytes)
    return compile_plan(model, example_inputs, loss_fn, example_target, config, device)


def load(directory: str | Path, *, rank: int | None = None) -> Plan:
    """Read a plan written by `plan.save`/`plan.emit`: every rank's stages, or only `rank`'s."""
    from pipecc.passes.codegen import load_plan

    return load_plan(Path(directory), rank=rank)
