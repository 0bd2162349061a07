"""Capture: model + loss_fn -> one fx graph whose output is the scalar loss of a micro-batch.

torch.fx symbolic_trace first (module-level nodes, readable names); torch.export
(non-strict, then strict) when fx cannot trace. Every node gets meta["val"] by fake-tensor
propagation at micro-batch shapes, so no real compute runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import traceback
import types
from typing import Callable, Iterator, Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
from torch.fx.experimental.symbolic_shapes import uninteresting_files
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_leaves, tree_map

import pipecc.errors
from pipecc.errors import CaptureError, ConfigError
from pipecc.ir import Captured
from pipecc.passes.fake_values import FakeValueMemo
from pipecc.passes.graph_facts import CONSTANT_TYPES, grad_nodes, output_node
from pipecc.passes.rng import seed_dropouts

log = logging.getLogger(__name__)

TARGET_NAME = "pipecc_target"
LossFn = Callable[..., torch.Tensor]


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor], loss_fn: LossFn,
            example_target: torch.Tensor, *, num_microbatches: int) -> Captured:
    """Trace `loss_fn(model(*inputs), target)` at micro-batch shapes; parameters stay the model's own.

    The returned graph's placeholders are the model inputs then the target, and its output is
    the loss. Parameters in the graph module are the very tensors of `model`, so gradients
    computed through it land in `model`'s `.grad`.
    """
    check_model_and_loss(model, loss_fn)
    batch_size = check_batch(example_inputs, example_target, num_microbatches)
    microbatch_size = batch_size // num_microbatches
    mb_inputs = tuple(t[:microbatch_size] for t in example_inputs)
    mb_target = example_target[:microbatch_size]

    failures: list[tuple[str, BaseException]] = []
    for method, trace in (("symbolic_trace", _trace_fx), ("export(strict=False)", _trace_export_nonstrict),
                          ("export(strict=True)", _trace_export_strict)):
        try:
            with preserved_buffers(model):  # fake propagation still bumps BatchNorm's num_batches_tracked
                gm = trace(model, loss_fn, mb_inputs, mb_target)
                propagate_fake_values(gm, (*mb_inputs, mb_target))
        except ConfigError:
            raise  # bad input (a missing argument): no other tracer can fix it
        except Exception as err:  # every tracer reports failure differently; we report them all
            log.info("capture with %s failed: %s", method, err)
            failures.append((method, err))
            continue
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        check_loss_output(gm)
        check_loss_is_trainable(gm, model)
        check_inputs_not_mutated(gm, model, placeholders)
        seed_dropouts(gm)  # the same masks for a micro-batch whatever the partition (passes/rng.py)
        return Captured(
            graph_module=gm,
            input_names=tuple(placeholders[:-1]),
            target_name=placeholders[-1],
            batch_size=batch_size,
            microbatch_size=microbatch_size,
            canonical_names=canonical_names(gm, model),
            method=method,
        )
    raise untraceable_error(model, failures)


def check_model_and_loss(model: object, loss_fn: object) -> None:
    """ConfigError unless `model` is an nn.Module and `loss_fn` is callable (before any tracer runs,
    which would report them as an untraceable model)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module.\n"
                          "Wrap the function in an nn.Module whose forward calls it.")
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn is {loss_fn!r}, not a callable.\n"
                          "Pass loss_fn=f where f(model_output, target) returns the scalar loss of a batch.")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.momentum is None \
                and module.track_running_stats:
            raise ConfigError(
                f"{name} ({type(module).__name__}) has momentum=None: its running stats are a cumulative average "
                "weighted by the batch count it reads from a buffer, which no tracer can turn into a static graph.\n"
                f"Give it a momentum (e.g. {type(module).__name__}(..., momentum=0.1)), or put it in eval mode."
            )


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of `model` on exit: compiling must not change the model's state."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def check_batch(example_inputs: Sequence[torch.Tensor], example_target: torch.Tensor,
                num_microbatches: int) -> int:
    """The batch size shared by every input and the target; ConfigError if they disagree."""
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(
            f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}.\n"
            "Wrap a single input as (x,)."
        )
    named = [(f"example_inputs[{i}]", t) for i, t in enumerate(example_inputs)] + [("example_target", example_target)]
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{name} is of type {type(value).__name__}, but pipecc splits every input along dim 0 "
                "into micro-batches, so each must be a tensor.\n"
                "Pass tensors only; fold constants (flags, sizes) into the model."
            )
        if value.dim() == 0:
            raise ConfigError(f"{name} is a 0-d tensor; every input needs a batch dimension 0 to split.\n"
                              "Give it a leading batch dimension, or fold it into the model as a constant.")
    batch_size = example_inputs[0].shape[0] if example_inputs else example_target.shape[0]
    for name, value in named:
        if value.shape[0] != batch_size:
            raise ConfigError(
                f"{name} has batch size {value.shape[0]} (dim 0) but example_inputs[0] has {batch_size}.\n"
                "pipecc splits every input and the target along dim 0; give them the same batch size."
            )
    if num_microbatches < 1:
        raise ConfigError(f"num_microbatches={num_microbatches}; it must be at least 1.")
    if batch_size % num_microbatches:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ConfigError(
            f"batch size {batch_size} does not divide into num_microbatches={num_microbatches} equal micro-batches.\n"
            f"Use a num_microbatches that divides {batch_size} ({', '.join(map(str, divisors))}) "
            "or a batch size that is a multiple of it."
        )
    return batch_size


