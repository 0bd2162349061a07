"""The split-backward pass: F, B and W graphs per stage, B then W bitwise equal to the fused
autograd backward, ops with an output_mask split into input and weight parts, nothing computed
twice, less memory held between B and W than autograd's saved tensors, and a logged fallback to
the autograd split where a graph split is impossible."""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import fx, nn

import pipecc
from pipecc.ir import InputKind, Stage
from pipecc.passes import split_backward as sb
from pipecc.passes.split_backward import (SplitBackwardError, check_split_backward, distinct_storage_bytes,
                                          split_backward, split_backward_stages)
from pipecc.plan import Plan
from pipecc.testing import assert_same_step
from models import build


# ---------------------------------------------------------------- small models beside the examples

class ConvBatchNorm(nn.Module):
    """conv -> BatchNorm (running statistics: buffers updated in the forward) -> ReLU, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64),
                                  nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Dropout(0.25), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_small(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    if name == "convbn":
        return ConvBatchNorm(), (torch.randn(8, 3, 8, 8),), nn.functional.mse_loss, torch.randn(8, 4, 8, 8)
    if name == "dropout":
        return DropoutMLP(), (torch.randn(8, 16),), nn.functional.mse_loss, torch.randn(8, 4)
    return build(name)


@functools.lru_cache(maxsize=None)
def compiled(name: str, num_stages: int = 2, num_microbatches: int = 2) -> Plan:
    """One compile per configuration: compiling dominates these tests' time."""
    model, inputs, loss_fn, target = build_small(name)
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=num_microbatches)


@dataclass
class StageCall:
    """One micro-batch's real arguments to each stage, and random output gradients."""

    args: list[torch.Tensor]
    output_grads: list[torch.Tensor]


def stage_calls(name: str, plan: Plan) -> list[StageCall]:
    """Arguments of every stage for micro-batch 0, by running the stages in order (eagerly)."""
    _, inputs, _, target = build_small(name)
    m = plan.config.num_microbatches
    micro_inputs = [t.chunk(m)[0] for t in inputs]
    micro_target = target.chunk(m)[0]
    calls, received = [], []
    generator = torch.Generator().manual_seed(1)
    for stage in plan.stages:
        received_iter = iter(received)
        args = [next(received_iter) if i.kind is InputKind.ACTIVATION
                else micro_target if i.kind is InputKind.TARGET else micro_inputs[i.input_index] for i in stage.inputs]
        with torch.no_grad():
            outputs = stage.graph(*args)
        grads = [torch.randn(o.shape, generator=generator) for o in outputs]
        calls.append(StageCall(args, grads))
        received = list(outputs)
    return calls


def weights_of(stage: Stage, names: tuple[str, ...]) -> list[torch.Tensor]:
    tensors = dict(stage.graph.named_parameters(remove_duplicate=False))
    tensors.update(stage.graph.named_buffers(remove_duplicate=False))
    return [tensors[n] for n in names]


def fused_backward(stage: Stage, split_names: tuple[str, ...], call: StageCall, grad_inputs: tuple[int, ...],
                   tangents: tuple[int, ...]) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None]]:
    """The stage's outputs and autograd's gradients (input grads, then parameter grads)."""
    leaves = [a.detach().requires_grad_(i in grad_inputs) for i, a in enumerate(call.args)]
    with torch.enable_grad():
        outputs = stage.graph(*leaves)
    wrt = [leaves[i] for i in grad_inputs] + weights_of(stage, split_names)
    grads = torch.autograd.grad([outputs[i] for i in tangents], wrt, [call.output_grads[i] for i in tangents],
                                allow_unused=True)
    return tuple(o.detach() for o in outputs), list(grads)


# ---------------------------------------------------------------- bitwise equality

@pytest.mark.parametrize("name", ("mlp", "gpt", "unet", "resnet", "convbn"))
def test_b_then_w_is_bitwise_the_fused_backward(name: str) -> None:
    """MLP, attention blocks (gpt), conv + GroupNorm (unet, resnet), conv + BatchNorm:
    F's outputs and B+W's gradients are torch.equal to the eager forward and autograd's backward,
    for every stage, and BatchNorm's running statistics move identically."""
    plan = compiled(name)
    calls = stage_calls(name, plan)
    for stage, call in zip(plan.stages, calls):
        split = split_backward(stage)
        check_split_backward(stage, split)
        buffers = [b for _, b in stage.graph.named_buffers()]
        before = [b.clone() for b in buffers]
        expected_outputs, expected = fused_backward(stage, split.grad_param_names, call, split.grad_input_positions,
                                                    split.tangent_positions)
        eager_buffers = [b.clone() for b in buffers]
        for buffer, value in zip(buffers, before):
            buffer.copy_(value)
        outputs, input_grads, param_grads = sb.run_split_step(
            split, weights_of(stage, split.weight_names), call.args,
            lambda outs: [call.output_grads[i] for i in split.tangent_positions])
        assert all(torch.equal(a, b) for a, b in zip(outputs, expected_outputs)), f"stage {stage.index} outputs"
        assert all(torch.equal(a, b) for a, b in zip(buffers, eager_buffers)), f"stage {stage.index} buffers"
        got = input_grads + param_grads
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert (g is None) == (e is None), f"stage {stage.index} gradient {i}: {g is None} vs {e is None}"
            assert g is None or torch.equal(g, e), f"stage {stage.index} gradient {i} differs"
        assert any(g is not None for g in param_grads)


