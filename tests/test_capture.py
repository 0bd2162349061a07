"""Capture: fx first, torch.export when fx cannot, a clear CaptureError when nothing can."""

from __future__ import annotations

import importlib
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecc
from pipecc.passes.capture import capture
from pipecc.testing import assert_same_step

SMALL = {
    "mlp": {"num_layers": 2, "hidden": 16},
    "gpt": {"vocab_size": 128, "d_model": 16, "n_layers": 2, "n_heads": 2, "seq_len": 8},
    "bert": {"vocab_size": 128, "d_model": 16, "n_layers": 2, "n_heads": 2, "seq_len": 8},
    "resnet": {"width": 8, "num_blocks": 2, "image_size": 8},
    "unet": {"base": 4, "image_size": 16},
}


class ShapeBranch(nn.Module):
    """fx cannot trace `if` on a shape (a Proxy has no truth value); torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if x.shape[1] > 4:
            h = h * 2
        return self.c(torch.tanh(self.b(h)))


class DataBranch(ShapeBranch):
    """Branches on a tensor's value: no tracer can turn this into one graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.c(torch.tanh(self.b(h)))


class OptionalMask(ShapeBranch):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h * mask
        return self.c(torch.tanh(self.b(h)))


def _data(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch_size, 8), torch.randn(batch_size, 3)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_examples_are_captured_by_fx_with_a_value_on_every_node(name: str) -> None:
    model, inputs, loss_fn, target = importlib.import_module(f"examples.{name}").build(**SMALL[name])
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    assert captured.method == "symbolic_trace"
    graph = captured.graph_module.graph
    assert [n.name for n in graph.nodes if "val" not in n.meta] == []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == [*captured.input_names, captured.target_name]
    assert all(n.meta["val"].shape[0] == captured.microbatch_size == 4 for n in placeholders)
    loss = next(n for n in graph.nodes if n.op == "output").args[0]
    assert loss.meta["val"].shape == ()
    # Parameters are the model's own tensors, under their names in the model.
    own = dict(model.named_parameters())
    for qualified, param in captured.graph_module.named_parameters():
        assert param is own[captured.canonical_names[qualified]]


def test_shape_branch_falls_back_to_export_and_runs_the_same_step() -> None:
    x, target = _data()
    model = ShapeBranch()
    plan = pipecc.compile(model, (x,), loss_fn=F.mse_loss, example_target=target, num_stages=2, num_microbatches=2)
    assert plan.capture_method == "export(strict=False)"
    assert_same_step(model, (x,), F.mse_loss, target, plan)


def test_export_graph_has_a_value_on_every_node_and_returns_the_bare_loss() -> None:
    x, target = _data()
    captured = capture(ShapeBranch(), (x,), F.mse_loss, target, num_microbatches=2)
    graph = captured.graph_module.graph
    assert [n.name for n in graph.nodes if "val" not in n.meta] == []
    assert not [n for n in graph.nodes if n.op == "call_module"]  # export's input guards are gone
    loss = next(n for n in graph.nodes if n.op == "output").args[0]
    assert isinstance(loss, torch.fx.Node) and loss.meta["val"].shape == ()
    assert captured.graph_module(x[:4], target[:4]).shape == ()


def test_data_dependent_branch_is_a_capture_error_naming_the_source_line() -> None:
    x, target = _data()
    lines, first = inspect.getsourcelines(DataBranch.forward)
    line = first + next(i for i, text in enumerate(lines) if "if h.sum() > 0:" in text)
    where = f"{os.path.basename(__file__)}:{line}"
    with pytest.raises(pipecc.CaptureError, match=r"cannot capture DataBranch") as info:
        pipecc.compile(DataBranch(), (x,), loss_fn=F.mse_loss, example_target=target, num_stages=2,
                       num_microbatches=2)
    message = str(info.value)
    assert f"(at {where} in forward: if h.sum() > 0:)" in message
    assert "symbolic_trace" in message and "export(strict=False)" in message
    assert "Fix:" in message and "torch.where" in message


def test_optional_argument_left_out_is_traced_with_its_default() -> None:
    x, target = _data()
    model = OptionalMask()
    plan = pipecc.compile(model, (x,), loss_fn=F.mse_loss, example_target=target, num_stages=2, num_microbatches=2)
    assert plan.capture_method == "symbolic_trace"
    assert_same_step(model, (x,), F.mse_loss, target, plan)


def test_optional_argument_supplied_is_an_input() -> None:
    x, target = _data()
    mask = (torch.arange(8) % 2).float().expand(8, 8).contiguous()
    model = OptionalMask()
    plan = pipecc.compile(model, (x, mask), loss_fn=F.mse_loss, example_target=target, num_stages=2,
                          num_microbatches=2)
    assert_same_step(model, (x, mask), F.mse_loss, target, plan)


def test_missing_required_argument_is_a_config_error() -> None:
    x, target = _data()

    class TwoInputs(ShapeBranch):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x) + y)

    with pytest.raises(pipecc.ConfigError, match=r"forward needs argument 'y'.*\nPass a tensor for every"):
        capture(TwoInputs(), (x,), F.mse_loss, target, num_microbatches=1)


class DeviceReadLate(nn.Module):
    """`x.device` and `x.dtype` are read at the start and used at the end: constants every cut may cross."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = x.device, x.dtype
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) + torch.ones(3, device=device, dtype=dtype)


def test_device_and_dtype_values_are_constants_that_stages_can_cut_across() -> None:
    x, target = _data()
    model = DeviceReadLate()
    captured = capture(model, (x,), F.mse_loss, target, num_microbatches=2)
    getattrs = [n for n in captured.graph_module.graph.nodes if n.target is getattr]
    assert [n.meta["val"] for n in getattrs] == [torch.device("cpu"), torch.float32]
    plan = pipecc.compile(model, (x,), loss_fn=F.mse_loss, example_target=target, num_stages=4, num_microbatches=2)
    assert_same_step(model, (x,), F.mse_loss, target, plan)
