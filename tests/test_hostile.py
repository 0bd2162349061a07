"""Hostile inputs: each case is refused with a specific PipeccError whose message says what went wrong,
where, and how to fix it. None may hang, compute a wrong result, or surface a traceback from inside torch.

The cases live in one table, CASES (name -> how to provoke it, the error class, a regex over the whole
message), so that `python tests/test_hostile.py` can print the table of cases and first lines.
Cases already covered by tests/test_errors.py and tests/test_codegen.py are not repeated here.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecc
from examples import mlp
from pipecc import CaptureError, ConfigError, PartitionError, PlanFileError
from pipecc.errors import PipeccError
from pipecc.testing import assert_same_step, run_ranks

# 2 hidden layers: 6 compute nodes (layers_0, act, layers_1, act_1, head, mse_loss).
MODEL, INPUTS, LOSS_FN, TARGET = mlp.build(batch_size=8, num_layers=2, hidden=16, in_features=8, out_features=4)
X = INPUTS[0]


def _compile(model: nn.Module = MODEL, inputs: Any = INPUTS, *, loss_fn: Any = LOSS_FN, target: Any = TARGET,
             **options: Any) -> pipecc.Plan:
    options = {"num_stages": 2, "num_microbatches": 2, **options}
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, **options)


class _Linear(nn.Module):
    """One linear layer (8 -> 4) whose forward the subclasses make hostile."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)


class ItemInForward(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * x.sum().item()  # a Python float from tensor data


class NonzeroIndexing(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = self.fc(x)[torch.nonzero(x[:, 0] > 0)[:, 0]]  # as many rows as the data says
        return picked.sum(0, keepdim=True).expand(x.shape[0], 4)


class HardCodedBatch(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(8, 4)  # 8 is the batch size; pipecc traces at micro-batch size 4


class MutatesInput(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.fc(x)


class FunctionalInplaceOnInput(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(x, inplace=True))


class InplaceReluOnInput(_Linear):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(x))


class WritesIntoAViewOfItsInput(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, 0].zero_()
        return self.fc(x)


class NoGradInForward(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.fc(x)
        return h * self.fc.weight.sum()


class CountsCalls(_Linear):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x)


class ReturnsTuple(_Linear):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


class ReturnsDict(_Linear):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x), "features": x}


@dataclasses.dataclass
class Output:
    """Like transformers' ModelOutput: a dataclass of tensors."""

    logits: torch.Tensor
    hidden: torch.Tensor


class ReturnsOutputObject(_Linear):
    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.fc(x), x)


NamedOutput = collections.namedtuple("NamedOutput", "logits hidden")


class ReturnsNamedTuple(_Linear):
    def forward(self, x: torch.Tensor) -> NamedOutput:
        return NamedOutput(self.fc(x), x)


class KeywordOnly(_Linear):
    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * scale


class NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :4] * 2


def _branching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.mean() > 0:  # data-dependent control flow in the loss
        return F.mse_loss(pred, target)
    return F.l1_loss(pred, target)


def _loss_writing_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target[:, 0] = 0.0
    return F.mse_loss(pred, target)


def _frozen_mlp() -> nn.Module:
    model, *_ = mlp.build(batch_size=8, num_layers=2, hidden=16, in_features=8, out_features=4)
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------- plan files


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile().emit(tmp_path_factory.mktemp("hostile") / "plan")


def _broken_plan(plan_dir: Path, edit: Callable[[dict], object] | None = None, text: str | None = None) -> Path:
    """A copy of the plan with plan.json edited (a JSON edit) or replaced (raw text)."""
    copy = plan_dir.parent / f"broken{len(list(plan_dir.parent.iterdir()))}"
    shutil.copytree(plan_dir, copy)
    if text is None:
        data = json.loads((copy / "plan.json").read_text())
        edit(data)
        text = json.dumps(data)
    (copy / "plan.json").write_text(text)
    return copy


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return edit


