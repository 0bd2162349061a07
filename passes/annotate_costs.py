"""Annotate costs: per node FLOPs (F, B, W), bytes, saved activations, and roofline times.

Each compute node runs alone on fake tensors under FlopCounterMode (so matmul, conv and
attention are counted exactly, for the forward and for both halves of the backward) with a
saved-tensors hook (so saved-activation bytes are what autograd really keeps). Element-wise
and normalisation ops, which FlopCounter counts as zero, are charged by bytes moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pipecc.costs import CostTable, DeviceSpec, NodeCost
from pipecc.ir import Captured
from pipecc.passes.graph_facts import compute_nodes, grad_nodes, node_tensors, tensor_bytes

log = logging.getLogger(__name__)
TimeT = TypeVar("TimeT")  # a time in ms: a float, or a sympy formula in the micro-batch size


@dataclass(frozen=True)
class _Work:
    flops_forward: int
    flops_backward_input: int
    flops_backward_weight: int
    saved_bytes: int
    is_view: bool
    has_input_grad: bool  # some input needs a gradient, so B does work here
    is_conv: bool = False  # its forward runs a convolution (timed at DeviceSpec.conv_flops)


def annotate_costs(captured: Captured, device: DeviceSpec) -> CostTable:
    """A CostTable with a NodeCost for every compute node of the captured graph. Deterministic."""
    works, param_names, param_bytes = annotate_work(captured)
    nodes = {name: node_cost(work, param_names[name], device) for name, work in works.items()}
    return CostTable(device=device, nodes=nodes, param_bytes=param_bytes)


def annotate_work(captured: Captured) -> tuple[dict[str, NodeWork], dict[str, tuple[str, ...]], dict[str, int]]:
    """Per compute node its NodeWork and the canonical names of the parameters it reads; and the
    bytes of every parameter. What annotate_costs times on a device, and calibrate fits one to."""
    gm = captured.graph_module
    needs_grad = grad_nodes(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    works: dict[str, NodeWork] = {}
    param_names: dict[str, tuple[str, ...]] = {}
    param_bytes: dict[str, int] = {}
    for node in compute_nodes(gm):
        tensors = dict(node_tensors(gm, node))
        param_names[node.name] = tuple(dict.fromkeys(captured.canonical_names.get(q, q) for q in tensors))
        for qualified, tensor in tensors.items():
            param_bytes[captured.canonical_names.get(qualified, qualified)] = tensor.numel() * tensor.element_size()
        works[node.name] = node_work(node, tensors, _measure(gm, node, needs_grad, mode))
    return works, param_names, param_bytes


ValueOf = Callable[[fx.Node], object]  # a node's value: its meta["val"], or a symbolic-size one


def meta_value(node: fx.Node) -> object:
    return node.meta.get("val")


@dataclass(frozen=True)
class NodeWork:
    """What one node does before a device turns it into time: FLOPs and bytes of F, B and W.

    Plain ints here; SymInts when pipecc.passes.symbolic runs the same code on symbolic sizes."""

    flops_forward: int
    flops_backward_input: int
    flops_backward_weight: int
    bytes_forward: int
    bytes_backward_input: int
    bytes_backward_weight: int
    output_bytes: int
    saved_bytes: int
    has_input_grad: bool
    trainable: bool
    is_conv: bool = False


def node_work(node: fx.Node, tensors: dict[str, torch.Tensor], work: _Work, value_of: ValueOf = meta_value) -> NodeWork:
    """The FLOPs and bytes of `node`'s F, B and W, given what _measure found."""
    output_bytes = _value_bytes(value_of(node))
    input_bytes = sum(_value_bytes(value_of(a)) for a in node.all_input_nodes
                      if a.op != "get_attr" and isinstance(value_of(a), torch.Tensor))
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = any(t.requires_grad for t in tensors.values())
    bytes_forward = 0 if work.is_view else input_bytes + output_bytes + weight_bytes
    # Backward-input reads the output grad and what was saved, and writes the input grads:
    # about the forward's traffic. Backward-weight reads the output grad and writes weight grads.
    return NodeWork(
        flops_forward=work.flops_forward,
        flops_backward_input=work.flops_backward_input,
        flops_backward_weight=work.flops_backward_weight,
        bytes_forward=bytes_forward,
        bytes_backward_input=bytes_forward if work.has_input_grad else 0,
        bytes_backward_weight=output_bytes + 2 * weight_bytes if trainable else 0,
        output_bytes=output_bytes,
        saved_bytes=work.saved_bytes,
        has_input_grad=work.has_input_grad,
        trainable=trainable,
        is_conv=work.is_conv,
    )