def _trace_fx(model: nn.Module, loss_fn: LossFn, inputs: tuple[torch.Tensor, ...],
              target: torch.Tensor) -> fx.GraphModule:
    tracer = _SourceRecordingTracer()
    unused = _unsupplied_arguments(model, len(inputs))
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    with _refusing_grad_mode_switches(model):
        graph = tracer.trace(model, concrete_args=unused or None)
    _check_buffers_unchanged(model, before)
    _drop_specialised_placeholders(graph, unused)
    output = next(n for n in graph.nodes if n.op == "output")
    model_output = output.args[0]
    graph.erase_node(output)
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        target_node = graph.placeholder(TARGET_NAME)
    proxies = fx.node.map_arg(model_output, lambda n: fx.Proxy(n, tracer))
    loss = loss_fn(proxies, fx.Proxy(target_node, tracer))
    if not isinstance(loss, fx.Proxy):
        raise ConfigError(f"loss_fn returned {type(loss).__name__}, not a tensor computed from the model output.\n"
                          "Return the loss tensor itself (no .item(), no float()), e.g. F.mse_loss(output, target).")
    graph.output(loss.node)
    with _use_lazy_graph_module(True):  # its Python code is made when first run or read: passes only read the graph
        gm = _make_graph_module(model, graph)
    if unused:
        # Dropping the concrete_args guards can leave their inputs dead. DCE needs the owning
        # module (to tell impure call_module nodes), so it runs on the GraphModule, not the Graph.
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


