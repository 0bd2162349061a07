"""Codegen: a Plan to a directory and back (plan.json, one readable module and one weight shard per rank).

    plan.json            config, device, input specs, schedule and every stage's boundary and cost
    rank_{r}.py          `class Stage{i}(torch.nn.Module)` for each stage i on rank r; imports torch/stdlib
    rank_{r}.pt          {canonical name: tensor}, the parameters and buffers of rank r (weights_only)
    rank_{r}_modules.pt  only where needed: submodules whose constructor is not one line of torch.nn source
                         (pickled with their tensors on "meta"; the weights still come from rank_{r}.pt)

Loading runs the rank modules' code and unpickles rank_{r}_modules.pt: load only plans you trust.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import importlib
import importlib.util
import itertools
import json
import keyword
import logging
import os
import re
import sys
import types
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NoReturn, Sequence

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

import pipecc
from pipecc.costs import DeviceSpec
from pipecc.errors import CodegenError, ConfigError, PartitionError, PlanFileError, ScheduleError
from pipecc.ir import (Action, ActionKind, Config, InputKind, ParamBinding, Schedule, Stage, StageCost, StageInput,
                       StageOutput, TensorSpec)
from pipecc.passes.schedules.verify import check_schedule
from pipecc.passes.split_backward import needs_split_backward, split_backward_stages
from pipecc.passes.split_stages import check_stages
from pipecc.plan import Plan

log = logging.getLogger(__name__)

FORMAT = "pipecc-plan"
VERSION = 1
PLAN_FILE = "plan.json"
REEMIT = "Re-emit the plan with plan.emit(directory)."


def module_file(rank: int) -> str:
    return f"rank_{rank}.py"


def weights_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def pickled_file(rank: int) -> str:
    return f"rank_{rank}_modules.pt"


@dataclass(frozen=True)
class StageCode:
    """One stage as emitted: its class source, what that needs imported, and where its tensors are."""

    class_name: str
    source: str  # the `class Stage{i}(torch.nn.Module): ...` statement
    imports: tuple[str, ...]  # one-line statements the class needs at module level
    params: tuple[ParamBinding, ...]  # local names are attributes of the emitted class
    module: nn.Module  # holds the tensors (and the pickled attributes) under those local names
    pickled: tuple[str, ...]  # attributes of `module` that __init__ takes from rank_{r}_modules.pt


@dataclass(frozen=True)
class _Loaded:
    """What pipecc.load read for one emitted class, so that emitting its plan again writes the same file."""

    source: str
    imports: tuple[str, ...]
    pickled: tuple[str, ...]


# Emitted classes that load_plan imported -> their source, for emitting a loaded plan again.
_LOADED: weakref.WeakKeyDictionary[type, _Loaded] = weakref.WeakKeyDictionary()
_module_ids = itertools.count()


class _SkipMetaFills(TorchFunctionMode):
    """Skips initialisers on meta tensors: they compute nothing there, but normal_ on meta
    imports torch._dynamo (about 2 s in a fresh process, measured on torch 2.13)."""

    FILLS = frozenset({"normal_", "uniform_", "zero_", "fill_", "ones_", "zeros_", "constant_", "trunc_normal_",
                       "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_"})

    def __torch_function__(self, func: Callable[..., object], types: object, args: tuple = (),
                           kwargs: dict[str, object] | None = None) -> object:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in self.FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- emit


def emit(plan: Plan, directory: Path) -> Path:
    """Write `plan` into `directory` (created if needed) and return it; plan.json is written last,
    so a directory without it is an interrupted emit. The same plan gives byte-identical
    plan.json and rank_{r}.py files.

    >>> plan.emit("out")                                        # doctest: +SKIP
    PosixPath('out')
    >>> sorted(p.name for p in Path("out").iterdir())          # doctest: +SKIP
    ['plan.json', 'rank_0.pt', 'rank_0.py', 'rank_1.pt', 'rank_1.py']
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"cannot emit the plan into {directory}: it is a file, not a directory.\n"
                          "Pass a directory path (it is created if needed).")
    codes = [stage_code(stage) for stage in plan.stages]
    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(plan.num_ranks):
        on_rank = [(s, c) for s, c in zip(plan.stages, codes) if s.rank == rank]
        source = rank_source(plan, rank, [c for _, c in on_rank])
        _warn_on_foreign_code(source, [getattr(c.module, a) for _, c in on_rank for a in c.pickled],
                              directory / module_file(rank))
        _write_text(directory / module_file(rank), source)
        _write_torch(directory / weights_file(rank), weight_shard([c for _, c in on_rank]))
        pickled = {c.class_name: {a: _without_data(getattr(c.module, a)) for a in c.pickled} for _, c in on_rank
                   if c.pickled}
        if pickled:
            _write_torch(directory / pickled_file(rank), pickled)
    _write_text(directory / PLAN_FILE, _dumps(plan_to_json(plan, codes)) + "\n")
    log.info("emitted a %d-rank plan to %s", plan.num_ranks, directory)
    return directory


