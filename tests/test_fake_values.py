"""Memoised fake propagation (passes/fake_values.py) gives every node the meta["val"] that plain
FakeTensorProp gives, and shares nothing whose output one run cannot predict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_leaves

from pipecc.passes.capture import _FakeValueProp, _trace_fx, capture

NUM_CALLS = {"grow": 0}


@torch.fx.wrap
def grow(x: torch.Tensor) -> torch.Tensor:
    """A user function with state: each call returns a wider tensor."""
    NUM_CALLS["grow"] += 1
    return x.repeat(1, NUM_CALLS["grow"])[:, :x.shape[1] + NUM_CALLS["grow"] % 2]


class Repeated(nn.Module):
    """Repeated blocks that write into and view memoised outputs, draw random numbers and read sizes."""

    def __init__(self, num_blocks: int = 6) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            h = fc(x)
            h.relu_()  # in place on what may be a memoised output: it must not be a leaf
            h.unsqueeze_(0).squeeze_(0)  # writes into its metadata: no other node's meta["val"] may change
            v = h.view(-1, 4).transpose(0, 1).contiguous().transpose(0, 1).reshape(x.shape)
            h = self.relu(self.norm(v))
            h = F.dropout(h, 0.1, training=True) * torch.rand_like(h)
            x = x + h.sum(-1, keepdim=True).expand(h.size()).to(h.dtype) + h.requires_grad
        return x


class Hooked(nn.Module):
    """Two identical Linears, one with a forward hook that changes its output: not the same call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.register_forward_hook(lambda module, args, out: out[:, :4].repeat(1, 2).t().contiguous().t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


class Stateful(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grow(x).sum() + grow(x).sum() + x


def _describe(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device,
                value.requires_grad)
    if isinstance(value, (tuple, list)):
        return tuple(_describe(v) for v in value)
    return (type(value), value)


def _traced(model: nn.Module) -> tuple[fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    inputs = (torch.randn(2, 8), torch.randn(2, 8))
    return _trace_fx(model, lambda out, t: F.mse_loss(out, t), inputs[:1], inputs[1]), inputs


def _plain_values(model: nn.Module) -> dict[str, object]:
    """meta["val"] per node from torch's own FakeTensorProp, every node run."""
    gm, inputs = _traced(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    with _reparametrize_module(gm, {name: mode.from_tensor(t) for name, t in tensors.items()}):
        FakeTensorProp(gm, mode).propagate(*inputs)
    return {n.name: _describe(n.meta["val"]) for n in gm.graph.nodes if "val" in n.meta and n.op != "output"}


def _memoised_values(model: nn.Module) -> tuple[fx.GraphModule, _FakeValueProp]:
    gm, inputs = _traced(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeValueProp(gm, mode)
    prop.propagate(*inputs)
    return gm, prop


@pytest.mark.parametrize("model", [Repeated, Hooked, Stateful])
def test_memoised_values_are_those_of_plain_fake_propagation(model: type[nn.Module]) -> None:
    NUM_CALLS["grow"] = 0
    expected = _plain_values(model())
    NUM_CALLS["grow"] = 0
    gm, prop = _memoised_values(model())
    got = {n.name: _describe(n.meta["val"]) for n in gm.graph.nodes if n.name in expected}
    assert got == expected
    if model is Repeated:
        assert prop.memo.num_memoised > len(gm.graph.nodes) // 3


def test_views_and_writes_always_run() -> None:
    """A view aliases its input and a write changes it: neither has a recorded output to share."""
    gm, prop = _memoised_values(Repeated())
    recorded = prop.memo._recorded  # white box: what was recorded per signature (None: runs every time)
    for view in (("method", "view"), ("method", "transpose")):  # found aliasing at their first run
        seen = [value for key, value in recorded.items() if key[0] == view]
        assert seen and all(value is None for value in seen), view
    for write in (("method", "relu_"), ("method", "unsqueeze_")):  # refused by name: never even keyed
        assert not any(key[0] == write for key in recorded), write
    assert any(value is not None for key, value in recorded.items() if key[0][0] == "module")


def test_capture_of_repeated_blocks_writes_in_place_without_error() -> None:
    """relu_ on a memoised Linear output: a leaf that requires grad would refuse the write."""
    model = Repeated()
    captured = capture(model, (torch.randn(4, 8),), F.mse_loss, torch.randn(4, 8), num_microbatches=2)
    leaves = [leaf for n in captured.graph_module.graph.nodes for leaf in tree_leaves(n.meta.get("val"))
              if isinstance(leaf, torch.Tensor)]
    assert leaves and not any(leaf.requires_grad for leaf in leaves)  # meta["val"] is detached, as FakeTensorProp's
