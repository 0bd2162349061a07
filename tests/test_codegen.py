"""Codegen: a plan written to a directory and read back is the same plan, computes the same step,
runs without the model's code and over gloo; a broken plan file says what, where and how to fix."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecc
from pipecc.errors import CodegenError, ConfigError, PlanFileError
from pipecc.passes.codegen import plan_to_json
from pipecc.testing import assert_same_grads, assert_same_step, reference_step, run_ranks
from tests._codegen_ranks import step_emitted_rank


@dataclass(frozen=True)
class Emitted:
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[..., torch.Tensor]
    target: torch.Tensor
    plan: pipecc.Plan
    directory: Path


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one intra-op thread."""


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int, str], Emitted]:
    """An example compiled with (num_stages, schedule) and emitted; each combination once per module."""
    cache: dict[tuple[str, int, str], Emitted] = {}

    def get(name: str, num_stages: int, schedule: str) -> Emitted:
        key = (name, num_stages, schedule)
        if key not in cache:
            model, inputs, loss_fn, target = importlib.import_module(f"examples.{name}").build()
            plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                                  num_microbatches=4, schedule=schedule)
            directory = plan.emit(tmp_path_factory.mktemp(f"{name}_{num_stages}_{schedule}"))
            cache[key] = Emitted(model, tuple(inputs), loss_fn, target, plan, directory)
        return cache[key]

    return get


def _same_files(a: Path, b: Path, suffixes: tuple[str, ...] = (".json", ".py")) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in sorted(a.iterdir()):
        if path.suffix in suffixes:
            assert path.read_bytes() == (b / path.name).read_bytes(), f"{path.name} differs"


# ------------------------------------------------------------------------------------ round trip


def test_emit_writes_plan_json_and_readable_rank_modules(emitted: Callable[..., Emitted]) -> None:
    case = emitted("gpt", 4, "1f1b")
    assert sorted(p.name for p in case.directory.iterdir()) == [
        "plan.json", "rank_0.pt", "rank_0.py", "rank_1.pt", "rank_1.py", "rank_2.pt", "rank_2.py",
        "rank_3.pt", "rank_3.py"]
    data = json.loads((case.directory / "plan.json").read_text())
    assert data == plan_to_json(case.plan)
    assert (data["format"], data["version"]) == ("pipecc-plan", 1)
    assert data["schedule"]["rank_actions"][3][:4] == ["3F0", "3BW0", "3F1", "3BW1"]
    head = data["stages"][3]["params"][0]
    assert (head["local_name"], head["canonical_name"], head["shape"]) == ("lm_head.weight", "tok_emb.weight",
                                                                          [4096, 64])
    source = (case.directory / "rank_0.py").read_text()
    assert "class Stage0(torch.nn.Module):" in source
    assert "        self.blocks_0_attn_q_proj = torch.nn.Linear(in_features=64, out_features=64, bias=True)\n" in source
    assert "        blocks_0_attn_q_proj = self.blocks_0_attn_q_proj(blocks_0_ln1)\n" in source
    shard = torch.load(case.directory / "rank_3.pt", weights_only=True)
    assert list(shard) == ["tok_emb.weight"]


def test_emit_load_emit_gives_identical_files_and_report(emitted: Callable[..., Emitted], tmp_path: Path) -> None:
    case = emitted("gpt", 4, "1f1b")
    loaded = pipecc.load(case.directory)
    assert loaded.report() == case.plan.report()
    assert loaded.stages[1].params[0].local_name == "blocks_1_ln1.weight"
    _same_files(case.directory, loaded.emit(tmp_path / "again"))
    for rank in range(4):
        first = torch.load(case.directory / f"rank_{rank}.pt", weights_only=True)
        second = torch.load(tmp_path / "again" / f"rank_{rank}.pt", weights_only=True)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tied_weights_load_as_one_parameter(emitted: Callable[..., Emitted]) -> None:
    loaded = pipecc.load(emitted("gpt", 4, "1f1b").directory)
    assert loaded.stages[0].graph.tok_emb.weight is loaded.stages[3].graph.lm_head.weight
    assert isinstance(loaded.stages[3].graph.lm_head.weight, nn.Parameter)