def _value_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):  # nearly every value: no pytree walk
        return value.numel() * value.element_size()
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def stage_backward_ms(backward_input_ms: TimeT, backward_weight_ms: TimeT, first_stage: bool) -> tuple[TimeT, TimeT]:
    """A stage's (B, W) times from the sums over its nodes. The first stage has no activation input
    to differentiate, so the runtime's B does nothing there and its W runs the whole backward
    (measured on the MLP example's stage 0 under ZB-H1: B 0.02 ms, W 0.20 ms). Times are floats or
    sympy formulas.

    >>> stage_backward_ms(1.5, 2.0, first_stage=False), stage_backward_ms(1.5, 2.0, first_stage=True)
    ((1.5, 2.0), (0.0, 3.5))
    """
    if first_stage:
        return backward_input_ms * 0, backward_input_ms + backward_weight_ms
    return backward_input_ms, backward_weight_ms


def node_cost(work: NodeWork, param_names: tuple[str, ...], device: DeviceSpec) -> NodeCost:
    """The NodeCost of a node that does `work`, timed by the roofline of `device`."""
    return NodeCost(
        flops_forward=work.flops_forward,
        flops_backward_input=work.flops_backward_input,
        flops_backward_weight=work.flops_backward_weight,
        bytes_forward=work.bytes_forward,
        output_bytes=work.output_bytes,
        saved_bytes=work.saved_bytes,
        param_names=param_names,
        forward_ms=device.compute_ms(work.flops_forward, work.bytes_forward, work.is_conv),
        backward_input_ms=(device.compute_ms(work.flops_backward_input, work.bytes_backward_input, work.is_conv)
                           if work.has_input_grad else 0.0),
        backward_weight_ms=(device.compute_ms(work.flops_backward_weight, work.bytes_backward_weight, work.is_conv)
                            if work.trainable else 0.0),
    )


def _cpu_attention_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: object,
                         out_val: object = None, **kwargs: object) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out: Sequence[int], query: Sequence[int], key: Sequence[int],
                                  value: Sequence[int], *args: object, out_val: object = None, **kwargs: object) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU attention kernels but not the CPU one that scaled_dot_product_attention
# dispatches to on CPU, so attention counted 0 FLOPs there (found by the sequence-length formulas: no T^2 term).
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


# Repeated blocks (and recompiles of the same model) give nodes with identical signatures;
# measuring each signature once makes annotation about 4x faster on a 4-block GPT.
_MEASURED: dict[tuple[object, ...], _Work] = {}


def _measure(gm: fx.GraphModule, node: fx.Node, needs_grad: set[str], mode: FakeTensorMode) -> _Work:
    """Run one node forward and backward on fake tensors, counting FLOPs and saved bytes."""
    key = node_signature(gm, node, needs_grad)
    if key in _MEASURED:
        return _MEASURED[key]
    try:
        with mode:
            work = measure_in_mode(gm, node, needs_grad)
    except Exception as err:  # an op without a fake kernel or a backward: fall back to bytes only
        log.debug("cost of %s estimated from bytes only: %s", node.name, err)
        work = _Work(0, 0, 0, tensor_bytes(node), False, node.name in needs_grad)
    _MEASURED[key] = work
    return work


