"""State and determinism under pipelining: BatchNorm running stats, buffers mutated in forward, and
dropout, compared with the unpartitioned model on the same micro-batches.

- BatchNorm in training normalises each micro-batch by its own statistics (as in GPipe) and updates
  its running stats once per micro-batch; every stage runs its forwards in micro-batch order, so the
  running stats end equal to the unpartitioned model's run over the same micro-batches, in order.
- Dropout is seeded per (plan.dropout_seed, step, micro-batch, dropout): the same micro-batch draws the
  same mask on any partition or rank count, and pipecc.testing.reference_step draws it too.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecc
from pipecc.ir import ActionKind
from pipecc.passes.rng import dropout_mask, DropoutKey, mix
from pipecc.passes.schedules import SCHEDULES
from pipecc.testing import assert_same_grads, assert_same_step, reference_step, run_ranks

SCHEDULE_NAMES = tuple(name for name in SCHEDULES if name != "auto")


class ConvBatchNorm(nn.Module):
    """conv -> BatchNorm2d -> relu -> conv -> BatchNorm2d -> pool -> linear. (momentum=None, and a buffer
    written in place by the forward itself, are refused by name: tests/test_hostile.py.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


class Dropouts(nn.Module):
    """Two dropout modules and one functional dropout between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.drop1, self.drop2 = nn.Dropout(0.5), nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(torch.relu(self.fc1(x)))
        h = self.drop2(torch.relu(self.fc2(h)))
        h = F.dropout(torch.relu(self.fc3(h)), p=0.1, training=self.training)
        return self.fc4(h)


def _data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=generator), torch.randn(shape[0], 4, generator=generator)


def _compile(model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options: Any) -> pipecc.Plan:
    return pipecc.compile(model, (x,), loss_fn=F.mse_loss, example_target=target, **options)


def _reference_buffers(model: nn.Module, x: torch.Tensor, num_microbatches: int) -> dict[str, torch.Tensor]:
    """The buffers after the unpartitioned model's forwards over the micro-batches, in order."""
    ref = copy.deepcopy(model)
    for chunk in x.chunk(num_microbatches):
        ref(chunk)
    return dict(ref.named_buffers())


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_batchnorm_running_stats_equal_unpartitioned_micro_batches(schedule: str, one_thread: None) -> None:
    model = ConvBatchNorm()
    x, target = _data((8, 3, 6, 6))
    num_stages = 2 * SCHEDULES[schedule].stages_per_rank
    plan = _compile(model, x, target, num_stages=num_stages, num_microbatches=4, schedule=schedule)
    expected_buffers = _reference_buffers(model, x, 4)
    assert_same_step(model, (x,), F.mse_loss, target, plan)  # runs the step (on `model` itself)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, expected_buffers[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{schedule}: buffer {name}: {m}")
    assert int(model.bn1.num_batches_tracked) == 4 and int(model.bn2.num_batches_tracked) == 4


def test_every_schedule_runs_each_stages_forwards_in_micro_batch_order() -> None:
    """What makes running stats exact: a stage sees its micro-batches in the order the model would."""
    for name in SCHEDULE_NAMES:
        kind = SCHEDULES[name]
        for num_ranks, m in ((2, 4), (4, 8), (3, 5)):
            try:
                schedule = kind.build(num_ranks * kind.stages_per_rank, m)
            except pipecc.PipeccError:
                continue
            for actions in schedule.rank_actions:
                for stage in {a.stage for a in actions}:
                    order = [a.microbatch for a in actions if a.stage == stage and a.kind is ActionKind.F]
                    assert order == sorted(order), f"{name}: stage {stage} runs forwards in order {order}"


def test_seeded_masks_differ_by_step_micro_batch_and_dropout() -> None:
    keys = {mix(0, s, mb, k) for s in range(3) for mb in range(4) for k in range(3)}
    assert len(keys) == 36
    a = dropout_mask(torch.Size([64]), 0.5, DropoutKey(0, 0, 0), 0, torch.device("cpu"), torch.float32)
    b = dropout_mask(torch.Size([64]), 0.5, DropoutKey(0, 0, 0), 0, torch.device("cpu"), torch.float32)
    c = dropout_mask(torch.Size([64]), 0.5, DropoutKey(0, 0, 1), 0, torch.device("cpu"), torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("num_stages, schedule", [(1, "1f1b"), (2, "gpipe"), (3, "1f1b"), (4, "1f1b")]
                         + [(4, name) for name in ("zb-h1", "zbv") if name in SCHEDULES])
def test_dropout_is_the_same_on_every_partition_and_equals_the_seeded_reference(num_stages: int, schedule: str,
                                                                                one_thread: None) -> None:
    model = Dropouts()
    x, target = _data((8, 8))
    plan = _compile(model, x, target, num_stages=num_stages, num_microbatches=4, schedule=schedule)
    assert_same_step(model, (x,), F.mse_loss, target, plan)
    # a second step draws new masks (step 1), and the reference for step 1 draws them too
    for _, param in plan.named_parameters():
        param.grad = None
    loss_1 = plan.run_local(x, target=target)
    expected_loss_1, expected_1 = reference_step(model, (x,), F.mse_loss, target, 4, step=1)
    torch.testing.assert_close(loss_1, expected_loss_1, rtol=1e-5, atol=1e-6)
    assert_same_grads({n: p.grad for n, p in plan.named_parameters()}, expected_1)
    expected_loss_0, _ = reference_step(model, (x,), F.mse_loss, target, 4, step=0)
    assert not torch.allclose(expected_loss_0, expected_loss_1), "steps 0 and 1 drew the same masks"


def test_dropout_seed_changes_the_masks_and_eval_turns_dropout_off(one_thread: None) -> None:
    model = Dropouts()
    x, target = _data((8, 8))
    plan = _compile(model, x, target, num_stages=2, num_microbatches=2)
    plan.dropout_seed = 7
    assert_same_step(model, (x,), F.mse_loss, target, plan)
    seed_0, _ = reference_step(model, (x,), F.mse_loss, target, 2, dropout_seed=0, step=1)
    seed_7, _ = reference_step(model, (x,), F.mse_loss, target, 2, dropout_seed=7, step=1)
    assert not torch.allclose(seed_0, seed_7)
    model.eval()  # the plan's seeded dropouts follow the model's modules (F.dropout reads self.training at trace)
    eval_plan = _compile(model, x, target, num_stages=2, num_microbatches=2)
    assert_same_step(model, (x,), F.mse_loss, target, eval_plan)


def _gloo_state_steps() -> list[Any]:
    """On each of 2 ranks: a dropout step (two steps) and a BatchNorm step; this rank's grads and buffers."""
    results = []
    model = Dropouts()
    x, target = _data((8, 8))
    runner = _compile(model, x, target, num_stages=2, num_microbatches=4).runner(timeout_s=60)
    for _ in range(2):
        for param in runner.parameters():
            param.grad = None
        loss = runner.step(x, target=target, broadcast_loss=True)
        results.append((float(loss), {n: p.grad.clone() for n, p in runner.named_parameters()}))
    model = ConvBatchNorm()
    x, target = _data((8, 3, 6, 6))
    plan = _compile(model, x, target, num_stages=2, num_microbatches=4)
    runner = plan.runner(timeout_s=60)
    loss = runner.step(x, target=target, broadcast_loss=True)
    mine = {b.canonical_name for s in runner.local_stages for b in s.params if not b.is_parameter}
    results.append((float(loss), {n: p.grad.clone() for n, p in runner.named_parameters()},
                    {n: b.clone() for n, b in model.named_buffers() if n in mine}))
    return results


@pytest.mark.dist
def test_dropout_and_batchnorm_over_gloo_equal_the_reference() -> None:
    """Over 2 gloo ranks: the same dropout masks as in one process (reproducible across rank counts),
    and each rank's BatchNorm buffers equal the unpartitioned model's."""
    per_rank = run_ranks(_gloo_state_steps, 2)
    x, target = _data((8, 8))
    for step in range(2):
        expected_loss, expected = reference_step(Dropouts(), (x,), F.mse_loss, target, 4, step=step)
        for rank in range(2):
            loss, grads = per_rank[rank][step]
            torch.testing.assert_close(torch.tensor(loss), expected_loss, rtol=1e-5, atol=1e-6)
            assert_same_grads(grads, expected)
    model = ConvBatchNorm()
    x, target = _data((8, 3, 6, 6))
    expected_buffers = _reference_buffers(model, x, 4)
    _, expected = reference_step(model, (x,), F.mse_loss, target, 4)
    held: set[str] = set()
    for rank in range(2):
        _, grads, buffers = per_rank[rank][2]
        assert_same_grads(grads, expected)
        for name, buffer in buffers.items():
            torch.testing.assert_close(buffer, expected_buffers[name], rtol=1e-5, atol=1e-6)
        held |= set(buffers)
    assert held == set(expected_buffers), f"buffers on no rank: {set(expected_buffers) - held}"