@dataclasses.dataclass(frozen=True)
class Case:
    provoke: Callable[..., object]  # takes the plan_dir fixture when needs_plan_dir
    error: type[PipeccError]
    message: str  # regex over the whole message: what, where, and (after a newline) how to fix it
    needs_plan_dir: bool = False


CASES: dict[str, Case] = {
    # --- tracing
    "data-dependent branch in loss_fn": Case(
        lambda: _compile(loss_fn=_branching_loss), CaptureError,
        r"(?s)cannot capture MLP: no tracing path worked\..*test_hostile\.py:\d+ in _branching_loss: "
        r"if pred\.mean\(\) > 0:.*\nFix: replace Python control flow on tensor values"),
    ".item() in forward": Case(
        lambda: _compile(ItemInForward()), CaptureError,
        r"(?s)cannot capture ItemInForward: no tracing path worked\..*x\.sum\(\)\.item\(\).*\nFix: .*\.item\(\)"),
    "data-dependent output shape (nonzero)": Case(
        lambda: _compile(NonzeroIndexing()), CaptureError,
        r"(?s)cannot capture NonzeroIndexing: .*DynamicOutputShapeException: aten\.nonzero.*\n"
        r"Fix: an op's output shape depends on tensor values .*static shapes"),
    "hard-coded batch size": Case(
        lambda: _compile(HardCodedBatch()), CaptureError,
        r"(?s)cannot capture HardCodedBatch: .*shape '\[8, 4\]' is invalid for input of size 16.*\n"
        r"Fix: the model seems to hard-code the batch size.*x\.view\(-1, 4\)"),
    # --- in-place writes into the batch
    "in-place op on an input": Case(
        lambda: _compile(MutatesInput()), ConfigError,
        r"MutatesInput or loss_fn writes into its input x in place \(mul_ at graph node mul_, "
        r"test_hostile\.py:\d+ in forward: x\.mul_\(2\)\)\.\n"
        r"Every rank holds its own copy of the batch.*x = x \* 2"),
    "F.relu(inplace=True) on an input": Case(
        lambda: _compile(FunctionalInplaceOnInput()), ConfigError,
        r"FunctionalInplaceOnInput or loss_fn writes into its input x in place \(relu at graph node relu, "
        r".*F\.relu\(x, inplace=True\)\)\)\.\nEvery rank"),
    "nn.ReLU(inplace=True) on an input": Case(
        lambda: _compile(InplaceReluOnInput()), ConfigError,
        r"InplaceReluOnInput or loss_fn writes into its input x in place \(relu at graph node relu, .*self\.relu\(x\)\)\)\.\n"
        r".*nn\.ReLU\(inplace=False\)"),
    "in-place write into a view of an input": Case(
        lambda: _compile(WritesIntoAViewOfItsInput()), ConfigError,
        r"WritesIntoAViewOfItsInput or loss_fn writes into its input x in place \(zero_ at graph node zero_, .*\.zero_\(\)\)"),
    "loss_fn writes into the target": Case(
        lambda: _compile(loss_fn=_loss_writing_target), ConfigError,
        r"MLP or loss_fn writes into the target in place \((setitem|fill_) at graph node \w+.*\)\.\nEvery rank"),
    "BatchNorm with momentum=None": Case(
        lambda: _compile(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.Linear(16, 4))),
        ConfigError,
        r"1 \(BatchNorm1d\) has momentum=None: its running stats are a cumulative average .*\n"
        r"Give it a momentum \(e\.g\. BatchNorm1d\(\.\.\., momentum=0\.1\)\), or put it in eval mode"),
    "torch.no_grad() block in forward": Case(
        lambda: _compile(NoGradInForward()), ConfigError,
        r"NoGradInForward\.forward switches gradients off at test_hostile\.py:\d+ in forward: "
        r"with torch\.no_grad\(\):.*\nReplace the torch\.no_grad\(\) block by \.detach\(\)"),
    "forward writes into its own buffer": Case(
        lambda: _compile(CountsCalls()), ConfigError,
        r"CountsCalls\.forward writes into its buffer calls in place \(seen while tracing\)\.\n"
        r"A stage graph would not repeat the write"),
    # --- model outputs that are not one tensor
    "tuple output, loss_fn expects a tensor": Case(
        lambda: _compile(ReturnsTuple()), CaptureError,
        r"(?s)cannot capture ReturnsTuple: .*'tuple' object has no attribute 'size'.*\n"
        r"Fix: ReturnsTuple returns a tuple, dict or output object .*out\[0\]"),
    "dict output, loss_fn expects a tensor": Case(
        lambda: _compile(ReturnsDict()), CaptureError,
        r"(?s)cannot capture ReturnsDict: .*'dict' object has no attribute 'size'.*\n"
        r"Fix: ReturnsDict returns a tuple, dict or output object .*out\[\"logits\"\]"),
    "ModelOutput-like dataclass output, loss_fn picks the tensor": Case(
        lambda: _compile(ReturnsOutputObject(), loss_fn=lambda out, target: F.mse_loss(out.logits, target)),
        ConfigError,
        r"ReturnsOutputObject builds an object of type Output at graph node output, and pipecc can follow "
        r"gradients only through tensors, tuples.*\n"
        r"Return a tuple or a dict of tensors instead"),
    "ModelOutput-like dataclass output, loss_fn expects a tensor": Case(
        lambda: _compile(ReturnsOutputObject()), CaptureError,
        r"(?s)cannot capture ReturnsOutputObject: .*'Output' object has no attribute 'size'.*\n"
        r"Fix: ReturnsOutputObject returns a tuple, dict or output object .*out\.logits"),
    # --- what is passed to pipecc.compile
    "model is a function": Case(
        lambda: _compile(lambda x: x), ConfigError,
        r"model is a function, not a torch\.nn\.Module\.\nWrap the function in an nn\.Module"),
    "loss_fn is None": Case(
        lambda: _compile(loss_fn=None), ConfigError,
        r"loss_fn is None, not a callable\.\nPass loss_fn=f where f\(model_output, target\)"),
    "loss_fn returns a Python float": Case(
        lambda: _compile(loss_fn=lambda pred, target: float(0.5)), ConfigError,
        r"loss_fn returned float, not a tensor computed from the model output\.\nReturn the loss tensor itself"),
    "no trainable parameter": Case(
        lambda: _compile(_frozen_mlp()), ConfigError,
        r"the loss of MLP depends on no trainable parameter \(0 of 6 parameters require grad\).*\n"
        r"Unfreeze parameters"),
    "model without parameters": Case(
        lambda: _compile(NoParameters()), ConfigError,
        r"the loss of NoParameters depends on no trainable parameter \(0 of 0 parameters"),
    "keyword-only input": Case(
        lambda: _compile(KeywordOnly()), ConfigError,
        r"KeywordOnly\.forward needs argument 'scale' but example_inputs has only 1 tensors\.\n"
        r"Pass a tensor for every required argument"),
    "dict of inputs": Case(
        lambda: _compile(inputs=({"x": X},)), ConfigError,
        r"example_inputs\[0\] is of type dict, but pipecc splits every input along dim 0.*\nPass tensors only"),
    "None as an input": Case(
        lambda: _compile(inputs=(X, None)), ConfigError,
        r"example_inputs\[1\] is of type NoneType.*\nPass tensors only"),
    # --- stage, micro-batch, memory and schedule options
    "num_stages=True": Case(
        lambda: _compile(num_stages=True), ConfigError,
        r"num_stages=True; it must be a positive integer\.\nPass num_stages=1 or more"),
    "num_stages=1.5": Case(
        lambda: _compile(num_stages=1.5), ConfigError, r"num_stages=1\.5; it must be a positive integer"),
    "num_stages=-1": Case(
        lambda: _compile(num_stages=-1), ConfigError, r"num_stages=-1; it must be a positive integer"),
    "batch of 1 into 2 micro-batches": Case(
        lambda: _compile(inputs=(X[:1],), target=TARGET[:1]), ConfigError,
        r"batch size 1 does not divide into num_microbatches=2 equal micro-batches\.\n"
        r"Use a num_microbatches that divides 1 \(1\)"),
    "batch of 10 into 4 uneven micro-batches": Case(
        lambda: _compile(inputs=(torch.randn(10, 8),), target=torch.randn(10, 4), num_microbatches=4), ConfigError,
        r"batch size 10 does not divide into num_microbatches=4 equal micro-batches\.\n"
        r"Use a num_microbatches that divides 10 \(1, 2, 5, 10\)"),
    "max_memory_bytes as a string": Case(
        lambda: _compile(max_memory_bytes="20GiB"), ConfigError,
        r"max_memory_bytes='20GiB'; it must be positive, an int number of bytes.*\nPass an int"),
    "memory limit below the largest node": Case(
        lambda: _compile(num_stages=6, max_memory_bytes=1000), PartitionError,
        r"no partition into 6 stages fits max_memory_bytes=1000 .*; the smallest feasible limit is \d+ bytes.*\n"
        r"Raise max_memory_bytes"),
    "schedule given as a number": Case(
        lambda: _compile(schedule=1), ConfigError, r"unknown schedule 1; pipecc knows .*gpipe.*\nPass one of"),
    "schedule name in the wrong case": Case(
        lambda: _compile(schedule="1F1B"), ConfigError, r"unknown schedule '1F1B'; pipecc knows .*1f1b"),
    # --- runtime inputs
    "batch of 7 at run time (plan for 8)": Case(
        lambda: _compile().run_local(X[:7], target=TARGET[:7]), ConfigError,
        r"input 0 has shape \(7, 8\) and dtype float32, but the plan was compiled for shape \(8, 8\).*\n"
        r"Shapes are static in a plan"),
    "target of another dtype at run time": Case(
        lambda: _compile().run_local(X, target=TARGET.double()), ConfigError,
        r"target has shape \(8, 4\) and dtype float64, but the plan was compiled for .*float32"),
    "runner timeout_s=0": Case(
        lambda: _compile().runner(timeout_s=0), ConfigError,
        r"timeout_s=0; it must be a positive number of seconds\.\nPass the longest a rank may wait"),
    # --- plan files (other breakages: tests/test_codegen.py)
    "empty plan.json": Case(
        lambda d: pipecc.load(_broken_plan(d, text="")), PlanFileError,
        r"plan\.json is not valid JSON: Expecting value at line 1 column 1; the file is truncated or corrupt",
        needs_plan_dir=True),
    "plan.json holding a list": Case(
        lambda d: pipecc.load(_broken_plan(d, text="[]")), PlanFileError,
        r"plan\.json: the top level is a list, not an object", needs_plan_dir=True),
    "plan.json version as a string": Case(
        lambda d: pipecc.load(_broken_plan(d, _set(("version",), "1"))), PlanFileError,
        r"plan\.json: field version is \"1\", not int", needs_plan_dir=True),
    "plan.json with an unknown dtype": Case(
        lambda d: pipecc.load(_broken_plan(d, _set(("input_specs", 0, "dtype"), "float128"))), PlanFileError,
        r"plan\.json: field input_specs\[0\]\.dtype is 'float128', not a torch dtype", needs_plan_dir=True),
    "plan.json placing a stage on another rank": Case(
        lambda d: pipecc.load(_broken_plan(d, _set(("schedule", "stage_to_rank"), [0, 7]))), PlanFileError,
        r"plan\.json: its stages sit on ranks \[0, 1\] but the schedule puts them on \[0, 7\]", needs_plan_dir=True),
    "plan.json running an action twice": Case(
        lambda d: pipecc.load(_broken_plan(d, _set(("schedule", "rank_actions", 0, 1), "0F0"))), PlanFileError,
        r"plan\.json: its plan does not verify: 1f1b: rank 0 runs 0F0 2 times\.\n", needs_plan_dir=True),
    "plan.json naming a stage the plan does not have": Case(
        lambda d: pipecc.load(_broken_plan(d, _set(("schedule", "rank_actions", 0, 0), "7F0"))), PlanFileError,
        r"plan\.json: schedule\.rank_actions\[0\] holds 7F0, outside the plan's 2 stages and \d+ micro-batches\.\n"
        r"The file is truncated, edited or corrupt", needs_plan_dir=True),
    "emitting a plan onto an existing file": Case(
        lambda d: _compile().emit(d / "plan.json"), ConfigError,
        r"cannot emit the plan into .*plan\.json: it is a file, not a directory\.\nPass a directory path",
        needs_plan_dir=True),
    "loading a rank the plan does not have": Case(
        lambda d: pipecc.load(d, rank=5), ConfigError, r"rank=5, but the plan at .* has 2 ranks \(0 to 1\)",
        needs_plan_dir=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_with_what_where_and_fix(name: str, request: pytest.FixtureRequest,
                                                          one_thread: None) -> None:
    case = CASES[name]
    args = (request.getfixturevalue("plan_dir"),) if case.needs_plan_dir else ()
    with pytest.raises(case.error, match=case.message) as err:
        case.provoke(*args)
    assert type(err.value) is case.error, f"{name}: {type(err.value).__name__} is a subclass, not the class itself"
    assert len(str(err.value).splitlines()) >= 2 or case.error is PlanFileError, "no line saying how to fix it"


def test_compiling_leaves_the_model_state_unchanged(one_thread: None) -> None:
    """Tracing runs the model once on fake tensors; BatchNorm would count that as a batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "compile changed the model's buffers"


@pytest.mark.parametrize("model, pick", [
    (ReturnsTuple(), lambda out: out[0]),
    (ReturnsDict(), lambda out: out["logits"]),
    (ReturnsNamedTuple(), lambda out: out.logits),
], ids=["tuple", "dict", "namedtuple"])
def test_structured_outputs_are_supported_through_the_loss_fn(model: nn.Module, pick: Callable[[Any], torch.Tensor],
                                                              one_thread: None) -> None:
    """A model returning a tuple, dict or output object trains exactly when loss_fn picks the tensor."""
    def loss_fn(out: Any, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pick(out), target)

    plan = _compile(model, loss_fn=loss_fn, num_stages=2, num_microbatches=4)
    assert_same_step(model, INPUTS, loss_fn, TARGET, plan)


def test_one_stage_and_one_sample_micro_batches_run_exactly(one_thread: None) -> None:
    """The edges of the option space are runs, not errors: one stage, and micro-batches of one sample."""
    assert_same_step(MODEL, INPUTS, LOSS_FN, TARGET, _compile(num_stages=1, num_microbatches=8))
    x1, t1 = X[:1], TARGET[:1]
    assert_same_step(MODEL, (x1,), LOSS_FN, t1, _compile(inputs=(x1,), target=t1, num_microbatches=1))


def test_schedule_that_needs_more_microbatches_says_how_many(one_thread: None) -> None:
    """Any registered schedule that refuses 1 micro-batch on 4 ranks must say so by name, with the
    number it needs (skipped while every registered schedule accepts it)."""
    from pipecc.passes.schedules import SCHEDULES

    model, inputs, loss_fn, target = mlp.build(batch_size=8, num_layers=8, hidden=16, in_features=8, out_features=4)
    for name, kind in SCHEDULES.items():
        if name == "auto":
            continue
        try:
            pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target,
                           num_stages=4 * kind.stages_per_rank, num_microbatches=1, schedule=name)
        except (ConfigError, pipecc.ScheduleError) as err:
            assert name in str(err) and "micro-batch" in str(err).splitlines()[0], str(err)
            assert len(str(err).splitlines()) >= 2, f"no fix line: {err}"
            return
    pytest.skip(f"every registered schedule ({', '.join(SCHEDULES)}) accepts 1 micro-batch on 4 ranks")


# ------------------------------------------------------------------------------ over real gloo ranks


def _gloo_hostile_runs() -> list[tuple[str, str, str]]:
    """On each of 2 ranks: (case, error class, message) for runtime mistakes that must fail on every rank
    at once, without waiting for a peer. The NaN case comes last: it leaves the peer's receive behind."""
    results = []

    def attempt(case: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            results.append((case, "no error", ""))
        except PipeccError as err:
            results.append((case, type(err).__name__, str(err)))

    four_stage = _compile(num_stages=4)
    attempt("world size 2, plan for 4 ranks", lambda: four_stage.runner())
    plan = _compile(num_stages=2, num_microbatches=2)
    runner = plan.runner(timeout_s=3, check_finite=True)
    attempt("shape differs from the plan", lambda: runner.step(X[:4], target=TARGET[:4]))
    attempt("dtype differs from the plan", lambda: runner.step(X.double(), target=TARGET))
    attempt("a good step after those", lambda: runner.step(X, target=TARGET))
    poisoned = X.clone()
    poisoned[5, 3] = float("nan")  # sample 5: micro-batch 1
    attempt("nan in micro-batch 1, check_finite=True", lambda: runner.step(poisoned, target=TARGET))
    return results


@pytest.mark.dist
def test_runtime_mistakes_fail_on_every_gloo_rank_with_the_same_message() -> None:
    per_rank = run_ranks(_gloo_hostile_runs, 2)
    for rank, results in enumerate(per_rank):
        got = {case: (error, message) for case, error, message in results}
        assert got["world size 2, plan for 4 ranks"][0] == "ConfigError"
        assert got["world size 2, plan for 4 ranks"][1].startswith(
            "the plan has 4 ranks but the process group has 2.\nLaunch with --nproc-per-node=4")
        assert got["shape differs from the plan"][0] == "ConfigError"
        assert "input 0 has shape (4, 8) and dtype float32, but the plan was compiled for shape (8, 8)" \
            in got["shape differs from the plan"][1]
        assert got["dtype differs from the plan"][0] == "ConfigError"
        assert "dtype float64" in got["dtype differs from the plan"][1]
        assert got["a good step after those"] == ("no error", "")
        error, message = got["nan in micro-batch 1, check_finite=True"]
        nan_line = "stage 0 (rank 0) computed 16 non-finite values (nan/inf) in output layers_1 in the forward " \
                   "of micro-batch 1."  # one nan input feature reaches all 16 hidden units of its sample
        first_failure = f"rank 0 failed at action 0F1 (stage 0, micro-batch 1): PipelineRuntimeError: {nan_line}"
        if rank == 0:  # the stage that made the nan
            assert error == "PipelineRuntimeError" and message.splitlines()[0] == nan_line, message
            assert message.splitlines()[1].startswith("Check micro-batch 1's inputs and the ops of stage 0")
        else:  # its peer waited for the activations, timed out, and names the cause
            assert error == "PeerLostError", message
            # micro-batch 0's activations may or may not have got through before rank 0 stopped
            waited = re.escape(f": {first_failure}")
            assert re.match(rf"rank 1 stopped at action 1RECV_F([01]) \(stage 1, micro-batch \1\){waited}", message), \
                message


def _case_table() -> str:
    """Markdown table of every case: name, error class, first line of the message (for the issue's report)."""
    torch.set_num_threads(1)
    plan_dir = _compile().emit(Path(__import__("tempfile").mkdtemp()) / "plan")
    rows = ["| case | error | first line of the message |", "|---|---|---|"]
    for name, case in CASES.items():
        try:
            case.provoke(*((plan_dir,) if case.needs_plan_dir else ()))
            rows.append(f"| {name} | (no error) | |")
        except PipeccError as err:
            first = str(err).splitlines()[0].replace(str(plan_dir.parent), "…").replace("|", "\\|")
            rows.append(f"| {name} | {type(err).__name__} | {first} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_case_table())
