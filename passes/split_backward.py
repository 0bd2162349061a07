"""Split backward: per stage, a forward graph (F), an input-gradient graph (B) and a
weight-gradient graph (W), cut from one joint forward/backward graph at the aten level.

Zero-bubble schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2) run B as
soon as the next stage's gradient arrives, because the previous stage waits for it, and defer
W into what would otherwise be bubbles. This pass makes that split at compile time:

1. trace `torch.autograd.grad` of the stage (outputs w.r.t. its activation inputs and its
   parameters) with make_fx: one joint graph holding the forward and the exact aten ops the
   autograd engine runs for the fused backward, in its order;
2. split ops that compute both kinds of gradient at once (convolution_backward, the norm
   backwards: every op with an `output_mask`) into an input part and a weight part;
3. F = what the stage outputs need; B = what the input gradients need; W = what only the
   parameter gradients need. A value both need is computed once in B and handed to W.

Replaying the traced ops gives the fused backward bit for bit; F keeps only what B or W read,
and after B only what W reads stays alive.

Calling convention, with `weights` the stage module's parameters then buffers (by local name):
    forward(*weights, *stage_inputs)       -> (*stage_outputs, *saved)
    backward_input(*weights, *saved, *output_grads)  -> (*activation_input_grads, *held)
    backward_weight(*weights, *held)       -> (*parameter_grads)   (None where a parameter gets none)
`output_grads` are given for the outputs whose spec requires grad; activation_input_grads for
the activation inputs whose spec requires grad (None where unused).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, replace
from typing import Callable, Collection, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from pipecc.errors import PipeccError
from pipecc.ir import ActionKind, InputKind, Schedule, SplitBackward, Stage

log = logging.getLogger(__name__)


class SplitBackwardError(PipeccError):
    """A stage's backward could not be split at graph level (the runtime falls back to autograd)."""


@dataclass(frozen=True)
class _Signature:
    """How the joint graph's flat placeholders and outputs line up with the stage's boundary."""

    weight_names: tuple[str, ...]
    num_params: int  # the first num_params weights are trainable-or-not parameters, then buffers
    grad_param_names: tuple[str, ...]  # parameters that get a gradient, in W's output order
    num_inputs: int
    grad_input_positions: tuple[int, ...]  # indices among stage inputs whose gradient B returns
    num_outputs: int
    tangent_positions: tuple[int, ...]  # indices among stage outputs that receive a gradient


def needs_split_backward(schedule: Schedule) -> bool:
    """Whether any rank runs separate B or W actions."""
    return any(a.kind in (ActionKind.B, ActionKind.W) for actions in schedule.rank_actions for a in actions)


def split_backward_stages(stages: Sequence[Stage], *, indices: Collection[int] | None = None) -> tuple[Stage, ...]:
    """`stages` with `backward_split` set wherever the graph split works (only for the stages in
    `indices`, when given: a rank's own); where it does not, the stage keeps None (the runtime then
    splits with autograd) and the reason is logged."""
    result = []
    for stage in stages:
        if indices is not None and stage.index not in indices:
            result.append(stage)
            continue
        try:
            split = split_backward(stage)
            check_split_backward(stage, split)
        except SplitBackwardError as err:
            log.warning("stage %d: backward split at autograd level, not graph level: %s", stage.index, err)
            result.append(replace(stage, backward_split=None))
            continue
        result.append(replace(stage, backward_split=split))
    return tuple(result)


def split_backward(stage: Stage) -> SplitBackward:
    """F, B and W graphs of `stage` (see the module docstring for how they are called).

    >>> import torch, pipecc
    >>> from examples import mlp
    >>> model, inputs, loss_fn, target = mlp.build(batch_size=8)
    >>> plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
    ...                       num_microbatches=2)
    >>> split = split_backward(plan.stages[1])
    >>> len(split.grad_param_names) == sum(1 for p in plan.stages[1].graph.parameters())
    True
    """
    signature = _signature(stage)
    joint = _trace_joint(stage, signature)
    _split_output_mask_ops(joint, signature)
    return _partition_joint(joint, signature)


def _signature(stage: Stage) -> _Signature:
    module = stage.graph
    params = list(module.named_parameters())
    buffers = list(module.named_buffers())
    return _Signature(
        weight_names=tuple(n for n, _ in params + buffers),
        num_params=len(params),
        grad_param_names=tuple(n for n, p in params if p.requires_grad),
        num_inputs=len(stage.inputs),
        grad_input_positions=tuple(i for i, inp in enumerate(stage.inputs)
                                   if inp.kind is InputKind.ACTIVATION and inp.spec.requires_grad),
        num_outputs=len(stage.outputs),
        tangent_positions=tuple(i for i, out in enumerate(stage.outputs) if out.spec.requires_grad),
    )


