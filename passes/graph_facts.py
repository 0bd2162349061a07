"""Facts about a captured graph that several passes read: which nodes compute, which values
need gradients, which values can cross a stage boundary, which parameters a node reads."""

from __future__ import annotations

import enum
from typing import Iterator

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


class ValueKind(enum.Enum):
    TENSOR = "tensor"  # sent between stages
    CONSTANT = "constant"  # static at micro-batch shape (sizes, flags): inlined into the consumer
    OPAQUE = "opaque"  # a tuple of tensors, an object: a stage boundary may not cut through it


def value_kind(node: fx.Node) -> ValueKind:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return ValueKind.TENSOR
    if "val" in node.meta and all(isinstance(leaf, CONSTANT_TYPES) for leaf in tree_leaves(value)):
        return ValueKind.CONSTANT
    return ValueKind.OPAQUE


def is_compute(node: fx.Node) -> bool:
    """Nodes the partitioner places; placeholders and attributes are available on every stage."""
    return node.op in ("call_function", "call_method", "call_module")


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_compute(n)]


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def node_tensors(gm: fx.GraphModule, node: fx.Node) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and buffers a node reads directly, by qualified name in gm."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        prefix = f"{node.target}."
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            yield prefix + name, tensor
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            tensor = _get_attr(gm, str(arg.target))
            if isinstance(tensor, torch.Tensor):
                yield str(arg.target), tensor


def _get_attr(gm: fx.GraphModule, target: str) -> object:
    owner_name, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner_name), attr)


def grad_nodes(gm: fx.GraphModule) -> set[str]:
    """Names of nodes whose (floating-point) value depends on a trainable parameter."""
    trainable_modules = _modules_with_trainable_tensors(gm)
    needs_grad: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor) and value.requires_grad:
                needs_grad.add(node.name)
        elif is_compute(node):
            from_params = node.op == "call_module" and str(node.target) in trainable_modules
            from_inputs = any(a.name in needs_grad for a in node.all_input_nodes)
            if (from_params or from_inputs) and _has_float_tensor(node):
                needs_grad.add(node.name)
    return needs_grad


def _modules_with_trainable_tensors(gm: fx.GraphModule) -> set[str]:
    """Qualified names of the modules that hold (directly or below) a tensor that requires grad:
    one walk over the parameters, not one per call_module node (0.3 s per 10k nodes)."""
    owners: set[str] = set()
    for qualified, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if tensor.requires_grad:
            parts = qualified.split(".")
            owners.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return owners


def _has_float_tensor(node: fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dtype.is_floating_point
    return any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in tree_leaves(value))


def tensor_bytes(node: fx.Node) -> int:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0