# ---------------------------------------------------------------- how the backward is cut

def _calls(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "").startswith(name)]


@pytest.mark.parametrize("name,op,weight_part_in", [
    ("unet", "convolution_backward", "W"), ("convbn", "convolution_backward", "W"),
    ("unet", "native_group_norm_backward", "B"), ("gpt", "native_layer_norm_backward", "B"),
    ("convbn", "native_batch_norm_backward", "B")])
def test_output_mask_ops_split_into_input_and_weight_parts(name: str, op: str, weight_part_in: str) -> None:
    """Each op computing input and weight gradients at once becomes two: the input part in B, the
    weight part in W for a convolution (the costly half that zero-bubble schedules defer) and in B
    for a norm (light, and running it early frees its activation-sized inputs: see
    _cheap_reductions_for_b)."""
    plan = compiled(name)
    stage = next(s for s in plan.stages if any(i.spec.requires_grad for i in s.activation_inputs))
    split = split_backward(stage)
    in_b, in_w = _calls(split.backward_input, op), _calls(split.backward_weight, op)
    mask = lambda n: [bool(m) for m in n.args[-1]]  # noqa: E731
    input_parts = [n for n in in_b if mask(n)[0]]
    weight_parts = [n for n in (in_w if weight_part_in == "W" else in_b) if not mask(n)[0]]
    assert input_parts and all(mask(n)[1:] == [False, False] for n in input_parts), [mask(n) for n in in_b]
    assert weight_parts and all(any(mask(n)[1:]) for n in weight_parts), [mask(n) for n in in_b + in_w]
    assert len(input_parts) + len(weight_parts) == len(in_b) + len(in_w)
    assert len(input_parts) == len(weight_parts)


@pytest.mark.parametrize("name", ("gpt", "unet", "convbn"))
def test_b_and_w_compute_nothing_twice(name: str) -> None:
    """B and W together hold exactly the joint graph's backward ops (after cutting each output_mask
    op in two), each once: a value both need is computed once, in B, and handed to W. The costly
    ops (mm, bmm, convolution_backward halves aside) appear as often as in the fused backward."""
    for stage in compiled(name).stages:
        sig = sb._signature(stage)
        joint = sb._trace_joint(stage, sig)

        def backward_ops() -> list[fx.Node]:
            placeholders, flat = sb._joint_boundary(joint, sig)
            forward = sb._forward_nodes(joint, sig, placeholders, flat)
            found = sb._ancestors(flat[sig.num_outputs:], stop=forward | set(placeholders))
            return [n for n in joint.graph.nodes if n in found]

        fused = backward_ops()
        sb._split_output_mask_ops(joint, sig)
        cut = backward_ops()
        split = sb._partition_joint(joint, sig)
        b_ops = [n for n in split.backward_input.graph.nodes if n.op == "call_function"]
        w_ops = [n for n in split.backward_weight.graph.nodes if n.op == "call_function"]
        assert len(b_ops) + len(w_ops) == len(cut), (stage.index, len(b_ops), len(w_ops), len(cut))
        for op in ("mm", "bmm", "_scaled_dot_product_flash_attention_for_cpu_backward", "gelu_backward"):
            count = lambda nodes: sum(1 for n in nodes if getattr(n.target, "__name__", "").split(".")[0] == op)  # noqa: E731
            assert count(b_ops) + count(w_ops) == count(fused), (stage.index, op)


# ---------------------------------------------------------------- memory between B and W

def held_between_b_and_w(stage: Stage, call: StageCall) -> tuple[int, int]:
    """(bytes the graph split holds between B and W, bytes autograd holds: its saved tensors plus
    the output gradients W re-walks the graph with), weights not counted."""
    split = split_backward(stage)
    weights = weights_of(stage, split.weight_names)
    with torch.no_grad():
        forward = split.forward(*weights, *call.args)
        saved = forward[len(stage.outputs):]
        tangents = [call.output_grads[i] for i in split.tangent_positions]
        backward = split.backward_input(*weights, *saved, *tangents)
    held = backward[len(split.grad_input_positions):]
    graph_bytes = distinct_storage_bytes(held, excluding=weights)

    autograd_saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        autograd_saved.append(tensor)
        return tensor

    leaves = [a.detach().requires_grad_(i in split.grad_input_positions) for i, a in enumerate(call.args)]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage.graph(*leaves)
    autograd_bytes = distinct_storage_bytes(autograd_saved + tangents, excluding=weights)
    return graph_bytes, autograd_bytes


