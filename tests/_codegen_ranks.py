"""The rank function of test_codegen's gloo tests, in a module of its own so that the spawned
processes import only this (not pytest and the test module) to unpickle it."""

from __future__ import annotations

import torch
import torch.distributed as dist

import pipecc


def step_emitted_rank(directory: str, inputs_path: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Load this process's rank of the plan in `directory`, run one step on the saved batch;
    returns the loss (None off the last stage) and this rank's gradients by canonical name."""
    inputs, target = torch.load(inputs_path, weights_only=True)
    plan = pipecc.load(directory, rank=dist.get_rank())
    runner = plan.runner(timeout_s=60.0)
    loss = runner.step(*inputs, target=target)
    return loss, {name: param.grad for name, param in runner.named_parameters()}