class _SourceRecordingTracer(fx.Tracer):
    """fx.Tracer that records each node's stack trace, so that errors and refusals name the user's
    source line (node_site). The same text as torch's `record_stack_traces` (the frames from the
    first `forward` on, less torch's uninteresting files), made from the live frames with each
    frame's text formatted once: torch's symbolised capture cost 0.4 ms a node, a third of tracing."""

    def create_node(self, kind: str, target: fx.node.Target, args: tuple[object, ...], kwargs: dict[str, object],
                    name: str | None = None, type_expr: object | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:
            node.stack_trace = _stack_trace(sys._getframe(1)) or None
        return node

    def create_arg(self, a: object) -> object:
        """fx.Tracer.create_arg, with the commonest arguments first: a proxy, a plain container or
        a number is what fx would make of it anyway, without its parameter, buffer, module and
        constant-tensor searches (a fifth of tracing time)."""
        kind = type(a)
        if kind is fx.Proxy:
            return a.node  # type: ignore[attr-defined]
        if kind is tuple:
            return tuple(self.create_arg(elem) for elem in a)  # type: ignore[attr-defined]
        if kind is list:
            return [self.create_arg(elem) for elem in a]  # type: ignore[attr-defined]
        if kind in (int, float, bool, str, type(None)):
            return a
        return super().create_arg(a)


def _stack_trace(frame: types.FrameType | None) -> str:
    """The frames below `frame` from the outermost `forward` on, as traceback formats them."""
    frames: list[types.FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    first_forward = next((i for i, f in enumerate(frames) if f.f_code.co_name == "forward"), len(frames))
    uninteresting = uninteresting_files()
    return "".join(_frame_text(f.f_code.co_filename, f.f_lineno, f.f_code.co_name) for f in frames[first_forward:]
                   if f.f_code.co_filename not in uninteresting).strip()


@functools.lru_cache(maxsize=None)
def _frame_text(filename: str, lineno: int, name: str) -> str:
    return "".join(traceback.StackSummary.from_list([traceback.FrameSummary(filename, lineno, name)]).format())


@contextlib.contextmanager
def _refusing_grad_mode_switches(model: nn.Module) -> Iterator[None]:
    """ConfigError if the forward turns gradients off (or on) while fx traces it: fx records no
    grad mode, so a `with torch.no_grad():` block would silently get gradients that eager
    PyTorch never computes. torch.no_grad, enable_grad and set_grad_enabled all end in
    torch._C._set_grad_enabled, looked up at call time."""
    original = torch._C._set_grad_enabled

    def refuse(mode: bool) -> None:
        if bool(mode) != torch.is_grad_enabled():
            torch_dir = os.path.dirname(torch.__file__)
            user = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(torch_dir)]
            site = f" at {os.path.basename(user[-1].filename)}:{user[-1].lineno} in {user[-1].name}: " \
                   f"{(user[-1].line or '').strip()}" if user else ""
            raise ConfigError(
                f"{type(model).__name__}.forward switches gradients {'on' if mode else 'off'}{site}; "
                "the traced graph would keep no grad mode and compute gradients eager PyTorch does not.\n"
                "Replace the torch.no_grad() block by .detach() on the values it produces (the same "
                "gradients, and traceable), or move it out of the model.")
        original(mode)

    torch._C._set_grad_enabled = refuse
    try:
        yield
    finally:
        torch._C._set_grad_enabled = original


def _check_buffers_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """ConfigError if symbolic tracing changed a buffer: fx runs code on buffers (not on inputs) for
    real, so a forward that writes into its own buffer shows up here, and its graph would lack the write.
    (Modules such as BatchNorm update their buffers inside their own call, which fx does not run.)"""
    for name, buffer in model.named_buffers():
        if name in before and not torch.equal(before[name], buffer):
            raise ConfigError(
                f"{type(model).__name__}.forward writes into its buffer {name} in place (seen while tracing).\n"
                "A stage graph would not repeat the write, and other ranks would not see it: update the state "
                "outside forward (e.g. after the step), or inside a module's own forward as BatchNorm does."
            )


def _unsupplied_arguments(model: nn.Module, num_supplied: int) -> dict[str, object]:
    """forward() parameters past the supplied inputs, with their defaults (fx concrete_args)."""
    params = list(inspect.signature(model.forward).parameters.values())
    extra: dict[str, object] = {}
    for param in params[num_supplied:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise ConfigError(
                f"{type(model).__name__}.forward needs argument {param.name!r} but example_inputs has "
                f"only {num_supplied} tensors.\nPass a tensor for every required argument, in order."
            )
        extra[param.name] = param.default
    return extra


def _drop_specialised_placeholders(graph: fx.Graph, unused: dict[str, object]) -> None:
    """Remove the placeholders fx keeps for concrete_args, with the asserts that guard them."""
    if not unused:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(placeholders) - len(unused):]:
        default = node.args[0] if node.args else None
        for user in list(node.users):
            user.args = tree_map(lambda a: default if a is node else a, user.args)
            user.kwargs = tree_map(lambda a: default if a is node else a, user.kwargs)
        graph.erase_node(node)
    guards = (torch._assert, fx._symbolic_trace._assert_is_none)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in guards and not node.all_input_nodes:
            graph.erase_node(node)


class _ModelWithLoss(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn  # not a submodule: its state is not the model's

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(*args[:-1]), args[-1])


def _trace_export(model: nn.Module, loss_fn: LossFn, inputs: tuple[torch.Tensor, ...],
                  target: torch.Tensor, strict: bool) -> fx.GraphModule:
    wrapper = _ModelWithLoss(model, loss_fn)
    exported = torch.export.export(wrapper, (*inputs, target), strict=strict)
    gm = exported.module()
    _share_parameters(gm, wrapper)
    return fx.GraphModule(gm, _plain_graph(gm.graph))


def _plain_graph(graph: fx.Graph) -> fx.Graph:
    """The unlifted export graph with plain calling conventions: positional tensors in, the loss out.

    export's module flattens its inputs and re-packs its outputs through pytree specs in its
    codegen, returns a 1-tuple, and calls a `_guards_fn` submodule that re-checks input shapes
    (pipecc checks those itself, in Plan.check_inputs). The graph the passes see has none of that.
    """
    graph._codegen = fx.graph.CodeGen()
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        output.args = (value[0],)
    graph.lint()
    return graph


def _trace_export_nonstrict(model: nn.Module, loss_fn: LossFn, inputs: tuple[torch.Tensor, ...],
                            target: torch.Tensor) -> fx.GraphModule:
    return _trace_export(model, loss_fn, inputs, target, strict=False)


def _trace_export_strict(model: nn.Module, loss_fn: LossFn, inputs: tuple[torch.Tensor, ...],
                         target: torch.Tensor) -> fx.GraphModule:
    return _trace_export(model, loss_fn, inputs, target, strict=True)


def _share_parameters(gm: nn.Module, original: nn.Module) -> None:
    """Point gm's parameters and buffers at `original`'s tensors of the same name (export may copy)."""
    originals = dict(original.named_parameters(remove_duplicate=False))
    originals.update(original.named_buffers(remove_duplicate=False))
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in originals:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = originals[name]
        else:
            owner._buffers[attr] = originals[name]


class _FakeValueProp(FakeTensorProp):
    """FakeTensorProp that also records constants: FakeTensorProp leaves meta["val"] unset for a
    device, a dtype, a string or None (`x.device`, `x.dtype`), which would make them opaque values
    that no stage boundary may cut; they are as static as a size.

    Calls whose signature it has seen are not run again (passes/fake_values.py), and parameters
    and buffers become fake tensors only when a call that runs reads them: an op on a real
    parameter converts it at every call, about 6x the cost of the op itself (15 vs 2.5 ms for a
    small Linear under FakeTensorMode), and converting every parameter up front cost 0.3 ms each."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, mode)
        self.memo = FakeValueMemo(gm, mode)
        tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
        self._state_ids = {id(t) for _, t in tensors}

    def run_node(self, n: fx.Node) -> object:
        if n.op not in ("call_function", "call_method", "call_module"):
            return self._run_node_noting_site(n)
        key = self.memo.signature(n, *self.fetch_args_kwargs_from_env(n))
        recorded = self.memo.lookup(key)
        if recorded is not None:
            return self.memo.stand_in(n, recorded)
        for arg in n.all_input_nodes:
            if self.memo.has_stand_in(self.env[arg]):
                self.env[arg] = self.memo.materialise(self.env[arg])
        inputs = self.memo.before_run(*self.fetch_args_kwargs_from_env(n))
        result = self._run_node_noting_site(n)
        self.memo.record(key, n, inputs, result)
        return result

    def _run_node_noting_site(self, n: fx.Node) -> object:
        try:
            result = super().run_node(n)
        except Exception as err:
            site = node_site(n)
            if site:
                err.add_note(f"{_SITE_NOTE}{site}")
            raise
        if "val" not in n.meta and all(isinstance(leaf, CONSTANT_TYPES) for leaf in tree_leaves(result)):
            n.meta["val"] = result
        return result

    def get_attr(self, target: fx.node.Target, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        value = super().get_attr(target, args, kwargs)
        return self._fake(value) if isinstance(value, torch.Tensor) and id(value) in self._state_ids else value

    def call_module(self, target: fx.node.Target, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        module = self.fetch_attr(str(target))
        tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        with _reparametrize_module(module, {name: self._fake(t) for name, t in tensors}):
            return super().call_module(target, args, kwargs)

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._mode.from_tensor(tensor)  # memoised per tensor: tied weights stay one fake


def propagate_fake_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Set meta["val"] on every node by running the graph on fake tensors (no real compute)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeValueProp(gm, mode)
    prop.propagate(*(mode.from_tensor(t) for t in inputs))
    log.debug("fake propagation: %d of %d nodes memoised", prop.memo.num_memoised, len(gm.graph.nodes))


def check_loss_output(gm: fx.GraphModule) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    loss = output.args[0]
    value = loss.meta.get("val") if isinstance(loss, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.dtype.is_floating_point:
        described = f"a {type(value).__name__}" if not isinstance(value, torch.Tensor) else \
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        raise ConfigError(
            f"loss_fn(model(*inputs), target) gives {described}; pipecc needs a scalar float loss.\n"
            "Reduce the loss with .mean() (so micro-batch losses average to the batch loss)."
        )


def check_loss_is_trainable(gm: fx.GraphModule, model: nn.Module) -> None:
    """ConfigError unless the loss depends on at least one parameter that requires grad."""
    loss = output_node(gm).args[0]
    if isinstance(loss, fx.Node) and loss.name not in grad_nodes(gm):
        check_no_opaque_objects(gm, model)
        raise ConfigError(
            f"the loss of {type(model).__name__} depends on no trainable parameter "
            f"({sum(p.requires_grad for p in model.parameters())} of {len(list(model.parameters()))} "
            "parameters require grad), so a training step has nothing to compute.\n"
            "Unfreeze parameters (requires_grad_(True)) or run the model without pipecc."
        )


def check_no_opaque_objects(gm: fx.GraphModule, model: nn.Module) -> None:
    """ConfigError if the graph builds an object pipecc cannot look into (a dataclass such as a
    ModelOutput, a custom class): gradients flowing through it would be invisible to the partitioner."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or not node.users or "val" in node.meta:
            continue  # fake propagation records tensors, pytrees of them and constants; not other objects
        site = node_site(node)
        made = node.target if node.op == "call_function" and isinstance(node.target, type) else None
        what = f"an object of type {made.__name__}" if made else "an object that is no tensor"
        raise ConfigError(
            f"{type(model).__name__} builds {what} at graph node {node.name}"
            f"{f' ({site})' if site else ''}, and pipecc can follow gradients only through tensors, tuples, "
            "lists and dicts.\nReturn a tuple or a dict of tensors instead (loss_fn can pick from it: "
            "out[\"logits\"]), or build the object outside the model."
        )


_VIEW_OPS = {"view", "reshape", "__getitem__", "getitem", "transpose", "permute", "unsqueeze", "squeeze",
             "flatten", "unflatten", "narrow", "select", "t", "expand", "expand_as", "view_as", "detach",
             "as_strided", "chunk", "split", "unbind", "movedim", "diagonal", "alias"}
_MUTATING_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                       "setitem"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]  # aten::mul_ -> mul_
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _mutates_first_argument(node: fx.Node, gm: fx.GraphModule) -> bool:
    name = _op_name(node)
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if name in _MUTATING_FUNCTIONS or node.kwargs.get("inplace") is True:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return bool(node.target._schema.arguments) and node.target._schema.arguments[0].is_write
    return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"