def _trace_joint(stage: Stage, sig: _Signature) -> fx.GraphModule:
    """make_fx of (weights, inputs, output grads) -> (outputs, input grads, parameter grads)."""
    module = stage.graph
    num_weights, num_inputs = len(sig.weight_names), sig.num_inputs
    grad_params = set(sig.grad_param_names)

    def joint(*flat: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, inputs, tangents = flat[:num_weights], flat[num_weights:num_weights + num_inputs], \
            flat[num_weights + num_inputs:]
        outputs = torch.func.functional_call(module, dict(zip(sig.weight_names, weights)), tuple(inputs))
        wrt = [inputs[i] for i in sig.grad_input_positions] + \
              [w for n, w in zip(sig.weight_names[:sig.num_params], weights) if n in grad_params]
        pairs = [(outputs[i], t) for i, t in zip(sig.tangent_positions, tangents) if outputs[i].requires_grad]
        grads: Sequence[torch.Tensor | None] = [None] * len(wrt)
        if pairs and wrt:
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [t for _, t in pairs], allow_unused=True)
        return tuple(outputs) + tuple(grads)

    params_and_buffers = dict(module.named_parameters())
    params_and_buffers.update(dict(module.named_buffers()))
    example = [_example_weight(params_and_buffers[n], n in grad_params) for n in sig.weight_names]
    example += [_example(inp.spec.shape, inp.spec.torch_dtype, i in sig.grad_input_positions)
                for i, inp in enumerate(stage.inputs)]
    example += [_example(stage.outputs[i].spec.shape, stage.outputs[i].spec.torch_dtype, False)
                for i in sig.tangent_positions]
    try:
        with torch.enable_grad():
            return make_fx(joint, tracing_mode="fake")(*example)
    except Exception as err:  # tracing fails in many ways (data-dependent control flow, opaque ops)
        raise SplitBackwardError(f"make_fx could not trace the joint graph: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}") from err


