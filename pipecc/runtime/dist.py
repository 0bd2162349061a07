"""Distributed runtime: this process runs its rank's actions; tensors move by torch.distributed
point-to-point messages (gloo on CPU, NCCL on GPU). Every receive has a timeout."""

from __future__ import annotations

import datetime
import logging
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipecc.errors import ConfigError, PipelineRuntimeError
from pipecc.ir import Schedule, Stage, TensorSpec, named_stage_parameters
from pipecc.passes.insert_comm import insert_comm
from pipecc.runtime.executor import Message, RankExecutor, param_device

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 300.0


class DistTransport:
    """isend for every outgoing tensor (waited at the end of the step), irecv + timed wait for incoming."""

    def __init__(self, schedule: Schedule, stages: Sequence[Stage], device: torch.device, timeout_s: float) -> None:
        self.num_stages = schedule.num_stages
        self.num_microbatches = schedule.num_microbatches
        self.per_message = 1 + max((len(s.inputs) for s in stages), default=0)
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _tag(self, message: Message, index: int) -> int:
        direction = 0 if message.direction == "F" else 1
        return ((direction * self.num_stages + message.stage) * self.num_microbatches + message.microbatch) \
            * self.per_message + index

    def send(self, message: Message, tensors: list[torch.Tensor], dst_rank: int) -> None:
        for i, tensor in enumerate(tensors):
            tensor = tensor.contiguous()
            self.pending.append((dist.isend(tensor, dst_rank, tag=self._tag(message, i)), tensor))

    def recv(self, message: Message, specs: Sequence[TensorSpec], src_rank: int) -> list[torch.Tensor]:
        buffers = [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in specs]
        works = [dist.irecv(b, src_rank, tag=self._tag(message, i)) for i, b in enumerate(buffers)]
        what = "activations" if message.direction == "F" else "gradients"
        for work in works:
            _wait(work, self.timeout, f"{what} of stage {message.stage} for micro-batch {message.microbatch} "
                                      f"from rank {src_rank}")
        return buffers

    def flush(self) -> None:
        for work, _ in self.pending:
            _wait(work, self.timeout, "a send to finish")
        self.pending.clear()


def _wait(work: dist.Work, timeout: datetime.timedelta, what: str) -> None:
    try:
        ok = work.wait(timeout)
    except RuntimeError as err:
        raise PipelineRuntimeError(
            f"rank {dist.get_rank()} gave up waiting for {what}: {str(err).splitlines()[0]}.\n"
            "The peer rank probably failed or was killed; look at its error first."
        ) from None
    if ok is False:
        raise PipelineRuntimeError(
            f"rank {dist.get_rank()} waited {timeout.total_seconds():.0f} s for {what}.\n"
            "The peer rank probably failed; raise timeout_s if its stage is just slow."
        )


class DistRunner:
    """Runs the stages that a plan places on this process's rank, one training step per `step`."""

    def __init__(self, stages: Sequence[Stage], schedule: Schedule, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 validate: object = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "plan.runner() needs an initialised torch.distributed process group.\n"
                "Launch with torchrun and call torch.distributed.init_process_group() first, "
                "or use plan.run_local() to run every rank in this process."
            )
        if dist.get_world_size() != schedule.num_ranks:
            raise ConfigError(
                f"the plan has {schedule.num_ranks} ranks but the process group has {dist.get_world_size()}.\n"
                f"Launch with --nproc-per-node={schedule.num_ranks} (or compile for {dist.get_world_size()} ranks)."
            )
        self.rank = dist.get_rank()
        self.stages = tuple(stages)
        self.schedule = schedule
        self.local_stages = tuple(s for s in stages if s.rank == self.rank)
        self.actions = insert_comm(schedule).rank_actions[self.rank]
        self.device = param_device([s.graph for s in self.local_stages])
        self.timeout_s = timeout_s
        self._validate = validate
        self.shared = _shared_parameters(stages)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under their names in the original model (each once)."""
        return named_stage_parameters(self.local_stages)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def step(self, *inputs: torch.Tensor, target: torch.Tensor, broadcast_loss: bool = False) -> torch.Tensor | None:
        """One training step: gradients accumulate in this rank's parameters. Returns the batch loss
        on the rank holding the last stage (on every rank with broadcast_loss=True), else None."""
        if callable(self._validate):
            self._validate(inputs, target)
        params = dict(self.named_parameters())
        before = {name: _grad_or_none(params[name]) for name in self.shared if name in params}
        transport = DistTransport(self.schedule, self.stages, self.device, self.timeout_s)
        executor = RankExecutor(self.stages, self.schedule, transport, self.device)
        loss = executor.run(self.actions, inputs, target)
        self._sum_shared_grads(params, before)
        if broadcast_loss:
            loss = self._broadcast_loss(loss)
        return loss

    def _sum_shared_grads(self, params: dict[str, nn.Parameter], before: dict[str, torch.Tensor | None]) -> None:
        """A parameter held by several ranks (tied weights) gets the sum of their gradients, on each.

        Only this step's contribution is exchanged, so gradient accumulation across steps stays right.
        The sum runs in rank order on every holder, so all holders end bitwise equal."""
        for index, (name, ranks) in enumerate(sorted(self.shared.items())):
            if self.rank not in ranks:
                continue
            param = params[name]
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            delta = grad - before[name] if before[name] is not None else grad.clone()
            contributions: dict[int, torch.Tensor] = {self.rank: delta}
            works = []
            for peer in ranks:
                if peer == self.rank:
                    continue
                works.append(dist.isend(delta.contiguous(), peer, tag=_SHARED_TAG + index))
                contributions[peer] = torch.empty_like(delta)
                works.append(dist.irecv(contributions[peer], peer, tag=_SHARED_TAG + index))
            for work in works:
                _wait(work, datetime.timedelta(seconds=self.timeout_s), f"the gradient of shared parameter {name}")
            total = contributions[ranks[0]].clone()
            for peer in ranks[1:]:
                total += contributions[peer]
            param.grad = total if before[name] is None else before[name] + total

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        last_rank = self.schedule.stage_to_rank[-1]
        value = loss.detach().reshape(()).clone() if loss is not None else torch.zeros((), device=self.device)
        dist.broadcast(value, src=last_rank)
        return value


_SHARED_TAG = 1 << 28


def _grad_or_none(param: nn.Parameter) -> torch.Tensor | None:
    return None if param.grad is None else param.grad.detach().clone()


def _shared_parameters(stages: Sequence[Stage]) -> dict[str, list[int]]:
    """Canonical name -> sorted ranks, for every parameter that stages on several ranks hold."""
    holders: dict[str, set[int]] = {}
    for stage in stages:
        for binding in stage.params:
            if binding.is_parameter:
                holders.setdefault(binding.canonical_name, set()).add(stage.rank)
    return {name: sorted(ranks) for name, ranks in holders.items() if len(ranks) > 1}