def stage_code(stage: Stage) -> StageCode:
    """The emitted form of one stage: generated from its fx graph, or reused from the file it was loaded from."""
    if isinstance(stage.graph, fx.GraphModule):
        return generate_stage_code(stage)
    loaded = _LOADED.get(type(stage.graph))
    if loaded is None:
        if type(stage.graph) is nn.Module:
            raise CodegenError(
                f"stage {stage.index} (rank {stage.rank}) is not loaded in this plan, so it cannot be emitted.\n"
                "Load every rank with pipecc.load(directory) (no rank=) before emitting the plan again."
            )
        raise CodegenError(
            f"stage {stage.index} holds a {type(stage.graph).__name__}, but codegen emits fx.GraphModules and "
            "modules loaded by pipecc.load.\nCompile the model with pipecc.compile to get an emittable plan."
        )
    return StageCode(class_name=type(stage.graph).__name__, source=loaded.source, imports=loaded.imports,
                     params=stage.params, module=stage.graph, pickled=loaded.pickled)


def generate_stage_code(stage: Stage) -> StageCode:
    """A readable `class Stage{i}` for the stage's fx graph, with submodules at flat attribute names."""
    flat, local_of = flatten_graph_module(stage.graph, class_name=f"Stage{stage.index}")
    canonical = {b.local_name: b.canonical_name for b in stage.params}
    params = [ParamBinding(name, canonical.get(local_of[name], local_of[name]), True)
              for name, _ in flat.named_parameters(remove_duplicate=False)]
    params += [ParamBinding(name, canonical.get(local_of[name], local_of[name]), False)
               for name, _ in flat.named_buffers(remove_duplicate=False)]
    python = flat.graph.python_code(root_module="self")
    forward = _indent(python.src.strip())
    init_lines, pickled = _init_lines(flat)
    signature = "self, pickled: dict[str, object]" if pickled else "self"
    class_name = f"Stage{stage.index}"
    source = "\n".join([
        f"class {class_name}(torch.nn.Module):",
        _indent(_class_docstring(stage)),
        "",
        f"    def __init__({signature}) -> None:",
        "        super().__init__()",
        *(f"        {line}" for line in init_lines),
        "",
        forward,
    ])
    return StageCode(class_name=class_name, source=source, imports=_imports(python.src, python.globals),
                     params=tuple(params), module=flat, pickled=tuple(pickled))


def flatten_graph_module(gm: fx.GraphModule, *, class_name: str) -> tuple[fx.GraphModule, dict[str, str]]:
    """A copy of `gm` whose call_module and get_attr targets are attributes of the root
    (`blocks.0.attn.q_proj` -> `blocks_0_attn_q_proj`), sharing gm's modules and tensors;
    and, for every parameter and buffer, its local name in the copy -> its local name in gm."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    flat_of: dict[str, str] = {}
    local_of: dict[str, str] = {}
    for node in gm.graph.nodes:
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            if target not in flat_of:
                flat_of[target] = _flat_name(target, taken=set(flat_of.values()))
                _attach(root, gm, target, flat_of[target], local_of)
            copied.target = flat_of[target]
        env[node] = copied
    return fx.GraphModule(root, graph, class_name=class_name), local_of


def _attach(root: nn.Module, gm: fx.GraphModule, target: str, flat: str, local_of: dict[str, str]) -> None:
    owner_name, _, attr = target.rpartition(".")
    value = getattr(gm.get_submodule(owner_name), attr)
    if isinstance(value, nn.Module):
        root.add_module(flat, value)
        for name, _ in itertools.chain(value.named_parameters(remove_duplicate=False),
                                       value.named_buffers(remove_duplicate=False)):
            local_of[f"{flat}.{name}"] = f"{target}.{name}"
        return
    if isinstance(value, nn.Parameter):
        root.register_parameter(flat, value)
    elif isinstance(value, torch.Tensor):
        root.register_buffer(flat, value)
    else:
        setattr(root, flat, value)
    local_of[flat] = target


def _flat_name(target: str, taken: set[str]) -> str:
    """`target` with dots as underscores: a Python identifier that no nn.Module attribute or
    other flattened target already uses."""
    name = re.sub(r"\W", "_", target.replace(".", "_"))
    if not name or name[0].isdigit():
        name = "_" + name
    if keyword.iskeyword(name) or hasattr(nn.Module, name) or name == "training":
        name += "_"
    unique = name
    for suffix in itertools.count(1):
        if unique not in taken:
            return unique
        unique = f"{name}_{suffix}"
    raise AssertionError("unreachable")


def _init_lines(flat: fx.GraphModule) -> tuple[list[str], list[str]]:
    """Statements of __init__ that rebuild flat's attributes, and the attributes that must be pickled."""
    lines: list[str] = []
    pickled: list[str] = []
    for name, value in _root_attributes(flat):
        constructor = _constructor_source(value) if isinstance(value, nn.Module) else None
        if isinstance(value, nn.Module) and constructor is not None:
            lines.append(f"self.{name} = {constructor}{'' if value.training else '.eval()'}")
        elif isinstance(value, nn.Parameter):
            frozen = "" if value.requires_grad else ", requires_grad=False"
            lines.append(f"self.{name} = torch.nn.Parameter({_empty(value)}{frozen})")
        elif isinstance(value, torch.Tensor):
            lines.append(f"self.register_buffer({name!r}, {_empty(value)})")
        else:
            lines.append(f"self.{name} = pickled[{name!r}]  # {_one_line(value)}")
            pickled.append(name)
    return lines, pickled