def check_inputs_not_mutated(gm: fx.GraphModule, model: nn.Module, placeholders: Sequence[str]) -> None:
    """ConfigError if the model or loss writes into an input or the target (or a view of one) in place:
    every rank is handed its own copy of the batch, so a write made in one stage would not reach the
    stages of other ranks, and the user's tensor would change under the caller.
    (Writes into buffers: _check_buffers_unchanged.)"""
    aliases = {n: "the target" if n.name == placeholders[-1] else f"its input {n.name}"
               for n in gm.graph.nodes if n.op == "placeholder" and n.name in placeholders}
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first not in aliases or node.op == "output":
            continue
        if _mutates_first_argument(node, gm):
            site = node_site(node)
            where = f", {site}" if site else ""
            raise ConfigError(
                f"{type(model).__name__} or loss_fn writes into {aliases[first]} in place "
                f"({_op_name(node)} at graph node {node.name}{where}).\n"
                "Every rank holds its own copy of the batch, so the write would not reach stages on other ranks: "
                "compute out of place instead (x = x * 2, not x.mul_(2) or x *= 2; nn.ReLU(inplace=False))."
            )
        if _op_name(node) in _VIEW_OPS:
            aliases[node] = aliases[first]


def canonical_names(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """Qualified name of each parameter/buffer in gm -> its (deduplicated) name in `model`."""
    by_identity: dict[int, str] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        by_identity.setdefault(id(tensor), name)
    names: dict[str, str] = {}
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        names[name] = by_identity.get(id(tensor), name)
    return names


def untraceable_error(model: nn.Module, failures: list[tuple[str, BaseException]]) -> CaptureError:
    """A CaptureError naming the user's source line where the first tracer gave up."""
    lines = [f"cannot capture {type(model).__name__}: no tracing path worked."]
    for method, err in failures:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"  {method}: {type(err).__name__}: {first_line[:300]}{_user_frame(err)}")
    lines.append(_capture_fix(model, failures))
    return CaptureError("\n".join(lines))