@pytest.mark.parametrize("name, num_stages, schedule", [("gpt", 4, "1f1b"), ("unet", 4, "gpipe")])
def test_loaded_plan_gives_the_reference_step(emitted: Callable[..., Emitted], name: str, num_stages: int,
                                              schedule: str) -> None:
    case = emitted(name, num_stages, schedule)
    assert_same_step(case.model, case.inputs, case.loss_fn, case.target, pipecc.load(case.directory))


def test_loading_one_rank_builds_only_its_modules(emitted: Callable[..., Emitted], tmp_path: Path) -> None:
    case = emitted("unet", 4, "gpipe")
    loaded = pipecc.load(case.directory, rank=2)
    assert loaded.report() == case.plan.report()
    assert [len(list(s.graph.parameters())) > 0 for s in loaded.stages] == [False, False, True, False]
    with pytest.raises(CodegenError, match=r"stage 0 \(rank 0\) is not loaded in this plan"):
        loaded.emit(tmp_path / "partial")
    with pytest.raises(ConfigError, match=r"rank=4, but the plan at .* has 4 ranks \(0 to 3\)"):
        pipecc.load(case.directory, rank=4)


# ---------------------------------------------------------------------- self-contained, multi-process


def test_emitted_plan_runs_without_the_model_code(emitted: Callable[..., Emitted], tmp_path: Path) -> None:
    case = emitted("gpt", 4, "1f1b")
    for path in sorted(case.directory.glob("rank_*.py")):
        text = path.read_text()
        assert "examples" not in text, path.name
        assert _imported_packages(text) <= {"torch"} | set(sys.stdlib_module_names), path.name
    batch = tmp_path / "batch.pt"
    torch.save((case.inputs, case.target), batch)
    script = (
        "import importlib.util, sys, torch, pipecc\n"
        "torch.set_num_threads(1)\n"
        "assert importlib.util.find_spec('examples') is None, 'the model code is importable'\n"
        "plan = pipecc.load(sys.argv[1])\n"
        "inputs, target = torch.load(sys.argv[2], weights_only=True)\n"
        "print(repr(plan.run_local(*inputs, target=target).item()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(case.directory), str(batch)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected_loss, _ = reference_step(case.model, case.inputs, case.loss_fn, case.target, 4)
    assert float(result.stdout.split()[-1]) == pytest.approx(expected_loss.item(), rel=1e-5)


def _imported_packages(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


@pytest.mark.dist
@pytest.mark.parametrize("name, num_stages, schedule", [("gpt", 2, "1f1b"), ("unet", 4, "gpipe")])
def test_emitted_plan_runs_over_gloo(emitted: Callable[..., Emitted], tmp_path: Path, name: str, num_stages: int,
                                     schedule: str) -> None:
    case = emitted(name, num_stages, schedule)
    batch = tmp_path / "batch.pt"
    torch.save((case.inputs, case.target), batch)
    results = run_ranks(step_emitted_rank, case.plan.num_ranks, str(case.directory), str(batch))
    expected_loss, expected = reference_step(case.model, case.inputs, case.loss_fn, case.target, 4)
    last = case.plan.schedule.stage_to_rank[-1]
    losses = [loss for loss, _ in results]
    assert [loss is None for loss in losses] == [r != last for r in range(case.plan.num_ranks)]
    torch.testing.assert_close(losses[last], expected_loss, rtol=1e-5, atol=1e-6)
    merged: dict[str, torch.Tensor] = {}
    for _, grads in results:
        assert_same_grads(grads, expected)  # a tied weight's gradient is the full sum on each holder
        merged.update(grads)
    assert set(merged) == set(expected)


# ------------------------------------------------------------- graphs beyond the examples' call_module


class _Odd(nn.Module):
    """Reads parameters and buffers by get_attr, a frozen parameter, a plain tensor constant, math.inf,
    one Linear from two stages, and a PReLU whose repr cannot rebuild it (init is not shown)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.scale = nn.Parameter(torch.randn(32))
        self.register_buffer("shift", torch.randn(32))
        self.act = nn.PReLU(init=0.1)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 16)
        self.frozen = nn.Parameter(torch.randn(16), requires_grad=False)
        self.const = torch.tensor([0.5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x.flatten(1))) * self.scale + self.shift
        h = self.fc2(h).clamp(max=float("inf"))
        h = torch.tanh(self.fc2(h)) * self.const
        return (self.fc3(h) + self.frozen).reshape(x.shape)


def test_get_attr_frozen_and_pickled_modules_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x, target = _Odd(), torch.randn(8, 4, 4), torch.randn(8, 4, 4)
    plan = pipecc.compile(model, (x,), loss_fn=F.mse_loss, example_target=target, num_stages=3, num_microbatches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything it imports is torch or the standard library
        plan.emit(tmp_path / "a")
    source = (tmp_path / "a" / "rank_0.py").read_text()
    assert "self.act = pickled['act']  # PReLU(num_parameters=1)" in source
    assert "self.scale = torch.nn.Parameter(torch.empty((32,), dtype=torch.float32))" in source
    assert "from math import inf" in (tmp_path / "a" / "rank_1.py").read_text()
    assert "requires_grad=False" in (tmp_path / "a" / "rank_2.py").read_text()
    assert (tmp_path / "a" / "rank_0_modules.pt").exists()

    loaded = pipecc.load(tmp_path / "a")
    assert loaded.stages[0].graph.act.weight.device.type == "cpu"
    expected_loss, expected = reference_step(model, (x,), F.mse_loss, target, 2)
    torch.testing.assert_close(loaded.run_local(x, target=target), expected_loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    assert set(grads) == set(expected)
    assert_same_grads(grads, expected)
    assert not dict(loaded.named_parameters())["frozen"].requires_grad
    _same_files(tmp_path / "a", loaded.emit(tmp_path / "b"))


# ------------------------------------------------------------------------------------ broken files


@pytest.fixture(scope="module")
def small_plan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples import mlp

    model, inputs, loss_fn, target = mlp.build()
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    return plan.emit(tmp_path_factory.mktemp("mlp"))


def _edit_json(directory: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((directory / "plan.json").read_text())
    edit(data)
    (directory / "plan.json").write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing dir": (lambda d: d / "nowhere", r"no plan at .*nowhere: the directory does not exist"),
    "no plan.json": (lambda d: ((d / "plan.json").unlink(), d)[1], r"plan\.json is missing"),
    "corrupt json": (lambda d: ((d / "plan.json").write_text("{format: pipecc-plan}"), d)[1],
                     r"plan\.json is not valid JSON: Expecting property name .* line 1 column 2"),
    "truncated json": (lambda d: (_truncate(d / "plan.json"), d)[1],
                       r"plan\.json is not valid JSON: .*the file is truncated or corrupt"),
    "wrong format": (lambda d: (_edit_json(d, lambda j: j.update(format="onnx")), d)[1],
                     r"plan\.json is not a pipecc plan: its \"format\" is \"onnx\", not \"pipecc-plan\""),
    "future version": (lambda d: (_edit_json(d, lambda j: j.update(version=999)), d)[1],
                       r"plan\.json has format version 999, but pipecc .* reads versions up to 1"),
    "missing field": (lambda d: (_edit_json(d, lambda j: j.pop("stages")), d)[1],
                      r"plan\.json: field stages is missing"),
    "bad field": (lambda d: (_edit_json(d, lambda j: j["stages"][1]["cost"].update(forward_ms="fast")), d)[1],
                  r"plan\.json: field stages\[1\]\.cost\.forward_ms is \"fast\", not float"),
    "bad action": (lambda d: (_edit_json(d, lambda j: j["schedule"]["rank_actions"][0].__setitem__(0, "0X0")), d)[1],
                   r"schedule\.rank_actions holds \"0X0\", not an action like \"0F3\""),
    "missing shard": (lambda d: ((d / "rank_1.pt").unlink(), d)[1], r"rank_1\.pt is missing"),
    "truncated shard": (lambda d: (_truncate(d / "rank_0.pt"), d)[1],
                        r"rank_0\.pt is not a readable weight shard .*truncated or corrupt"),
    "truncated module": (lambda d: (_truncate(d / "rank_1.py"), d)[1], r"cannot import .*rank_1\.py: SyntaxError"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_plan_files_say_what_where_and_how_to_fix(small_plan_dir: Path, tmp_path: Path,
                                                         breakage: str) -> None:
    directory = shutil.copytree(small_plan_dir, tmp_path / "plan")
    break_it, message = BREAKAGES[breakage]
    target = break_it(directory)
    with pytest.raises(PlanFileError, match=message) as err:
        pipecc.load(target)
    assert str(target) in str(err.value)
    assert "plan.emit" in str(err.value).splitlines()[-1] or "Upgrade pipecc" in str(err.value)