def _root_attributes(flat: fx.GraphModule) -> Iterator[tuple[str, object]]:
    """Every attribute the graph reads, once, in graph order."""
    seen: set[str] = set()
    for node in flat.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in seen:
            seen.add(str(node.target))
            yield str(node.target), getattr(flat, str(node.target))


def _empty(tensor: torch.Tensor) -> str:
    return f"torch.empty({tuple(tensor.shape)!r}, dtype={tensor.dtype})"


def _one_line(value: object) -> str:
    text = repr(value).splitlines()[0] if repr(value) else type(value).__name__
    return f"{text[:80]}{' ...' if len(text) > 80 or len(repr(value).splitlines()) > 1 else ''}"


def _constructor_source(module: nn.Module) -> str | None:
    """`torch.nn.X(...)` rebuilding `module` up to its tensor values, or None where its repr cannot:
    the repr must be one line that constructs a module with the same parameter and buffer
    names and shapes and the same attributes."""
    cls = type(module)
    text = repr(module)
    if getattr(torch.nn, cls.__name__, None) is not cls or "\n" in text or not text.startswith(f"{cls.__name__}("):
        return None
    source = f"torch.nn.{text}"
    try:
        with torch.device("meta"), _SkipMetaFills():
            rebuilt = eval(source, {"__builtins__": {}, "torch": torch})  # a torch.nn repr, checked below
    except Exception:  # a repr that is not a constructor call: pickle the module instead
        return None
    return source if _same_module(module, rebuilt) else None


_MODULE_STATE = ("_parameters", "_buffers", "_modules", "training")


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    def tensors(m: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(t.shape)) for n, t in itertools.chain(m.named_parameters(remove_duplicate=False),
                                                                 m.named_buffers(remove_duplicate=False))]

    if type(a) is not type(b) or tensors(a) != tensors(b):
        return False
    attrs_a = {k: v for k, v in vars(a).items() if k not in _MODULE_STATE}
    attrs_b = {k: v for k, v in vars(b).items() if k not in _MODULE_STATE}
    return attrs_a.keys() == attrs_b.keys() and all(_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)


def _equal(x: object, y: object) -> bool:
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:  # tensors and other values without a truthy ==: treat as different
        return False


def _class_docstring(stage: Stage) -> str:
    def describe(name: str, spec: TensorSpec, kind: str = "") -> str:
        return f"    {name}: {kind}{spec.dtype} {list(spec.shape)}{'' if spec.requires_grad else ', no grad'}"

    kinds = {InputKind.ACTIVATION: "from stage %d, " % (stage.index - 1), InputKind.TARGET: "target, ",
             InputKind.MODEL_INPUT: "model input, "}
    return "\n".join([
        f'"""Stage {stage.index}, run by rank {stage.rank}: graph nodes {stage.node_names[0]} .. '
        f"{stage.node_names[-1]} ({len(stage.node_names)} nodes).",
        "",
        "Inputs (one micro-batch):",
        *(describe(i.name, i.spec, kinds[i.kind]) for i in stage.inputs),
        "Returns:",
        *(describe(o.name, o.spec) for o in stage.outputs),
        '"""',
    ])


def _indent(text: str) -> str:
    return "\n".join(f"    {line}".rstrip() for line in text.splitlines())