def node_signature(gm: fx.GraphModule, node: fx.Node, needs_grad: set[str],
                   value_of: ValueOf = meta_value) -> tuple[object, ...]:
    """Everything a node's cost depends on: the op, its settings, and the shapes and grad flags it sees.

    Nodes of repeated blocks share a signature, so each signature is measured (or profiled) once."""
    def describe(value: object, requires_grad: bool) -> object:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, requires_grad)
        return repr(value)

    def arg_key(arg: fx.Node) -> object:
        if arg.op == "get_attr":
            real = _attr(gm, str(arg.target))
            return describe(real, isinstance(real, torch.Tensor) and real.requires_grad)
        value = value_of(arg)
        if isinstance(value, torch.Tensor):  # nearly every argument: no pytree walk
            return (describe(value, arg.name in needs_grad),)
        return tuple(describe(v, arg.name in needs_grad) for v in tree_leaves(value))

    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        # repr(module) leaves out some settings that change the work (MultiheadAttention hides
        # num_heads, which sizes the saved attention weights), so every public attribute is keyed too.
        settings = tuple(sorted((k, describe(v, False)) for k, v in vars(module).items() if not k.startswith("_")))
        target: object = (type(module).__module__, type(module).__qualname__, repr(module), settings,
                          tuple(describe(t, t.requires_grad) for t in list(module.parameters()) + list(module.buffers())))
    else:
        target = (getattr(node.target, "__module__", None), getattr(node.target, "__qualname__", str(node.target)))
    args = fx.node.map_arg((node.args, node.kwargs), arg_key)
    return (node.op, target, repr(args))


def _fresh(value: object, requires_grad: bool) -> object:
    if isinstance(value, torch.Tensor):
        fresh = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return fresh.requires_grad_(requires_grad and fresh.dtype.is_floating_point)
    return value


def measure_in_mode(gm: fx.GraphModule, node: fx.Node, needs_grad: set[str], value_of: ValueOf = meta_value) -> _Work:
    """FLOPs of F, B and W and the saved bytes of `node`, run alone in the active fake mode."""
    activations: list[torch.Tensor] = []
    params: dict[str, torch.Tensor] = {}

    def load(arg: fx.Node) -> object:
        if arg.op == "get_attr":
            real = _attr(gm, str(arg.target))
            fake = _fresh(real, isinstance(real, torch.Tensor) and real.requires_grad)
            params[str(arg.target)] = fake
            return fake
        value = tree_map(lambda v: _fresh(v, arg.name in needs_grad), value_of(arg))
        activations.extend(v for v in tree_leaves(value) if isinstance(v, torch.Tensor) and v.requires_grad)
        return value

    args = fx.node.map_arg(node.args, load)
    kwargs = fx.node.map_arg(node.kwargs, load)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        module_tensors = {n: _fresh(t, t.requires_grad) for n, t in
                          list(module.named_parameters()) + list(module.named_buffers())}
        params.update(module_tensors)
        call = lambda: functional_call(module, module_tensors, tuple(args), dict(kwargs))  # noqa: E731
    elif node.op == "call_method":
        call = lambda: getattr(args[0], str(node.target))(*args[1:], **kwargs)  # noqa: E731
    else:
        call = lambda: node.target(*args, **kwargs)  # noqa: E731

    param_storages = {StorageWeakRef(t.untyped_storage()) for t in params.values() if isinstance(t, torch.Tensor)}
    input_storages = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    saved: dict[StorageWeakRef, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in param_storages:
            saved[ref] = torch.sym_max(saved.get(ref, 0), t.numel() * t.element_size())
        return t

    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    flops_forward = counter.get_total_flops()
    is_conv = any("convolution" in str(op) for op in counter.get_flop_counts().get("Global", {}))
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    is_view = bool(outputs) and all(StorageWeakRef(t.untyped_storage()) in input_storages for t in outputs)
    differentiable = [t for t in outputs if t.requires_grad]
    trainable = [t for t in params.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    flops_b = _backward_flops(differentiable, activations)
    flops_w = _backward_flops(differentiable, trainable)
    return _Work(flops_forward, flops_b, flops_w, sum(saved.values()), is_view,
                 bool(activations) and bool(differentiable), is_conv)


def _backward_flops(outputs: list[torch.Tensor], wrt: list[torch.Tensor]) -> int:
    if not outputs or not wrt:
        return 0
    grads = [torch.empty_like(o) for o in outputs]
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        torch.autograd.grad(outputs, wrt, grads, retain_graph=True, allow_unused=True)
    return counter.get_total_flops()


def _attr(gm: fx.GraphModule, target: str) -> object:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)
