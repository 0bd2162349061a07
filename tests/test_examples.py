"""The example models: they run, trace exactly, are deterministic, and suit micro-batching."""

import importlib
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from torch import Tensor, fx, nn

EXAMPLES = ["mlp", "gpt", "bert", "resnet", "unet"]


def _example(name: str) -> ModuleType:
    """Returns the module examples.<name>."""
    return importlib.import_module(f"examples.{name}")


class _LossOnly(nn.Module):
    """Wraps a loss function so fx can trace it with proxies for the output and target."""

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(output, target)


@pytest.mark.parametrize("name", EXAMPLES)
def test_forward_backward_gives_finite_loss_and_grads(name: str) -> None:
    model, inputs, loss_fn, target = _example(name).build()
    loss = loss_fn(model(*inputs), target)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", EXAMPLES)
def test_symbolic_trace_gives_the_same_output(name: str) -> None:
    model, inputs, loss_fn, target = _example(name).build()
    gm = fx.symbolic_trace(model)
    assert torch.equal(gm(*inputs), model(*inputs))

    output = model(*inputs)
    loss_gm = fx.symbolic_trace(_LossOnly(loss_fn))
    assert torch.equal(loss_gm(output, target), loss_fn(output, target))


@pytest.mark.parametrize("name", EXAMPLES)
def test_build_is_deterministic(name: str) -> None:
    model_a, inputs_a, _, target_a = _example(name).build(seed=0)
    model_b, inputs_b, _, target_b = _example(name).build(seed=0)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert len(inputs_a) == len(inputs_b)
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)
    assert torch.equal(target_a, target_b)

    _, inputs_c, _, _ = _example(name).build(seed=1)
    assert not torch.equal(inputs_a[0], inputs_c[0])


@pytest.mark.parametrize("name", EXAMPLES)
def test_batch_dim_is_dim_0_and_loss_is_a_batch_mean(name: str) -> None:
    model, inputs, loss_fn, target = _example(name).build(batch_size=8)
    assert all(x.size(0) == 8 for x in inputs) and target.size(0) == 8
    full = loss_fn(model(*inputs), target)
    halves = [
        loss_fn(model(*(x[sl] for x in inputs)), target[sl])
        for sl in (slice(0, 4), slice(4, 8))
    ]
    # torch.allclose, not torch.testing.assert_close: the latter's first call costs ~1 s of imports.
    assert torch.allclose((halves[0] + halves[1]) / 2, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", EXAMPLES)
def test_no_batchnorm_or_dropout(name: str) -> None:
    model, _, _, _ = _example(name).build()
    banned = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Dropout)
    assert not [n for n, m in model.named_modules() if isinstance(m, banned)]


def test_gpt_lm_head_is_tied_to_the_token_embedding() -> None:
    model, _, _, _ = _example("gpt").build()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.bias is None
    gm = fx.symbolic_trace(model)
    assert gm.lm_head.weight is gm.tok_emb.weight
    assert "blocks.0.attn.q_proj.weight" in dict(model.named_parameters())


def test_gpt_target_is_the_next_token() -> None:
    _, (tokens,), _, target = _example("gpt").build()
    assert tokens.dtype == target.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], target[:, :-1])


def test_bert_every_layer_reads_the_mask_and_padding_is_ignored() -> None:
    model, (tokens, mask), _, _ = _example("bert").build()
    assert mask.dtype == torch.float32 and (mask == 0).any() and (mask[:, 0] == 1).all()

    gm = fx.symbolic_trace(model)
    mask_node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "mask")
    assert len(mask_node.users) == len(model.layers)

    # Changing padded tokens must not change the logits: attention never looks at them.
    other = torch.where(mask.bool(), tokens, (tokens + 7) % model.tok_emb.num_embeddings)
    assert not torch.equal(other, tokens)
    assert torch.allclose(model(other, mask), model(tokens, mask), rtol=1e-5, atol=1e-6)


def test_unet_first_skip_spans_most_of_the_network() -> None:
    model, _, _, _ = _example("unet").build()
    nodes = list(fx.symbolic_trace(model).graph.nodes)
    # down1's ReLU module runs twice; its second call produces the level-1 skip.
    skip1 = [n for n in nodes if n.op == "call_module" and n.target == "down1.relu"][-1]
    last_use = max(nodes.index(user) for user in skip1.users)
    assert nodes.index(skip1) < 0.2 * len(nodes) and last_use > 0.8 * len(nodes)