def _imports(forward_src: str, globals_: Mapping[str, object]) -> tuple[str, ...]:
    """Import statements for the globals that the forward code reads."""
    used = {n.id for n in ast.walk(ast.parse(forward_src)) if isinstance(n, ast.Name)}
    lines = ["import torch"]
    for name in sorted(used & set(globals_)):
        line = _import_line(name, globals_[name])
        if line is not None:
            lines.append(line)
    return tuple(sorted(set(lines), key=_import_order))


def _import_line(name: str, value: object) -> str | None:
    if getattr(builtins, name, None) is value:
        return None
    if isinstance(value, types.ModuleType):
        return f"import {value.__name__}" if value.__name__ == name else f"import {value.__name__} as {name}"
    if isinstance(value, float) and name in ("inf", "nan"):
        return f"from math import {name}"
    if value is type(None):
        return "NoneType = type(None)"
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and qualname.isidentifier() \
            and getattr(sys.modules.get(module), qualname, None) is value:
        return f"from {module} import {qualname}" + ("" if qualname == name else f" as {name}")
    raise CodegenError(
        f"the generated code reads {name} = {_one_line(value)}, which cannot be imported by name.\n"
        "Use a module-level function or class (or a torch op) for it in the model, then compile again."
    )


def _import_order(line: str) -> tuple[int, str]:
    return (0 if line.startswith("import ") else 1 if line.startswith("from ") else 2, line)


def _warn_on_foreign_code(source: str, pickled: Sequence[object], path: Path) -> None:
    """Warn where an emitted rank needs more than torch and the standard library to load."""
    roots = {type(value).__module__.split(".")[0] for value in pickled}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    foreign = sorted(r for r in roots if r != "torch" and r not in sys.stdlib_module_names)
    if foreign:
        warnings.warn(f"{path} (or its pickled modules) needs {', '.join(foreign)}: loading the plan needs that "
                      "code importable.", stacklevel=3)


def rank_source(plan: Plan, rank: int, codes: Sequence[StageCode]) -> str:
    """The text of rank_{rank}.py: a docstring, the imports, one class per stage."""
    imports = sorted(set(itertools.chain(["import torch"], *(c.imports for c in codes))), key=_import_order)
    names = ", ".join(c.class_name for c in codes) or "no stages"
    header = (
        f'"""pipecc plan, rank {rank} of {plan.num_ranks}: {names} of {len(plan.stages)} stages '
        f"(schedule {plan.schedule.name}).\n\n"
        f"Generated by pipecc from the model's graph. {PLAN_FILE} holds the schedule and every stage's\n"
        f"boundary; {weights_file(rank)} holds the weights. Run it with pipecc.load(directory, rank={rank}).runner().\n"
        '"""'
    )
    return "\n\n\n".join([f"{header}\n\n" + "\n".join(imports), *(c.source for c in codes)]) + "\n"