def _example_weight(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return tensor.detach().requires_grad_(requires_grad)


def _example(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype).requires_grad_(requires_grad)


def _joint_boundary(joint: fx.GraphModule, sig: _Signature) -> tuple[list[fx.Node], list[fx.Node | None]]:
    """The joint graph's placeholders, and its flat outputs (outputs, input grads, parameter grads)."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(joint.graph.nodes) if n.op == "output")
    flat = list(output.args[0])
    expected = sig.num_outputs + len(sig.grad_input_positions) + len(sig.grad_param_names)
    assert len(flat) == expected, f"joint graph has {len(flat)} outputs, expected {expected}"
    return placeholders, flat


def _ancestors(roots: Iterable[fx.Node | None], stop: set[fx.Node]) -> set[fx.Node]:
    """Nodes that `roots` depend on (roots included), not walking through `stop`."""
    seen: set[fx.Node] = set()
    todo = [r for r in roots if isinstance(r, fx.Node)]
    while todo:
        node = todo.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _forward_nodes(joint: fx.GraphModule, sig: _Signature, placeholders: list[fx.Node],
                   flat_outputs: list[fx.Node | None]) -> set[fx.Node]:
    """What the stage outputs need, plus in-place updates (running statistics) made in the forward."""
    tangents = set(placeholders[len(sig.weight_names) + sig.num_inputs:])
    needed = _ancestors(flat_outputs[:sig.num_outputs], stop=set())
    from_tangents = _descendants(tangents)
    for node in joint.graph.nodes:
        if node.op == "call_function" and _is_mutating(node) and node not in from_tangents:
            needed |= _ancestors([node], stop=set())
    if needed & tangents:
        raise SplitBackwardError("a stage output depends on an output gradient")
    return _with_getitems({n for n in needed if n.op == "call_function"})


def _with_getitems(nodes: set[fx.Node]) -> set[fx.Node]:
    """`nodes` plus the getitem users of those that return tuples, so that only tensors (never a
    tuple keeping all of an op's outputs alive) cross from one graph to the next."""
    return nodes | {u for n in nodes for u in n.users if u.target is operator.getitem and u.users}


def _descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(node.users)
    return seen


def _split_output_mask_ops(joint: fx.GraphModule, sig: _Signature) -> None:
    """Rewrite each backward op with an `output_mask` whose outputs go to both B and W into two
    ops, one computing only the input gradient (in B) and one only the weight gradients (in W)."""
    placeholders, flat = _joint_boundary(joint, sig)
    forward = _forward_nodes(joint, sig, placeholders, flat)
    input_grads = flat[sig.num_outputs:sig.num_outputs + len(sig.grad_input_positions)]
    for_b = _ancestors(input_grads, stop=forward)
    for node in list(joint.graph.nodes):
        mask_index = _output_mask_index(node)
        if node not in for_b or mask_index is None:
            continue
        users = [u for u in node.users if u.target is operator.getitem]
        if len(users) != len(node.users):
            continue
        b_indices = {u.args[1] for u in users if u in for_b}
        w_indices = {u.args[1] for u in users if u not in for_b} - b_indices
        mask = list(node.args[mask_index])
        w_indices = {i for i in w_indices if mask[i]}
        if not b_indices or not w_indices:
            continue
        with joint.graph.inserting_after(node):
            w_node = joint.graph.call_function(node.target, _with_mask(node, mask_index, w_indices), node.kwargs)
            w_node.meta = dict(node.meta)
        node.args = _with_mask(node, mask_index, b_indices)
        for user in users:
            if user.args[1] in w_indices:
                user.replace_input_with(node, w_node)
    joint.graph.lint()
    joint.recompile()


def _output_mask_index(node: fx.Node) -> int | None:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    if "output_mask" not in names or len(node.args) <= names.index("output_mask"):
        return None
    return names.index("output_mask")


def _with_mask(node: fx.Node, mask_index: int, keep: set[int]) -> tuple[object, ...]:
    mask = [bool(m) and i in keep for i, m in enumerate(node.args[mask_index])]
    return node.args[:mask_index] + (mask,) + node.args[mask_index + 1:]


def _partition_joint(joint: fx.GraphModule, sig: _Signature) -> SplitBackward:
    placeholders, flat = _joint_boundary(joint, sig)
    num_weights = len(sig.weight_names)
    weights = placeholders[:num_weights]
    inputs = placeholders[num_weights:num_weights + sig.num_inputs]
    tangents = placeholders[num_weights + sig.num_inputs:]
    outputs = flat[:sig.num_outputs]
    input_grads = flat[sig.num_outputs:sig.num_outputs + len(sig.grad_input_positions)]
    param_grads = flat[sig.num_outputs + len(sig.grad_input_positions):]

    forward = _forward_nodes(joint, sig, placeholders, flat)
    boundary = forward | set(placeholders)
    b_nodes = _with_getitems(_ancestors(input_grads, stop=boundary))
    w_nodes = _ancestors(param_grads, stop=boundary | b_nodes)
    moved = _cheap_reductions_for_b(joint, w_nodes, available=boundary | b_nodes, weights=set(weights),
                                    keep={g for g in param_grads if g is not None})
    b_nodes, w_nodes = b_nodes | moved, w_nodes - moved
    for node in b_nodes | w_nodes:
        if node.op == "call_function" and _is_mutating(node):
            raise SplitBackwardError(f"the backward mutates a tensor in place ({node.target})")

    def read_by(nodes: set[fx.Node], roots: Sequence[fx.Node | None]) -> list[fx.Node]:
        """Values outside `nodes` that `nodes` (or the `roots` directly) read, in graph order."""
        reads = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
        reads |= {r for r in roots if isinstance(r, fx.Node) and r not in nodes}
        return [n for n in joint.graph.nodes if n in reads and n not in weights]

    w_reads = read_by(w_nodes, param_grads)
    b_reads = read_by(b_nodes, input_grads)
    saved = [n for n in joint.graph.nodes
             if (n in forward or n in inputs) and (n in w_reads or n in b_reads)]
    held = w_reads
    unexpected = [n for n in saved + held if not (n in forward or n in inputs or n in tangents or n in b_nodes)]
    assert not unexpected, f"values neither saved, received nor computed in B: {unexpected}"

    return SplitBackward(
        weight_names=sig.weight_names,
        grad_param_names=sig.grad_param_names,
        grad_input_positions=sig.grad_input_positions,
        tangent_positions=sig.tangent_positions,
        num_saved=len(saved),
        num_held=len(held),
        forward=_extract(joint, "Forward", weights + inputs, forward, outputs + saved),
        backward_input=_extract(joint, "BackwardInput", weights + saved + tangents, b_nodes, input_grads + held),
        backward_weight=_extract(joint, "BackwardWeight", weights + held, w_nodes, param_grads),
    )


# Ops whose work grows faster than the bytes they touch: they are what W is for, so never moved to B.
_HEAVY_OPS = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_scaled_dot_product")


def _is_heavy(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "").split(".")[0]
    return any(name == op or name.startswith(op + "_") for op in _HEAVY_OPS)


def _value_bytes(node: fx.Node) -> int:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(v.numel() * v.element_size() for v in value if isinstance(v, torch.Tensor))
    return 0


def _cheap_reductions_for_b(joint: fx.GraphModule, w_nodes: set[fx.Node], *, available: set[fx.Node],
                            weights: set[fx.Node], keep: set[fx.Node]) -> set[fx.Node]:
    """W ops to run in B instead, because running them early frees more than they keep: a light op
    (no matmul or convolution) all of whose inputs B has, whose inputs W would otherwise hold only
    for it, and whose results are smaller than those inputs. Typically the weight part of a
    LayerNorm / GroupNorm backward: it reduces two activation-sized tensors to two vectors.

    Each op still runs exactly once (B then W stays bitwise the fused backward); only where it
    runs changes. Without this, a transformer's W would hold more than autograd's saved tensors:
    the norm inputs and their output gradients on top of every linear layer's input and dY."""
    moved: set[fx.Node] = set()
    for node in joint.graph.nodes:
        if node not in w_nodes or node.target is operator.getitem or _is_heavy(node):
            continue
        if not all(a in available or a in moved for a in node.all_input_nodes):
            continue
        results = {node} | {u for u in node.users if u.target is operator.getitem}
        staying = w_nodes - moved - results
        freed = [a for a in node.all_input_nodes
                 if a not in weights and a not in keep and not any(u in staying for u in a.users)]
        tuple_valued = any(u.target is operator.getitem for u in node.users)
        kept = [r for r in results if r.users and (r is not node or not tuple_valued)]
        if sum(_value_bytes(a) for a in freed) > sum(_value_bytes(r) for r in kept):
            moved |= {r for r in results if r in w_nodes}
    return moved


def _extract(joint: fx.GraphModule, name: str, inputs: Sequence[fx.Node], members: set[fx.Node],
             outputs: Sequence[fx.Node | None]) -> fx.GraphModule:
    """A graph module with `inputs` as placeholders (in order), computing `members` in joint-graph
    order, returning `outputs`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        if node not in env:
            env[node] = graph.placeholder(f"{node.name}")
        else:  # the same value passed twice (a saved value that is also held): a second placeholder
            graph.placeholder(f"{node.name}_{i}")
    for node in joint.graph.nodes:
        if node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] if isinstance(o, fx.Node) else None for o in outputs))
    return fx.GraphModule(nn.Module(), graph, class_name=name)


def check_split_backward(stage: Stage, split: SplitBackward) -> None:
    """Raise SplitBackwardError unless F, B and W take and return what the calling convention
    says, and neither B nor W changes a tensor in place (W may run long after B)."""
    def arity(gm: fx.GraphModule) -> tuple[int, int]:
        placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        return placeholders, len(output.args[0])

    num_weights = len(split.weight_names)
    expected = {
        "forward": (arity(split.forward), (num_weights + len(stage.inputs), len(stage.outputs) + split.num_saved)),
        "backward_input": (arity(split.backward_input),
                           (num_weights + split.num_saved + len(split.tangent_positions),
                            len(split.grad_input_positions) + split.num_held)),
        "backward_weight": (arity(split.backward_weight), (num_weights + split.num_held, len(split.grad_param_names))),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise SplitBackwardError(f"stage {stage.index}: {name} takes/returns {got}, expected {want}")
    for name, gm in (("backward_input", split.backward_input), ("backward_weight", split.backward_weight)):
        mutating = [n for n in gm.graph.nodes if n.op == "call_function" and _is_mutating(n)]
        if mutating:
            raise SplitBackwardError(f"stage {stage.index}: {name} mutates in place at {mutating[0].name}")


def run_split_step(split: SplitBackward, weights: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                   output_grads: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
                   ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """F, B, W in a row without autograd: (outputs, activation input grads, parameter grads).
    `output_grads` maps the outputs to the gradients of those in `split.tangent_positions`."""
    with torch.no_grad():
        forward = split.forward(*weights, *inputs)
        num_outputs = len(forward) - split.num_saved
        outputs, saved = tuple(forward[:num_outputs]), forward[num_outputs:]
        backward = split.backward_input(*weights, *saved, *output_grads(outputs))
        num_grads = len(split.grad_input_positions)
        param_grads = split.backward_weight(*weights, *backward[num_grads:])
    return outputs, list(backward[:num_grads]), list(param_grads)


def distinct_storage_bytes(tensors: Iterable[torch.Tensor], *, excluding: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that `tensors` keep alive: each storage once, at the largest extent any of them views,
    not counting the storages of `excluding` (the weights, alive anyway). The convention of
    annotate_costs' saved-activation bytes, so a graph's held values and autograd's saved
    tensors are measured alike."""
    skip = {t.untyped_storage().data_ptr() for t in excluding}
    extent: dict[int, int] = {}
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key not in skip and tensor.numel():
            extent[key] = max(extent.get(key, 0), tensor.numel() * tensor.element_size())
    return sum(extent.values())
