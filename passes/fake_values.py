"""Fake-value memo: nodes of repeated blocks get their meta["val"] without running through FakeTensorMode.

A call whose output metadata is a pure function of what it reads (the op, the module's settings and
parameter metadata, the shape / stride / dtype / device / requires_grad of its tensor arguments, and
its constant arguments) is run once per signature; later calls with the same signature get a
stand-in of the recorded metadata (tens of microseconds instead of 0.3 to 1 ms of FakeTensorMode
dispatch per op; the synthetic graphs of benchmarks/compile_scaling.py are 99.9% repeats).

What is never shared, because one run would not tell the next: calls that write into their inputs
(in place, out=), calls whose output aliases an input (views, `contiguous` of a contiguous tensor),
a new leaf that requires grad, outputs other than one tensor or an immutable constant, user
functions and user modules (arbitrary Python), modules with hooks, and arguments pipecc cannot
describe exactly. Those run through FakeTensorMode every time.

A memoised tensor output is a stand-in: one leaf fake tensor per signature, which is also the
meta["val"] of every node with that signature (passes read a meta["val"]'s metadata only: shape,
stride, dtype, device, size in bytes; none writes into one or compares storages), with the
requires_grad of the real output kept beside it. A fake tensor per node would cost as much again
as the rest of memoised propagation. A call that must really run gets `materialised` inputs
instead: a fake tensor of the same metadata with a storage of its own (as distinct real outputs
have), a non-leaf when the real output required grad, so that in-place ops, views and overlap
checks behave as on the real outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Hashable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves, tree_map

# Modules whose functions are pure in the metadata of their arguments (user functions wrapped
# with torch.fx.wrap are not: they may read any state).
_PURE_FUNCTION_MODULES = ("torch", "_operator", "operator", "math", "builtins")
_WRITING_FUNCTIONS = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
_IMMUTABLE_CONSTANTS = (int, float, bool, str, type(None), torch.dtype, torch.device)
_SCALARS = frozenset((int, float, bool, str, type(None)))


class _NotMemoisable(Exception):
    """Raised inside signature building: this call must really run."""


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


@dataclass(frozen=True)
class _Recorded:
    """What a call gave at its first run: one tensor's metadata, or a constant and its meta["val"]."""

    tensor: _TensorMeta | None
    constant: object = None
    has_meta_val: bool = False
    meta_val: object = None