def weight_shard(codes: Sequence[StageCode]) -> dict[str, torch.Tensor]:
    """{canonical name: tensor} for every parameter and buffer the stages hold, on the CPU."""
    shard: dict[str, torch.Tensor] = {}
    for code in codes:
        tensors = _module_tensors(code.module)
        for binding in code.params:
            if binding.canonical_name not in shard:
                shard[binding.canonical_name] = _portable(tensors[binding.local_name])
    return shard


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def _portable(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose saved storage holds just its own elements."""
    tensor = tensor.detach().cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _without_data(value: object) -> object:
    """A copy of a module to pickle whose tensors are on "meta": rank_{r}.pt has their values."""
    if not isinstance(value, nn.Module):
        return value
    memo: dict[int, object] = {}
    for _, tensor in itertools.chain(value.named_parameters(remove_duplicate=False),
                                     value.named_buffers(remove_duplicate=False)):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(value, memo)


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _write_torch(path: Path, value: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------- plan.json


def plan_to_json(plan: Plan, codes: Sequence[StageCode] | None = None) -> dict[str, object]:
    """The content of plan.json (`codes` are the stages as emitted; generated when not given).

    >>> plan_to_json(plan)["schedule"]["rank_actions"][1]       # doctest: +SKIP
    ['1F0', '1BW0', '1F1', '1BW1']
    """
    codes = [stage_code(stage) for stage in plan.stages] if codes is None else codes
    schedule = plan.schedule
    return {
        "format": FORMAT,
        "version": VERSION,
        "pipecc_version": pipecc.__version__,
        "config": dataclasses.asdict(plan.config),
        "device": plan.device.to_json(),
        "capture_method": plan.capture_method,
        "input_specs": [_spec_json(s) for s in plan.input_specs],
        "target_spec": _spec_json(plan.target_spec),
        "schedule": {
            "name": schedule.name,
            "num_stages": schedule.num_stages,
            "num_microbatches": schedule.num_microbatches,
            "stage_to_rank": list(schedule.stage_to_rank),
            "rank_actions": [[str(a) for a in actions] for actions in schedule.rank_actions],
        },
        "ranks": [{"module": module_file(r), "weights": weights_file(r),
                   "pickled": pickled_file(r) if any(c.pickled for s, c in zip(plan.stages, codes) if s.rank == r)
                   else None}
                  for r in range(plan.num_ranks)],
        "stages": [_stage_json(s, c) for s, c in zip(plan.stages, codes)],
    }


def _dumps(value: object, level: int = 0) -> str:
    """JSON with sorted keys, one field per line, and lists of scalars (shapes, actions) on one line,
    so the same plan always gives the same bytes."""
    inner, outer = "  " * (level + 1), "  " * level
    if isinstance(value, dict) and value:
        fields = [f"{inner}{json.dumps(key)}: {_dumps(value[key], level + 1)}" for key in sorted(value)]
        return "{\n" + ",\n".join(fields) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, level + 1) for v in value) + f"\n{outer}]"
    return json.dumps(value)


def _spec_json(spec: TensorSpec) -> dict[str, object]:
    return {"shape": list(spec.shape), "dtype": spec.dtype, "requires_grad": spec.requires_grad}


def _stage_json(stage: Stage, code: StageCode) -> dict[str, object]:
    tensors = _module_tensors(code.module)
    return {
        "index": stage.index,
        "rank": stage.rank,
        "class_name": code.class_name,
        "node_names": list(stage.node_names),
        "inputs": [{"name": i.name, "kind": i.kind.value, "spec": _spec_json(i.spec), "input_index": i.input_index}
                   for i in stage.inputs],
        "outputs": [{"name": o.name, "spec": _spec_json(o.spec)} for o in stage.outputs],
        "params": [{"local_name": b.local_name, "canonical_name": b.canonical_name, "is_parameter": b.is_parameter,
                    "requires_grad": tensors[b.local_name].requires_grad,
                    "shape": list(tensors[b.local_name].shape),
                    "dtype": str(tensors[b.local_name].dtype).removeprefix("torch.")}
                   for b in code.params],
        "pickled": list(code.pickled),
        "cost": dataclasses.asdict(stage.cost),
    }


class _Json:
    """One JSON object of plan.json; a missing or mistyped field is a PlanFileError naming the file and field."""

    def __init__(self, data: object, where: str, path: Path) -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(f"{where or 'the top level'} is a {type(data).__name__}, not an object")
        self.data: dict[str, object] = data

    def fail(self, what: str) -> NoReturn:
        raise PlanFileError(f"{self.path}: {what}.\nThe file is truncated, edited or corrupt. {REEMIT}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type | tuple[type, ...]) -> object:
        if key not in self.data:
            self.fail(f"field {self._name(key)} is missing")
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            self.fail(f"field {self._name(key)} is {json.dumps(value)[:40]}, not {wanted}")
        return value

    def obj(self, key: str) -> _Json:
        return _Json(self.get(key, dict), self._name(key), self.path)

    def objs(self, key: str) -> list[_Json]:
        return [_Json(item, f"{self._name(key)}[{i}]", self.path) for i, item in enumerate(self.get(key, list))]

    def ints(self, key: str) -> tuple[int, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.fail(f"field {self._name(key)} is not a list of integers")
        return tuple(values)

    def strs(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, str) for v in values):
            self.fail(f"field {self._name(key)} is not a list of strings")
        return tuple(values)


_ANNOTATION_KINDS: Mapping[str, tuple[type, ...]] = {
    "int": (int,), "float": (float,), "str": (str,), "bool": (bool,),
    "int | None": (int, type(None)), "float | None": (float, type(None)), "str | None": (str, type(None)),
}


def _decode_flat(cls: type, fields: _Json) -> object:
    """An instance of a dataclass of scalars; fields added to it since the file was written take their defaults."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields.data) - set(known))
    if unknown:
        fields.fail(f"{fields.where} has fields {', '.join(unknown)} that {cls.__name__} does not know")
    values = {}
    for name, field in known.items():
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if not fields.has(name) and has_default:
            continue
        annotation = str(field.type)
        assert annotation in _ANNOTATION_KINDS, f"plan.json has no encoding for {cls.__name__}.{name}: {annotation}"
        values[name] = fields.get(name, _ANNOTATION_KINDS[annotation])
    return cls(**values)


def read_plan_file(directory: Path) -> _Json:
    """plan.json of `directory`, checked to be a pipecc plan this version can read."""
    path = directory / PLAN_FILE
    if not directory.is_dir():
        raise PlanFileError(f"no plan at {directory}: the directory does not exist.\n"
                            "Check the path, or write a plan there with plan.emit(directory).")
    if not path.is_file():
        raise PlanFileError(f"{path} is missing, so {directory} holds no complete plan (or its emit was interrupted).\n"
                            f"{REEMIT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise PlanFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); it is corrupt.\n"
                            f"{REEMIT}") from None
    except json.JSONDecodeError as err:
        raise PlanFileError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
                            f"the file is truncated or corrupt.\n{REEMIT}") from None
    fields = _Json(data, "", path)
    if data.get("format") != FORMAT:
        raise PlanFileError(f"{path} is not a pipecc plan: its \"format\" is {json.dumps(data.get('format'))[:40]}, "
                            f"not \"{FORMAT}\".\nPass pipecc.load a directory written by plan.emit.")
    version = fields.get("version", int)
    if version > VERSION:
        raise PlanFileError(f"{path} has format version {version}, but pipecc {pipecc.__version__} reads versions "
                            f"up to {VERSION}.\nUpgrade pipecc, or emit the plan again with this version.")
    if version < 1:
        fields.fail(f"format version {version} does not exist")
    return fields