def _capture_fix(model: nn.Module, failures: list[tuple[str, BaseException]]) -> str:
    """The fix line for the commonest reasons no tracer works, told apart by the tracers' errors."""
    text = " ".join(f"{type(err).__name__}: {err}" for _, err in failures)
    if "DynamicOutputShape" in text or "data-dependent" in text.lower() and "shape" in text.lower():
        return ("Fix: an op's output shape depends on tensor values (nonzero, masked_select, unique, boolean "
                "indexing); pipeline stages need static shapes, so use a fixed-shape mask or torch.where instead.")
    if "is invalid for input of size" in text or "shape mismatch" in text.lower():
        return ("Fix: the model seems to hard-code the batch size, but pipecc traces it at micro-batch size; "
                "use x.shape[0] or -1 (x.view(-1, 4), not x.view(8, 4)).")
    if "has no attribute 'size'" in text or "has no attribute 'dim'" in text:
        return (f"Fix: {type(model).__name__} returns a tuple, dict or output object and loss_fn treats it as a "
                "tensor; pass a loss_fn that picks the tensor, e.g. loss_fn=lambda out, t: F.cross_entropy(out[0], t) "
                "or out[\"logits\"] or out.logits.")
    return ("Fix: replace Python control flow on tensor values (`if x.sum() > 0:`, `for` over a tensor, "
            ".item(), .tolist()) with tensor ops such as torch.where(cond, a, b) or a mask; "
            "branching on shapes (`if x.shape[1] > 4:`) is fine.")