@pytest.mark.parametrize("name", ("gpt", "unet"))
def test_w_holds_less_than_the_autograd_graph(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """For every stage that has a B to run (its inputs need gradients), what W keeps alive after B
    is smaller than what the autograd-level split keeps (the whole graph's saved tensors)."""
    plan = compiled(name, num_stages=4, num_microbatches=2)
    calls = stage_calls(name, plan)
    rows = []
    for stage, call in zip(plan.stages, calls):
        graph_bytes, autograd_bytes = held_between_b_and_w(stage, call)
        rows.append((stage.index, graph_bytes, autograd_bytes))
        if any(i.spec.requires_grad for i in stage.activation_inputs):
            assert graph_bytes < autograd_bytes, f"stage {stage.index}: W holds {graph_bytes} B, autograd {autograd_bytes} B"
    with capsys.disabled():
        print(f"\n{name}: bytes held between B and W per stage (graph split / autograd split): "
              + ", ".join(f"stage {s}: {g} / {a} ({g / a:.2f})" for s, g, a in rows))


# ---------------------------------------------------------------- compile, load, fallback

def test_compile_runs_the_pass_for_split_schedules() -> None:
    """A zero-bubble schedule gets F/B/W graphs on every stage; 1f1b (only BW) gets none."""
    assert all(s.backward_split is None for s in compiled("mlp").stages)
    model, inputs, loss_fn, target = build("gpt")
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=4, schedule="zb-h1")
    assert all(s.backward_split is not None for s in plan.stages)
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_loaded_plan_cuts_the_graphs_again(tmp_path: object) -> None:
    model, inputs, loss_fn, target = build("unet")
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=2, schedule="zb-h1")
    plan.save(tmp_path)
    loaded = pipecc.load(tmp_path)
    assert all(s.backward_split is not None for s in loaded.stages)
    one_rank = pipecc.load(tmp_path, rank=1)
    assert [s.backward_split is not None for s in one_rank.stages] == [False, True]
    assert_same_step(model, inputs, loss_fn, target, loaded)


class _DoubleGradInPlace(torch.autograd.Function):
    """Identity whose backward doubles the incoming gradient in place: a graph split must refuse it
    (W could read a tensor that B has since changed)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone().mul_(2)


@torch.fx.wrap
def double_grad(x: torch.Tensor) -> torch.Tensor:
    return _DoubleGradInPlace.apply(x)


class InPlaceBackwardMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(double_grad(torch.relu(self.fc1(x))))))


def test_unsplittable_stage_falls_back_to_autograd(caplog: pytest.LogCaptureFixture) -> None:
    """A stage whose backward mutates in place keeps the autograd split, says why, and still
    computes the unpartitioned gradients; the other stage gets graphs."""
    torch.manual_seed(0)
    model, inputs, target = InPlaceBackwardMLP(), (torch.randn(8, 16),), torch.randn(8, 4)
    loss_fn = nn.functional.mse_loss
    with caplog.at_level(logging.WARNING, logger="pipecc.passes.split_backward"):
        plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                              num_microbatches=2, schedule="zb-h1")
    stage_of_double = next(s.index for s in plan.stages if any("double_grad" in n for n in s.node_names))
    assert [s.backward_split is None for s in plan.stages] == [s.index == stage_of_double for s in plan.stages]
    assert f"stage {stage_of_double}: backward split at autograd level" in caplog.text
    assert "mutates a tensor in place" in caplog.text
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_seeded_dropout_stages_keep_the_autograd_split(caplog: pytest.LogCaptureFixture) -> None:
    """Seeded dropout reads its seed at run time (passes/rng.py), which a traced graph would bake
    in: such a stage keeps the autograd split, with the reason logged, and the step still equals
    the unpartitioned one under the same dropout masks."""
    model, inputs, loss_fn, target = build_small("dropout")
    with caplog.at_level(logging.WARNING, logger="pipecc.passes.split_backward"):
        plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                              num_microbatches=2, schedule="zb-h1")
    with_dropout = [any("seeded_dropout" in str(n.target) for n in s.graph.graph.nodes) for s in plan.stages]
    assert with_dropout == [False, True]
    assert [s.backward_split is None for s in plan.stages] == with_dropout
    assert "make_fx could not trace the joint graph" in caplog.text
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_check_split_backward_rejects_a_wrong_signature() -> None:
    stage = compiled("mlp").stages[1]
    split = split_backward(stage)
    broken = type(split)(**{**split.__dict__, "num_held": split.num_held + 1})
    with pytest.raises(SplitBackwardError, match=r"stage 1: backward_input takes/returns"):
        check_split_backward(stage, broken)
    assert split_backward_stages([stage])[0].backward_split is not None