# ---------------------------------------------------------------------------------------------- load


def load_plan(directory: Path, *, rank: int | None = None) -> Plan:
    """The Plan emitted into `directory`: every stage's module, or with `rank`, only that rank's
    (the other stages keep their metadata and an empty nn.Module, which is all `plan.runner()` on
    that rank reads). Parameters with one canonical name are one shared nn.Parameter."""
    fields = read_plan_file(directory)
    plan = _decode_plan(fields)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < plan.num_ranks):
        raise ConfigError(f"rank={rank!r}, but the plan at {directory} has {plan.num_ranks} ranks "
                          f"(0 to {plan.num_ranks - 1}).\nPass torch.distributed.get_rank() of a world of that size.")
    stage_fields = fields.objs("stages")
    rank_fields = fields.objs("ranks")
    shared: dict[str, torch.Tensor] = {}  # canonical name -> the one tensor every stage binds
    modules: dict[int, nn.Module] = {}
    for r in range(plan.num_ranks) if rank is None else [rank]:
        on_rank = [(s, f) for s, f in zip(plan.stages, stage_fields) if s.rank == r]
        modules.update(_load_rank(directory, r, on_rank, rank_fields[r], shared))
    stages = [dataclasses.replace(s, graph=modules.get(s.index, nn.Module())) for s in plan.stages]
    if needs_split_backward(plan.schedule):  # F/B/W graphs are not stored: cut them again from the loaded modules
        stages = list(split_backward_stages(stages, indices=set(modules)))
    return Plan(config=plan.config, device=plan.device, stages=stages, schedule=plan.schedule,
                input_specs=plan.input_specs, target_spec=plan.target_spec, capture_method=plan.capture_method)


def _decode_plan(fields: _Json) -> Plan:
    """The plan's metadata, every stage with an empty module; PlanFileError if it does not verify."""
    config = _decode_flat(Config, fields.obj("config"))
    device = _decode_flat(DeviceSpec, fields.obj("device"))
    schedule = _decode_schedule(fields.obj("schedule"))
    stages = tuple(_decode_stage(f) for f in fields.objs("stages"))
    if len(fields.objs("ranks")) != schedule.num_ranks:
        fields.fail(f"it lists {len(fields.objs('ranks'))} rank files for a schedule of {schedule.num_ranks} ranks")
    if len(stages) != schedule.num_stages or any(s.index != i for i, s in enumerate(stages)):
        fields.fail(f"its stages are numbered {[s.index for s in stages]}, but the schedule has {schedule.num_stages}")
    placed = tuple(s.rank for s in stages)
    if placed != schedule.stage_to_rank:
        fields.fail(f"its stages sit on ranks {list(placed)} but the schedule puts them on "
                    f"{list(schedule.stage_to_rank)}")
    try:
        check_schedule(schedule)
        check_stages(stages)
    except (ScheduleError, PartitionError) as err:
        fields.fail(f"its plan does not verify: {str(err).splitlines()[0].rstrip('.')}")
    return Plan(config=config, device=device, stages=stages, schedule=schedule,
                input_specs=tuple(_decode_spec(f) for f in fields.objs("input_specs")),
                target_spec=_decode_spec(fields.obj("target_spec")),
                capture_method=fields.get("capture_method", str))


_ACTION = re.compile(r"(\d+)([A-Z_]+)(\d+)")