_SITE_NOTE = "pipecc: failed at "


def node_site(node: fx.Node) -> str:
    """'file.py:LINE in fn: code' of the user's line that made `node` ('' when the tracer kept no trace)."""
    lines = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    ours = (os.path.dirname(torch.__file__), os.path.dirname(__file__), os.path.dirname(pipecc.errors.__file__))
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("File \"") and ", line " in line and not line[len("File \""):].startswith(ours):
            path, _, rest = line[len("File \""):].partition("\", line ")
            lineno, _, fn = rest.partition(", in ")
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{os.path.basename(path)}:{lineno} in {fn}: {code}"
    return ""


def _user_frame(err: BaseException) -> str:
    """' (at file.py:LINE in fn: code)' for the deepest traceback frame outside torch and pipecc."""
    torch_dir = os.path.dirname(torch.__file__)
    ours = (torch_dir, os.path.dirname(__file__), os.path.dirname(pipecc.errors.__file__))
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(ours) and "<" not in f.filename]
    if not frames:  # raised while running the graph: the site the tracer recorded for the node
        sites = [n[len(_SITE_NOTE):] for n in getattr(err, "__notes__", ()) if n.startswith(_SITE_NOTE)]
        return f" (at {sites[0]})" if sites else ""
    frame = frames[-1]
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()})"
