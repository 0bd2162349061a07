"""Error messages are outputs: each says what went wrong and where (line one) and how to fix it (line two)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecc
from examples import mlp
from pipecc import CaptureError, ConfigError, PartitionError

# 2 hidden layers: 6 compute nodes (layers_0, act, layers_1, act_1, head, mse_loss).
MODEL, INPUTS, LOSS_FN, TARGET = mlp.build(batch_size=8, num_layers=2, hidden=16, in_features=8, out_features=4)


def _compile(model: nn.Module = MODEL, inputs: Any = INPUTS, *, loss_fn: Callable[..., torch.Tensor] = LOSS_FN,
             target: Any = TARGET, **options: Any) -> pipecc.Plan:
    options = {"num_stages": 2, "num_microbatches": 2, **options}
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, **options)


@pytest.fixture(scope="module")
def plan() -> pipecc.Plan:
    return _compile()


def test_more_stages_than_graph_nodes() -> None:
    with pytest.raises(PartitionError, match=r"num_stages=50 but the graph has only 6 compute nodes, and every stage "
                                             r"needs one\.\nUse num_stages <= 6"):
        _compile(num_stages=50)


def test_zero_stages() -> None:
    with pytest.raises(ConfigError, match=r"num_stages=0; it must be a positive integer"):
        _compile(num_stages=0)


def test_zero_microbatches() -> None:
    with pytest.raises(ConfigError, match=r"num_microbatches=0; it must be a positive integer"):
        _compile(num_microbatches=0)


def test_batch_not_divisible_by_microbatches_lists_the_divisors() -> None:
    with pytest.raises(ConfigError, match=r"batch size 8 does not divide into num_microbatches=3 equal micro-batches\.\n"
                                          r"Use a num_microbatches that divides 8 \(1, 2, 4, 8\)"):
        _compile(num_microbatches=3)


def test_more_microbatches_than_samples() -> None:
    with pytest.raises(ConfigError, match=r"num_microbatches=16 .*\nUse a num_microbatches that divides 8"):
        _compile(num_microbatches=16)


def test_inputs_with_different_batch_sizes() -> None:
    x = INPUTS[0]
    with pytest.raises(ConfigError, match=r"example_inputs\[1\] has batch size 4 \(dim 0\) but example_inputs\[0\] "
                                          r"has 8\.\n.*give them the same batch size"):
        _compile(inputs=(x, x[:4]))
    with pytest.raises(ConfigError, match=r"example_target has batch size 6 .* example_inputs\[0\] has 8"):
        _compile(target=TARGET[:6])


def test_non_tensor_input() -> None:
    with pytest.raises(ConfigError, match=r"example_inputs\[1\] is of type int, .*must be a tensor\.\n"
                                          r"Pass tensors only"):
        _compile(inputs=(INPUTS[0], 3))
    with pytest.raises(ConfigError, match=r"example_inputs must be a tuple of tensors, got Tensor\.\n"
                                          r"Wrap a single input as \(x,\)"):
        _compile(inputs=INPUTS[0])
    with pytest.raises(ConfigError, match=r"example_target is of type list"):
        _compile(target=TARGET.tolist())
    with pytest.raises(ConfigError, match=r"example_inputs\[0\] is a 0-d tensor.*\nGive it a leading batch"):
        _compile(inputs=(torch.tensor(1.0),))


def test_unknown_schedule() -> None:
    with pytest.raises(ConfigError, match=r"unknown schedule 'zigzag'; pipecc knows .*1f1b.*\nPass one of those"):
        _compile(schedule="zigzag")


def test_unknown_device() -> None:
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'; built-in devices are .*\nPass one of those"):
        _compile(device="tpu")


def test_memory_limit_infeasible_gives_the_smallest_feasible_limit() -> None:
    with pytest.raises(PartitionError, match=r"no partition into 2 stages fits max_memory_bytes=100 \(100 B\); "
                                             r"the smallest feasible limit is \d+ bytes .*\nRaise max_memory_bytes"):
        _compile(max_memory_bytes=100)


def test_non_positive_memory_limit() -> None:
    with pytest.raises(ConfigError, match=r"max_memory_bytes=0; it must be positive"):
        _compile(max_memory_bytes=0)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent: no tracer can make one graph of this
            y = -y
        return y


def test_untraceable_model_names_the_line_and_the_fix() -> None:
    with pytest.raises(CaptureError, match=r"(?s)cannot capture Untraceable: no tracing path worked\.\n"
                                           r".*test_errors\.py:\d+ in forward: if y\.sum\(\) > 0:.*\nFix: .*torch\.where"):
        _compile(Untraceable())


def test_loss_fn_returning_a_non_scalar() -> None:
    def per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target, reduction="none")

    with pytest.raises(ConfigError, match=r"loss_fn\(model\(\*inputs\), target\) gives a torch\.float32 tensor of "
                                          r"shape \(4, 4\); pipecc needs a scalar float loss\.\nReduce the loss with \.mean\(\)"):
        _compile(loss_fn=per_sample)


def test_missing_required_forward_argument() -> None:
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    with pytest.raises(ConfigError, match=r"TwoInputs\.forward needs argument 'y' but example_inputs has only 1 "
                                          r"tensors\.\nPass a tensor for every required argument"):
        _compile(TwoInputs(), inputs=(torch.randn(8, 4),))


def test_run_local_with_a_different_shape(plan: pipecc.Plan) -> None:
    x = INPUTS[0]
    with pytest.raises(ConfigError, match=r"input 0 has shape \(4, 8\) and dtype float32, but the plan was compiled "
                                          r"for shape \(8, 8\) and dtype float32\.\nShapes are static in a plan"):
        plan.run_local(x[:4], target=TARGET[:4])
    with pytest.raises(ConfigError, match=r"the plan takes 1 input, got 2"):
        plan.run_local(x, x, target=TARGET)


def test_run_local_with_a_different_dtype(plan: pipecc.Plan) -> None:
    with pytest.raises(ConfigError, match=r"input 0 has shape \(8, 8\) and dtype float64, but the plan was compiled "
                                          r"for shape \(8, 8\) and dtype float32"):
        plan.run_local(INPUTS[0].double(), target=TARGET)
    with pytest.raises(ConfigError, match=r"target has shape \(8, 4\) and dtype float16"):
        plan.run_local(*INPUTS, target=TARGET.half())


def test_runner_without_a_process_group(plan: pipecc.Plan) -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"plan\.runner\(\) needs an initialised torch\.distributed process group\.\n"
                                          r"Launch with torchrun"):
        plan.runner()


def test_every_error_is_a_pipecc_error() -> None:
    for cls in (ConfigError, CaptureError, PartitionError, pipecc.ScheduleError, pipecc.CodegenError,
                pipecc.PlanFileError, pipecc.PipelineRuntimeError):
        assert issubclass(cls, pipecc.PipeccError)
    assert issubclass(ConfigError, ValueError)
