"""torch.compile(backend="pipecc"): pipelined training equals eager training, in one process and
over gloo ranks; graphs that are not a training step are refused with the place they end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from examples import gpt
from pipecc.backend import BackendOptions
from pipecc.errors import ConfigError
from pipecc.passes.schedules import SCHEDULES
from pipecc.testing import assert_same_grads, run_ranks

NUM_STEPS = 3
LR = 0.5  # large, so three steps move the parameters well past round-off


def _small_gpt() -> tuple:
    return gpt.build(batch_size=8, vocab_size=512, d_model=32, n_layers=2, seq_len=16)


def _eager_training(num_steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final parameters of plain SGD on the unpartitioned model."""
    model, inputs, loss_fn, target = _small_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(num_steps):
        optimizer.zero_grad()
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _compiled_training(schedule: str, num_steps: int) -> tuple[list[float], dict[str, torch.Tensor], set[str]]:
    """The same training through torch.compile(backend="pipecc"): losses, this process's parameters,
    and the names of those that received a gradient."""
    torch._dynamo.reset()
    model, inputs, loss_fn, target = _small_gpt()
    options = {"num_microbatches": 4, "schedule": schedule}
    if not dist.is_initialized():
        options["num_stages"] = 2
    step = torch.compile(lambda x, y: loss_fn(model(x), y), backend="pipecc", options=options)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = step(*inputs, target)
        loss.backward()
        held = {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, held


def _train_on_ranks(schedules: list[str]) -> list[tuple[list[float], dict[str, torch.Tensor], set[str]]]:
    return [_compiled_training(s, NUM_STEPS) for s in schedules]


def _schedules_to_test() -> list[str]:
    """1f1b, and the first zero-bubble schedule where one is registered."""
    zero_bubble = [name for name in SCHEDULES if name.startswith("zb")]
    return ["1f1b", *zero_bubble[:1]]


def _assert_matches_eager(losses: list[float], params: dict[str, torch.Tensor], names: set[str],
                          expected: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    expected_losses, expected_params = expected
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)
    assert_same_grads(params, expected_params, names)


def test_one_process_training_equals_eager() -> None:
    losses, params, held = _compiled_training("1f1b", NUM_STEPS)
    model = _small_gpt()[0]
    assert held == {n for n, _ in model.named_parameters()}  # every stage runs in this process
    _assert_matches_eager(losses, params, held, _eager_training(NUM_STEPS))


@pytest.mark.dist
def test_two_gloo_ranks_training_equals_eager() -> None:
    schedules = _schedules_to_test()
    per_rank = run_ranks(_train_on_ranks, 2, schedules)
    expected = _eager_training(NUM_STEPS)
    all_names = {n for n, _ in _small_gpt()[0].named_parameters()}
    for i, schedule in enumerate(schedules):
        held = [per_rank[r][i][2] for r in range(2)]
        assert held[0] and held[1] and held[0] | held[1] == all_names, (schedule, held)
        assert held[0] != held[1]  # each rank holds its share, not the whole model
        for rank in range(2):
            losses, params, names = per_rank[rank][i]
            _assert_matches_eager(losses, params, names, expected)  # the loss is broadcast to every rank


def test_graph_break_is_a_clear_error_naming_the_break() -> None:
    torch._dynamo.reset()
    model, inputs, loss_fn, target = _small_gpt()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
        torch._dynamo.graph_break()
        for block in model.blocks:
            hidden = block(hidden)
        return loss_fn(model.lm_head(model.ln_f(hidden)), y)

    compiled = torch.compile(step, backend="pipecc", options={"num_stages": 2, "num_microbatches": 2})
    with pytest.raises(Exception) as caught:
        compiled(*inputs, target)
    inner = getattr(caught.value, "inner_exception", caught.value)  # dynamo wraps backend errors
    assert isinstance(inner, ConfigError)
    message = str(inner)
    assert "not one scalar loss" in message and "test_backend.py:" in message and "graph_breaks" in message


def test_model_without_loss_is_refused() -> None:
    torch._dynamo.reset()
    model, inputs, _, _ = _small_gpt()
    compiled = torch.compile(model, backend="pipecc", options={"num_stages": 2})
    with pytest.raises(Exception) as caught:
        compiled(*inputs)
    assert "not one scalar loss" in str(getattr(caught.value, "inner_exception", caught.value))


def test_sum_loss_is_refused_instead_of_trained_wrong() -> None:
    """A pipeline averages micro-batch losses: a summed loss would train on a different objective."""
    torch._dynamo.reset()
    model, inputs, _, target = _small_gpt()
    summed = lambda x, y: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    step = torch.compile(summed, backend="pipecc",
                         options={"num_stages": 2, "num_microbatches": 2})
    with pytest.raises(Exception) as caught:
        step(*inputs, target)
    assert "is not the mean of its losses on 2 micro-batches" in str(getattr(caught.value, "inner_exception", caught.value))


def test_unknown_option_lists_the_known() -> None:
    with pytest.raises(ConfigError, match="(?s)unknown option 'stages'.*num_stages, num_microbatches, schedule"):
        BackendOptions.parse({"stages": 2})
    options = BackendOptions.parse({"num_stages": 4, "memory_limit": "1GiB", "schedule": "gpipe"}).resolved()
    assert options["num_stages"] == 4 and options["num_microbatches"] == 4 and options["max_memory_bytes"] == 2**30


def test_no_grad_runs_the_graph_as_is() -> None:
    torch._dynamo.reset()
    model, inputs, loss_fn, target = _small_gpt()
    step = torch.compile(lambda x, y: loss_fn(model(x), y), backend="pipecc",
                         options={"num_stages": 2, "num_microbatches": 2})
    step(*inputs, target)  # compiles with gradients on
    with torch.no_grad():
        loss = step(*inputs, target)
    torch.testing.assert_close(loss, loss_fn(model(*inputs), target).detach(), rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad


def test_grad_scales_with_the_incoming_gradient() -> None:
    torch._dynamo.reset()
    model, inputs, loss_fn, target = _small_gpt()
    reference = copy.deepcopy(model)
    step = torch.compile(lambda x, y: loss_fn(model(x), y), backend="pipecc",
                         options={"num_stages": 2, "num_microbatches": 4})
    (3.0 * step(*inputs, target)).backward()
    (3.0 * loss_fn(reference(*inputs), target)).backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters()},
                      {n: p.grad for n, p in reference.named_parameters()})


def test_argument_that_requires_grad_is_refused() -> None:
    """Gradients flow back to parameters only: an argument needing one would silently lose it."""
    torch._dynamo.reset()
    model, inputs, loss_fn, target = _small_gpt()
    scale = torch.ones(8, requires_grad=True)
    step = torch.compile(lambda x, y, w: loss_fn(model(x), y) * w.mean(), backend="pipecc",
                         options={"num_stages": 2, "num_microbatches": 2})
    with pytest.raises(ConfigError, match="argument w of the compiled step requires grad"):
        step(*inputs, target, scale)