class _Computed(torch.autograd.Function):
    """A copy of a stand-in that is the output of an autograd op (not a leaf, requires grad), as the
    real output of the call it stands for was."""

    @staticmethod
    def forward(ctx: object, anchor: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fresh_like(stand_in)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[None, None]:  # type: ignore[override]
        return None, None


class FakeValueMemo:
    """Per propagation: signatures seen, their recorded outputs, and the stand-ins handed out."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        self._gm = gm
        self._mode = mode
        self._recorded: dict[Hashable, _Recorded | None] = {}  # None: runs every time
        self._module_keys: dict[str, Hashable | None] = {}
        self._stand_ins: dict[int, tuple[FakeTensor, bool]] = {}  # id -> (stand-in, real requires_grad)
        self._stand_in_of: dict[_TensorMeta, FakeTensor] = {}
        self._anchor: torch.Tensor | None = None
        self.num_memoised = 0

    def signature(self, node: fx.Node, args: tuple[object, ...], kwargs: dict[str, object]) -> Hashable | None:
        """The key of everything the call's output metadata depends on; None if it must always run."""
        try:
            return (self._target_key(node), self._describe(args), self._describe(kwargs))
        except _NotMemoisable:
            return None

    def lookup(self, key: Hashable | None) -> _Recorded | None:
        return None if key is None else self._recorded.get(key)

    def stand_in(self, node: fx.Node, recorded: _Recorded) -> object:
        """The output of a memoised call, with meta["val"] set as FakeTensorProp would."""
        self.num_memoised += 1
        if recorded.tensor is None:
            if recorded.has_meta_val:
                node.meta["val"] = recorded.meta_val
            return recorded.constant
        value = self._stand_in_of.get(recorded.tensor)
        if value is None:
            meta = recorded.tensor
            with unset_fake_temporarily():
                elem = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
            value = self._stand_in_of[meta] = FakeTensor(self._mode, elem, meta.device)
            self._stand_ins[id(value)] = (value, meta.requires_grad)
        node.meta["val"] = value
        return value

    def before_run(self, args: tuple[object, ...], kwargs: dict[str, object]) -> list[tuple[torch.Tensor, int]]:
        """The tensors a call reads and their version counters, to tell afterwards whether it wrote."""
        return [(t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    def record(self, key: Hashable | None, node: fx.Node, inputs: list[tuple[torch.Tensor, int]], result: object) -> None:
        """Remember what a call gave, if the next call of the same signature may share it."""
        if key is None or key in self._recorded:
            return
        self._recorded[key] = self._recordable(node, inputs, result)

    def materialise(self, value: object) -> object:
        """`value` with every stand-in replaced by a fresh fake tensor that behaves as the real output."""
        return tree_map(self._materialise_tensor, value)

    def has_stand_in(self, value: object) -> bool:
        return any(id(t) in self._stand_ins for t in tree_leaves(value) if isinstance(t, torch.Tensor))

    def _materialise_tensor(self, value: object) -> object:
        if not isinstance(value, torch.Tensor) or id(value) not in self._stand_ins:
            return value
        _, requires_grad = self._stand_ins[id(value)]
        if not requires_grad:
            return _fresh_like(value)
        if self._anchor is None:
            self._anchor = torch.empty(()).requires_grad_(True)
        return _Computed.apply(self._anchor, value)

    def _recordable(self, node: fx.Node, inputs: list[tuple[torch.Tensor, int]], result: object) -> _Recorded | None:
        if any(t._version != version for t, version in inputs):
            return None  # it wrote into an input
        if isinstance(result, torch.Tensor):
            if type(result) is not FakeTensor or result.fake_mode is not self._mode or result.storage_offset() \
                    or result.requires_grad and result.is_leaf:
                return None
            storage = StorageWeakRef(result.untyped_storage())
            if any(StorageWeakRef(t.untyped_storage()) == storage for t, _ in inputs):
                return None  # a view or the input itself
            return _Recorded(_TensorMeta(tuple(result.shape), tuple(result.stride()), result.dtype, result.device,
                                         result.requires_grad))
        if not _is_immutable_constant(result):
            return None
        has_meta_val = "val" in node.meta
        return _Recorded(None, result, has_meta_val, node.meta.get("val"))

    def _target_key(self, node: fx.Node) -> Hashable:
        if node.op == "call_module":
            return ("module", self._module_key(str(node.target)))
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_") or name in ("__setitem__", "__delitem__"):
                raise _NotMemoisable
            return ("method", name)
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if any(a.is_write for a in target._schema.arguments):
                raise _NotMemoisable
            return ("function", target)
        module = getattr(target, "__module__", None) or ""
        if not module.startswith(_PURE_FUNCTION_MODULES) or target in _WRITING_FUNCTIONS:
            raise _NotMemoisable
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            raise _NotMemoisable
        return ("function", target)

    def _module_key(self, target: str) -> Hashable:
        if target not in self._module_keys:
            try:
                self._module_keys[target] = self._describe_module(self._gm.get_submodule(target))
            except _NotMemoisable:
                self._module_keys[target] = None
        key = self._module_keys[target]
        if key is None:
            raise _NotMemoisable
        return key

    def _describe_module(self, module: nn.Module) -> Hashable:
        """Type, settings, parameter and buffer metadata and submodules of a torch.nn module."""
        if not type(module).__module__.startswith("torch.nn"):
            raise _NotMemoisable  # a user module: arbitrary Python
        settings = []
        for name, value in sorted(vars(module).items()):
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            if "hooks" in name:
                if value:
                    raise _NotMemoisable  # hooks may change the output
                continue
            if name == "inplace" and value:
                raise _NotMemoisable  # writes into its input
            settings.append((name, (type(value), value) if type(value) in _SCALARS else self._describe(value)))
        tensors = tuple((name, None if t is None else self._describe_tensor(t, t.requires_grad))
                        for name, t in [*module._parameters.items(), *module._buffers.items()])
        children = tuple((name, None if m is None else self._describe_module(m)) for name, m in module._modules.items())
        return (type(module), tuple(settings), tensors, children)

    def _describe(self, value: object) -> Hashable:
        kind = type(value)
        if kind in _SCALARS:  # the commonest arguments first: a fifth of the time of a memoised call
            return (kind, value)
        if kind is tuple:
            return (kind, tuple(self._describe(v) for v in value))  # type: ignore[attr-defined]
        if isinstance(value, torch.Tensor):
            return self._describe_tensor(value, self._real_requires_grad(value))
        if isinstance(value, (torch.Size, tuple, list)):
            return (type(value), tuple(self._describe(v) for v in value))
        if isinstance(value, (set, frozenset)):
            return (frozenset, frozenset(self._describe(v) for v in value))
        if isinstance(value, dict):
            return (dict, tuple((k, self._describe(v)) for k, v in value.items()))
        if isinstance(value, slice):
            return (slice, self._describe(value.start), self._describe(value.stop), self._describe(value.step))
        if value is Ellipsis:
            return (type(value),)
        if isinstance(value, (*_IMMUTABLE_CONSTANTS, torch.layout, torch.memory_format)):
            return (type(value), value)
        if callable(value) and getattr(value, "__module__", "") and value.__module__.startswith("torch") \
                and not isinstance(value, nn.Module):
            return ("callable", value)  # a torch function held by a module (F.relu in TransformerEncoderLayer)
        raise _NotMemoisable

    def _describe_tensor(self, value: torch.Tensor, requires_grad: bool) -> Hashable:
        if value.layout is not torch.strided or value.is_conj() or value.is_neg():
            raise _NotMemoisable
        return (torch.Tensor, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device,
                requires_grad)

    def _real_requires_grad(self, value: torch.Tensor) -> bool:
        stand_in = self._stand_ins.get(id(value))
        return value.requires_grad if stand_in is None else stand_in[1]


def _fresh_like(value: torch.Tensor) -> torch.Tensor:
    """A tensor of `value`'s metadata with storage of its own, as every output of a real call has."""
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def _is_immutable_constant(value: object) -> bool:
    if isinstance(value, tuple):  # torch.Size too
        return all(_is_immutable_constant(v) for v in value)
    return isinstance(value, _IMMUTABLE_CONSTANTS) and not isinstance(value, torch.Tensor)