def _decode_schedule(fields: _Json) -> Schedule:
    rank_actions = []
    for r, actions in enumerate(fields.get("rank_actions", list)):
        if not isinstance(actions, list):
            fields.fail(f"field {fields.where}.rank_actions[{r}] is not a list")
        rank_actions.append(tuple(_decode_action(a, fields) for a in actions))
    schedule = Schedule(name=fields.get("name", str), num_stages=fields.get("num_stages", int),
                        num_microbatches=fields.get("num_microbatches", int),
                        stage_to_rank=fields.ints("stage_to_rank"), rank_actions=tuple(rank_actions))
    if len(schedule.stage_to_rank) != schedule.num_stages:
        fields.fail(f"{fields.where}.stage_to_rank places {len(schedule.stage_to_rank)} stages, "
                    f"but num_stages is {schedule.num_stages}")
    for r, actions in enumerate(schedule.rank_actions):
        for action in actions:
            if not (action.stage < schedule.num_stages and action.microbatch < schedule.num_microbatches):
                fields.fail(f"{fields.where}.rank_actions[{r}] holds {action}, outside the plan's "
                            f"{schedule.num_stages} stages and {schedule.num_microbatches} micro-batches")
    return schedule


def _decode_action(text: object, fields: _Json) -> Action:
    match = _ACTION.fullmatch(text) if isinstance(text, str) else None
    if match is None or match[2] not in ActionKind.__members__:
        fields.fail(f"{fields.where}.rank_actions holds {json.dumps(text)[:40]}, not an action like \"0F3\"")
    return Action(int(match[1]), ActionKind(match[2]), int(match[3]))


def _decode_spec(fields: _Json) -> TensorSpec:
    dtype = fields.get("dtype", str)
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        fields.fail(f"field {fields.where}.dtype is {dtype!r}, not a torch dtype")
    return TensorSpec(fields.ints("shape"), dtype, fields.get("requires_grad", bool))


def _decode_stage(fields: _Json) -> Stage:
    inputs = []
    for f in fields.objs("inputs"):
        kind = f.get("kind", str)
        if kind not in {k.value for k in InputKind}:
            f.fail(f"field {f.where}.kind is {kind!r}, not one of {', '.join(k.value for k in InputKind)}")
        inputs.append(StageInput(f.get("name", str), InputKind(kind), _decode_spec(f.obj("spec")),
                                 f.get("input_index", int)))
    node_names = fields.strs("node_names")
    if not node_names:
        fields.fail(f"field {fields.where}.node_names is empty")
    return Stage(
        index=fields.get("index", int),
        rank=fields.get("rank", int),
        node_names=node_names,
        inputs=tuple(inputs),
        outputs=tuple(StageOutput(f.get("name", str), _decode_spec(f.obj("spec"))) for f in fields.objs("outputs")),
        params=tuple(ParamBinding(f.get("local_name", str), f.get("canonical_name", str), f.get("is_parameter", bool))
                     for f in fields.objs("params")),
        cost=_decode_flat(StageCost, fields.obj("cost")),
        graph=nn.Module(),
    )


