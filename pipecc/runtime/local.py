"""Local runtime: every rank's actions in one process, in an order where each receive follows
its send; messages go through a dictionary."""

from __future__ import annotations

from typing import Sequence

import torch

from pipecc.ir import Schedule, Stage, TensorSpec
from pipecc.passes.insert_comm import insert_comm
from pipecc.passes.schedules.verify import execution_order
from pipecc.runtime.executor import Message, RankExecutor, TimelineRecorder, param_device


class MailboxTransport:
    """In-process messages: a send parks the tensors, the matching receive takes them."""

    def __init__(self) -> None:
        self.mailbox: dict[Message, list[torch.Tensor]] = {}

    def send(self, message: Message, tensors: list[torch.Tensor], dst_rank: int) -> None:
        self.mailbox[message] = tensors

    def recv(self, message: Message, specs: Sequence[TensorSpec], src_rank: int) -> list[torch.Tensor]:
        return self.mailbox.pop(message)

    def flush(self) -> None:
        assert not self.mailbox, f"messages sent but never received: {list(self.mailbox)}"


def run_local(stages: Sequence[Stage], schedule: Schedule, inputs: Sequence[torch.Tensor],
              target: torch.Tensor, recorder: TimelineRecorder | None = None) -> torch.Tensor:
    """One training step of every rank in this process; returns the mean micro-batch loss.
    Gradients accumulate in the parameters' .grad, as loss.backward() would. With a `recorder`,
    each action's start and end are recorded (the ranks take turns: nothing overlaps)."""
    lowered = insert_comm(schedule)
    order = [action for _, action in execution_order(lowered)]
    executor = RankExecutor(stages, schedule, MailboxTransport(), param_device([s.graph for s in stages]),
                            recorder=recorder)
    loss = executor.run(order, inputs, target)
    assert loss is not None
    return loss
