"""Capture: model + loss_fn -> one fx graph whose output is the scalar loss of a micro-batch.

torch.fx symbolic_trace first (module-level nodes, readable names); torch.export
(non-strict, then strict) when fx cannot trace. Every node gets meta["val"] by fake-tensor
propagation at micro-batch shapes, so no real compute runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from typing import Callable, Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_leaves, tree_map

import pipecc.errors
from pipecc.errors import CaptureError, ConfigError
from pipecc.ir import Captured
from pipecc.passes.graph_facts import CONSTANT_TYPES

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
    batch_size = check_batch(example_inputs, example_target, num_microbatches)
    microbatch_size = batch_size // num_microbatches
    mb_inputs = tuple(t[:microbatch_size] for t in example_inputs)
    mb_target = example_target[:microbatch_size]

    failures: list[tuple[str, BaseException]] = []
    for method, trace in (("symbolic_trace", _trace_fx), ("export(strict=False)", _trace_export_nonstrict),
                          ("export(strict=True)", _trace_export_strict)):
        try:
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
    tracer = fx.Tracer()
    unused = _unsupplied_arguments(model, len(inputs))
    graph = tracer.trace(model, concrete_args=unused or None)
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
        raise CaptureError(f"loss_fn returned {type(loss).__name__}, not a tensor computed from the model output.")
    graph.output(loss.node)
    gm = fx.GraphModule(model, graph)
    if unused:
        # Dropping the concrete_args guards can leave their inputs dead. DCE needs the owning
        # module (to tell impure call_module nodes), so it runs on the GraphModule, not the Graph.
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


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
    that no stage boundary may cut; they are as static as a size."""

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if "val" not in n.meta and all(isinstance(leaf, CONSTANT_TYPES) for leaf in tree_leaves(result)):
            n.meta["val"] = result
        return result


def propagate_fake_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Set meta["val"] on every node by running the graph on fake tensors (no real compute)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _FakeValueProp(gm, mode).propagate(*(mode.from_tensor(t) for t in inputs))


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
    lines.append(
        "Fix: replace Python control flow on tensor values (`if x.sum() > 0:`, `for` over a tensor, "
        ".item(), .tolist()) with tensor ops such as torch.where(cond, a, b) or a mask; "
        "branching on shapes (`if x.shape[1] > 4:`) is fine."
    )
    return CaptureError("\n".join(lines))


def _user_frame(err: BaseException) -> str:
    """' (at file.py:LINE in fn: code)' for the deepest traceback frame outside torch and pipecc."""
    torch_dir = os.path.dirname(torch.__file__)
    ours = (torch_dir, os.path.dirname(__file__), os.path.dirname(pipecc.errors.__file__))
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(ours) and "<" not in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()})"