def _load_rank(directory: Path, rank: int, on_rank: Sequence[tuple[Stage, _Json]], files: _Json,
               shared: dict[str, torch.Tensor]) -> dict[int, nn.Module]:
    """Stage index -> its emitted module with weights bound, for every stage on `rank`."""
    module_path, weights_path = directory / files.get("module", str), directory / files.get("weights", str)
    weights = _read_weights(weights_path)
    pickled_name = files.get("pickled", (str, type(None)))
    pickled = _read_pickled(directory / pickled_name) if pickled_name else {}
    namespace = _import_rank_module(module_path)
    modules = {}
    for stage, fields in on_rank:
        class_name = fields.get("class_name", str)
        cls = getattr(namespace, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise PlanFileError(f"{module_path} has no class {class_name} (stage {stage.index}).\n"
                                f"The file was edited or comes from another plan. {REEMIT}")
        pickled_names = fields.strs("pickled")
        try:
            with torch.device("meta"), _SkipMetaFills():  # every tensor is replaced from the weight shard below
                module = cls(pickled.get(class_name, {})) if pickled_names else cls()
        except Exception as err:  # an edited file, or a pickle from another plan
            raise PlanFileError(f"{module_path}: {class_name}() raised {type(err).__name__}: {err}.\n"
                                f"The file was edited or comes from another plan. {REEMIT}") from None
        _bind_tensors(module, stage, fields, weights, shared, module_path, weights_path)
        _LOADED[cls] = _Loaded(*_class_source(module_path, class_name), pickled=pickled_names)
        modules[stage.index] = module
    return modules


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PlanFileError(f"{path} is missing: the plan's weights for this rank are gone.\n{REEMIT}") from None
    except Exception as err:  # torch.load reports a bad archive in many ways
        raise PlanFileError(f"{path} is not a readable weight shard ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}); it is truncated or corrupt.\n"
                            f"{REEMIT}") from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise PlanFileError(f"{path} does not hold a {{name: tensor}} dict, so it is no pipecc weight shard.\n{REEMIT}")
    return weights


def _read_pickled(path: Path) -> dict[str, dict[str, object]]:
    try:
        pickled = torch.load(path, map_location="cpu", weights_only=False)  # modules: trusted plans only
    except FileNotFoundError:
        raise PlanFileError(f"{path} is missing: the plan's pickled modules for this rank are gone.\n{REEMIT}") from None
    except Exception as err:  # unpickling fails in many ways, e.g. a module class that is not importable
        raise PlanFileError(f"cannot unpickle {path}: {type(err).__name__}: {str(err)[:200]}.\n"
                            "Make the module classes importable, or re-emit the plan.") from None
    if not isinstance(pickled, dict):
        raise PlanFileError(f"{path} does not hold a {{class name: {{attribute: module}}}} dict.\n{REEMIT}")
    return pickled


def _import_rank_module(path: Path) -> types.ModuleType:
    """Run rank_{r}.py as a fresh module (a unique name, so plans loaded side by side never clash)."""
    if not path.is_file():
        raise PlanFileError(f"{path} is missing: the plan's code for this rank is gone.\n{REEMIT}")
    name = f"pipecc_emitted_{next(_module_ids)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"no import spec for {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so its classes pickle and show their source in tracebacks
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a syntax error, a missing import: anything the file raises
        del sys.modules[name]
        raise PlanFileError(f"cannot import {path}: {type(err).__name__}: {err}.\n"
                            f"The file is truncated, edited or needs a missing package. {REEMIT}") from None
    return module


def _class_source(path: Path, class_name: str) -> tuple[str, tuple[str, ...]]:
    """The text of `class_name` in `path` and the file's module-level import statements."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    imports = tuple(ast.get_source_segment(text, n) for n in tree.body
                    if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign)))
    source = next(ast.get_source_segment(text, n) for n in tree.body
                  if isinstance(n, ast.ClassDef) and n.name == class_name)
    return source, imports


def _bind_tensors(module: nn.Module, stage: Stage, fields: _Json, weights: Mapping[str, torch.Tensor],
                  shared: dict[str, torch.Tensor], module_path: Path, weights_path: Path) -> None:
    """Put the shard's tensors into `module` at the plan's local names, one object per canonical name."""
    expected = _module_tensors(module)
    listed = {f.get("local_name", str) for f in fields.objs("params")}
    if set(expected) != listed:
        raise PlanFileError(
            f"{module_path}: stage {stage.index}'s module has tensors {sorted(set(expected) - listed)[:5]} "
            f"that plan.json does not list, and lacks {sorted(listed - set(expected))[:5]}.\n"
            f"The file was edited or comes from another plan. {REEMIT}")
    for binding, f in zip(stage.params, fields.objs("params")):
        tensor = shared.get(binding.canonical_name)
        if tensor is None:
            tensor = _shard_tensor(weights, binding.canonical_name, f, weights_path)
            if binding.is_parameter:
                tensor = nn.Parameter(tensor, requires_grad=f.get("requires_grad", bool))
            shared[binding.canonical_name] = tensor
        owner_name, _, attr = binding.local_name.rpartition(".")
        owner = module.get_submodule(owner_name)
        table = owner._parameters if binding.is_parameter else owner._buffers
        if attr not in table:
            raise PlanFileError(f"{module_path}: {binding.local_name} of stage {stage.index} is not a "
                                f"{'parameter' if binding.is_parameter else 'buffer'} there.\n{REEMIT}")
        table[attr] = tensor


def _shard_tensor(weights: Mapping[str, torch.Tensor], name: str, fields: _Json, path: Path) -> torch.Tensor:
    if name not in weights:
        raise PlanFileError(f"{path} lacks the tensor {name}; the shard is incomplete or from another plan.\n{REEMIT}")
    tensor = weights[name]
    want = (fields.ints("shape"), fields.get("dtype", str))
    got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    if got != want:
        raise PlanFileError(f"{path}: {name} has shape {got[0]} and dtype {got[1]}, but plan.json says "
                            f"{want[0]} and {want[1]}; the shard is from another plan.\n{REEMIT}")
    return tensor
