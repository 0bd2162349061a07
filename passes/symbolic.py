"""Symbolic sizes: every node's FLOPs and bytes, and every stage's times and memory, as sympy
formulas in the micro-batch size `b`.

The captured graph is run once more on fake tensors whose batch dimension is a symbol
(torch's ShapeEnv, the machinery of dynamic shapes in torch.compile), and each node is then
measured by the very code annotate_costs uses (FlopCounterMode, saved-tensor hooks, bytes of
inputs and outputs). Since flop formulas and tensor sizes are products of dimensions, what
comes out is polynomials in `b`: a matmul's FLOPs become `2*b*T*d*d`, an activation's bytes
`4*b*T*d`. The roofline turns them into times `max(flops/peak, bytes/bw) + overhead`.

One compile thus answers "what if the micro-batch were 2x larger" without tracing again:
`SymbolicCosts.at(b)` is the CostTable a fresh compile at micro-batch size `b` would compute
(exactly: the same code evaluates the same integers), and `stage_formulas` gives every
stage's F/B/W time, traffic and memory for a fixed partition.

A model can pin the batch size (a reshape to a constant batch, a loop over it): torch then
specialises the symbol to the traced value, and the formulas are only valid at that size.
`SymbolicCosts.specialized` says so, and `at` refuses other sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from pipecc.costs import CostTable, DeviceSpec
from pipecc.errors import ConfigError
from pipecc.ir import Captured, InputKind, Stage, StageCost
from pipecc.passes.annotate_costs import (NodeWork, _value_bytes, _Work, measure_in_mode, node_cost, node_signature,
                                          node_work, stage_backward_ms)
from pipecc.passes.graph_facts import compute_nodes, grad_nodes, node_tensors

MICROBATCH = sympy.Symbol("b", integer=True, positive=True)
SEQUENCE = sympy.Symbol("T", integer=True, positive=True)  # with sequence_dim: the sequence length
_INT_FIELDS = tuple(f.name for f in fields(NodeWork) if f.type == "int")


@dataclass(frozen=True)
class WorkFormula:
    """NodeWork with every count a sympy polynomial in the micro-batch size."""

    flops_forward: sympy.Expr
    flops_backward_input: sympy.Expr
    flops_backward_weight: sympy.Expr
    bytes_forward: sympy.Expr
    bytes_backward_input: sympy.Expr
    bytes_backward_weight: sympy.Expr
    output_bytes: sympy.Expr
    saved_bytes: sympy.Expr
    has_input_grad: bool
    trainable: bool
    is_conv: bool = False

    def at(self, sizes: Mapping[sympy.Symbol, int]) -> NodeWork:
        counts = {name: int(getattr(self, name).subs(sizes)) for name in _INT_FIELDS}
        return NodeWork(**counts, has_input_grad=self.has_input_grad, trainable=self.trainable, is_conv=self.is_conv)


@dataclass(frozen=True)
class SymbolicCosts:
    """Per node (by name) the work formulas; `at(b)` is the CostTable at micro-batch size b."""

    device: DeviceSpec
    nodes: Mapping[str, WorkFormula]
    param_names: Mapping[str, tuple[str, ...]]  # node -> canonical names of the parameters it reads
    param_bytes: Mapping[str, int]
    traced_microbatch_size: int
    specialized: str | None  # why the formulas hold only at the traced sizes, or None
    traced_sequence_length: int | None = None  # set when the sequence length is symbolic (T) too

    def at(self, microbatch_size: int, sequence_length: int | None = None) -> CostTable:
        """The CostTable a fresh compile at micro-batch size `microbatch_size` would compute.

        >>> import torch.nn.functional as F
        >>> from pipecc.passes.capture import capture
        >>> model = torch.nn.Linear(8, 4)
        >>> captured = capture(model, (torch.randn(2, 8),), F.mse_loss, torch.randn(2, 4), num_microbatches=1)
        >>> costs = symbolic_costs(captured, DeviceSpec.preset("cpu"))
        >>> costs.nodes["linear"].flops_forward, costs.at(16)["linear"].flops_forward
        (64*b, 1024)
        """
        sizes = check_sizes(self, microbatch_size, sequence_length)
        nodes = {name: node_cost(formula.at(sizes), self.param_names[name], self.device)
                 for name, formula in self.nodes.items()}
        return CostTable(device=self.device, nodes=nodes, param_bytes=dict(self.param_bytes))

    def time_formulas(self, name: str) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
        """Node `name`'s F, B and W times in ms as formulas in b (the roofline of `device`)."""
        w = self.nodes[name]
        return (roofline_ms(self.device, w.flops_forward, w.bytes_forward, w.is_conv),
                roofline_ms(self.device, w.flops_backward_input, w.bytes_backward_input, w.is_conv)
                if w.has_input_grad else sympy.Integer(0),
                roofline_ms(self.device, w.flops_backward_weight, w.bytes_backward_weight, w.is_conv)
                if w.trainable else sympy.Integer(0))


def check_sizes(traced: SymbolicCosts | StageFormulas, microbatch_size: int,
                sequence_length: int | None) -> dict[sympy.Symbol, int]:
    """The substitution {b: microbatch_size, T: sequence_length}; ConfigError unless the formulas hold there."""
    for name, value in (("microbatch_size", microbatch_size), ("sequence_length", sequence_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}={value!r}; it must be a positive integer.")
    if sequence_length is not None and traced.traced_sequence_length is None:
        raise ConfigError("sequence_length given, but the formulas keep the sequence length fixed.\n"
                          "Compile with symbolic_sequence_dim set to the inputs' sequence dimension.")
    sequence_length = sequence_length if sequence_length is not None else traced.traced_sequence_length
    if traced.specialized and (microbatch_size, sequence_length) != (traced.traced_microbatch_size,
                                                                      traced.traced_sequence_length):
        raise ConfigError(
            f"the cost formulas hold only at micro-batch size {traced.traced_microbatch_size}, not {microbatch_size}"
            f"{'' if sequence_length is None else f' (sequence length {traced.traced_sequence_length}, not {sequence_length})'}: "
            f"{traced.specialized}.\nCompile again at the new size, or make the model's shapes follow the input's "
            "batch dimension.")
    sizes = {MICROBATCH: microbatch_size}
    if sequence_length is not None:
        sizes[SEQUENCE] = sequence_length
    return sizes


def roofline_ms(device: DeviceSpec, flops: sympy.Expr, bytes_moved: sympy.Expr, conv: bool = False) -> sympy.Expr:
    """DeviceSpec.compute_ms as a formula: max(compute, memory) time plus the per-op overhead."""
    if flops == 0 and bytes_moved == 0:
        return sympy.Integer(0)
    seconds = sympy.Max(flops / sympy.Float(device.flops_per_s(conv)), bytes_moved / sympy.Float(device.bytes_per_s(conv)))
    return seconds * 1000 + sympy.Float(device.op_overhead_ms)


def symbolic_costs(captured: Captured, device: DeviceSpec, *, sequence_dim: int | None = None) -> SymbolicCosts:
    """Work formulas in the micro-batch size b for every compute node of `captured`; with
    `sequence_dim`, in the sequence length T too (dim `sequence_dim` of every model input and
    target that has it, e.g. 1 for (batch, tokens) inputs)."""
    gm = captured.graph_module
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [_symbolic_sizes(mode, n.meta["val"], sequence_dim) for n in placeholders]
    symbols = {MICROBATCH: _dim_symbols(inputs, 0)}
    traced_sequence_length = None
    if sequence_dim is not None:
        symbols[SEQUENCE] = _dim_symbols(inputs, sequence_dim)
        lengths = {int(n.meta["val"].shape[sequence_dim]) for n in placeholders if n.meta["val"].dim() > sequence_dim}
        if len(lengths) != 1:
            raise ConfigError(f"sequence_dim={sequence_dim}: the inputs' sizes there are {sorted(lengths) or 'missing'}; "
                              "a sequence dimension has one size in every input that has it.\n"
                              "Pass the dimension that holds the sequence (1 for (batch, tokens) inputs).")
        traced_sequence_length = lengths.pop()
    values = _SymbolicValues(gm, mode).values_of(inputs)
    needs_grad = grad_nodes(gm)
    nodes: dict[str, WorkFormula] = {}
    param_names: dict[str, tuple[str, ...]] = {}
    param_bytes: dict[str, int] = {}
    measured: dict[tuple[object, ...], _Work] = {}  # repeated blocks: one measurement per symbolic signature

    def value_of(n: fx.Node) -> object:
        return values.get(n.name)

    for node in compute_nodes(gm):
        tensors = dict(node_tensors(gm, node))
        param_names[node.name] = tuple(dict.fromkeys(captured.canonical_names.get(q, q) for q in tensors))
        for qualified, tensor in tensors.items():
            param_bytes[captured.canonical_names.get(qualified, qualified)] = tensor.numel() * tensor.element_size()
        key = node_signature(gm, node, needs_grad, value_of)
        with mode:
            if key not in measured:
                try:
                    measured[key] = measure_in_mode(gm, node, needs_grad, value_of)
                except Exception:  # as in annotate_costs: an op with no fake kernel is charged its bytes
                    measured[key] = _Work(0, 0, 0, _value_bytes(value_of(node)), False, node.name in needs_grad)
            counts = node_work(node, tensors, measured[key], value_of)
        nodes[node.name] = _formula(counts, shape_env, symbols)
    return SymbolicCosts(device=device, nodes=nodes, param_names=param_names, param_bytes=param_bytes,
                         traced_microbatch_size=captured.microbatch_size,
                         specialized=_specialization(shape_env, symbols),
                         traced_sequence_length=traced_sequence_length)


def _symbolic_sizes(mode: FakeTensorMode, value: object, sequence_dim: int | None) -> torch.Tensor:
    """A fake tensor like `value` whose dim 0 (the batch), and `sequence_dim` if it has one, are fresh symbols."""
    assert isinstance(value, torch.Tensor), "capture gives every placeholder a tensor value"
    real = torch.empty(value.shape, dtype=value.dtype)
    dims = [DimDynamic.DYNAMIC if d == 0 or d == sequence_dim else DimDynamic.STATIC for d in range(real.dim())]
    return mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def _dim_symbols(inputs: Sequence[torch.Tensor], dim: int) -> list[sympy.Expr]:
    return [t.shape[dim].node.expr for t in inputs if t.dim() > dim and isinstance(t.shape[dim], torch.SymInt)]


class _SymbolicValues(fx.Interpreter):
    """Runs the graph on symbolic fake tensors and keeps every node's value (meta stays untouched)."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode

    def values_of(self, inputs: Sequence[torch.Tensor]) -> dict[str, object]:
        with self.mode, torch.no_grad():
            self.run(*inputs)
        return {node.name: value for node, value in self.env.items()}


def _formula(counts: NodeWork, shape_env: ShapeEnv, symbols: Mapping[sympy.Symbol, Sequence[sympy.Expr]]) -> WorkFormula:
    """NodeWork's SymInts as sympy polynomials in b (and T): every input's batch symbol becomes b."""
    rename = {s: name for name, created in symbols.items() for s in created}

    def expr(value: object) -> sympy.Expr:
        if isinstance(value, torch.SymInt):
            return sympy.expand(shape_env.simplify(value.node.expr).xreplace(rename))
        return sympy.Integer(int(value))

    counts_b = {name: expr(getattr(counts, name)) for name in _INT_FIELDS}
    return WorkFormula(**counts_b, has_input_grad=bool(counts.has_input_grad), trainable=bool(counts.trainable),
                       is_conv=counts.is_conv)


def _specialization(shape_env: ShapeEnv, symbols: Mapping[sympy.Symbol, Sequence[sympy.Expr]]) -> str | None:
    """Why a size got pinned to its traced value, or None when every size stayed symbolic."""
    for name, created in symbols.items():
        for symbol in created:
            value = shape_env.simplify(symbol)
            if value.is_number:
                where = next((f" by the guard {g.expr} at {g.sloc}" for g in shape_env.guards
                              if symbol in g.expr.free_symbols and isinstance(g.expr, sympy.Eq)), "")
                what = "batch dimension" if name == MICROBATCH else "sequence dimension"
                return f"torch specialised the {what} to {value}{where}"
    return None


@dataclass(frozen=True)
class StageFormulas:
    """One stage's per-micro-batch cost as formulas in the micro-batch size b."""

    forward_ms: sympy.Expr
    backward_input_ms: sympy.Expr
    backward_weight_ms: sympy.Expr
    send_forward_ms: sympy.Expr
    send_backward_ms: sympy.Expr
    comm_ms: sympy.Expr
    bytes_to_next: sympy.Expr
    saved_bytes: sympy.Expr
    memory_bytes: sympy.Expr
    flops: sympy.Expr
    traced_microbatch_size: int
    specialized: str | None  # see SymbolicCosts.specialized
    traced_sequence_length: int | None

    def at(self, microbatch_size: int, like: StageCost, sequence_length: int | None = None) -> StageCost:
        """The StageCost at `microbatch_size` (and `sequence_length`); counts that do not depend
        on them are taken from `like`."""
        sizes = check_sizes(self, microbatch_size, sequence_length)

        def num(e: sympy.Expr) -> float:
            return float(e.subs(sizes))

        def count(e: sympy.Expr) -> int:
            return int(e.subs(sizes))

        return StageCost(
            num_nodes=like.num_nodes, num_params=like.num_params, flops=count(self.flops),
            param_bytes=like.param_bytes, forward_ms=num(self.forward_ms),
            backward_input_ms=num(self.backward_input_ms), backward_weight_ms=num(self.backward_weight_ms),
            send_forward_ms=num(self.send_forward_ms), send_backward_ms=num(self.send_backward_ms),
            bytes_to_next=count(self.bytes_to_next), saved_bytes=count(self.saved_bytes),
            memory_bytes=count(self.memory_bytes), comm_ms=num(self.comm_ms),
            action_overhead_ms=like.action_overhead_ms, message_overhead_ms=like.message_overhead_ms,
            receive_overhead_ms=like.receive_overhead_ms, message_ms_per_mb=like.message_ms_per_mb,
            step_overhead_ms=like.step_overhead_ms, sync_ms=like.sync_ms)


def stage_formulas(costs: SymbolicCosts, stages: Sequence[Stage], in_flight: Sequence[int]) -> tuple[StageFormulas, ...]:
    """Every stage's F/B/W time, traffic and memory as formulas in b, for the partition `stages`.

    The same sums split_stages makes at the traced size: compute of the stage's nodes; traffic of
    the activations it receives and sends (and their gradients); weights and grads plus
    `in_flight[s]` micro-batches of saved and received activations."""
    device = costs.device
    out = {name: f.output_bytes for name, f in costs.nodes.items()}
    result = []
    for stage in stages:
        times = [costs.time_formulas(n) for n in stage.node_names if n in costs.nodes]
        received = [(out[i.name], i.spec.requires_grad) for i in stage.activation_inputs]
        is_last = stage.index == len(stages) - 1
        sent = [] if is_last else [(out[o.name], o.spec.requires_grad) for o in stage.outputs]
        activation_in = sum((b for b, _ in received), sympy.Integer(0))
        saved = sum((costs.nodes[n].saved_bytes for n in stage.node_names if n in costs.nodes), sympy.Integer(0))
        backward_input_ms, backward_weight_ms = stage_backward_ms(sum((t[1] for t in times), sympy.Integer(0)),
                                                                  sum((t[2] for t in times), sympy.Integer(0)),
                                                                  first_stage=stage.index == 0)
        result.append(StageFormulas(
            forward_ms=sum((t[0] for t in times), sympy.Integer(0)),
            backward_input_ms=backward_input_ms,
            backward_weight_ms=backward_weight_ms,
            send_forward_ms=_transfer_ms(device, [b for b, _ in sent]),
            send_backward_ms=_transfer_ms(device, [b for b, g in received if g]),
            comm_ms=_boundary_ms(device, received) + _boundary_ms(device, sent),
            bytes_to_next=sum((b for b, _ in sent), sympy.Integer(0)),
            saved_bytes=saved + activation_in,
            memory_bytes=2 * stage.cost.param_bytes + in_flight[stage.index] * (saved + activation_in),
            flops=sum((costs.nodes[n].flops_forward for n in stage.node_names if n in costs.nodes), sympy.Integer(0)),
            traced_microbatch_size=costs.traced_microbatch_size,
            specialized=costs.specialized,
            traced_sequence_length=costs.traced_sequence_length,
        ))
    return tuple(result)


def _transfer_ms(device: DeviceSpec, sizes: Sequence[sympy.Expr]) -> sympy.Expr:
    """DeviceSpec.transfer_ms as a formula: one message per non-empty tensor."""
    messages = [s for s in sizes if s != 0]
    if not messages:
        return sympy.Integer(0)
    return len(messages) * sympy.Float(device.link_latency_ms) + sum(messages) / sympy.Float(device.link_bandwidth_bytes_per_s) * 1000


def _boundary_ms(device: DeviceSpec, crossing: Sequence[tuple[sympy.Expr, bool]]) -> sympy.Expr:
    """Activations one way and their gradients back, over one stage boundary."""
    return _transfer_ms(device, [b for b, _ in crossing]) + _transfer_ms(device, [b for b, g in crossing if g])


def format_formulas(formulas: Sequence[StageFormulas], digits: int = 4) -> str:
    """One block per stage: time, traffic and memory formulas in b, numbers rounded to `digits`."""
    sequence = formulas[0].traced_sequence_length is not None if formulas else False
    lines = [f"cost formulas per micro-batch of size b{' and sequence length T' if sequence else ''} (ms, bytes):"]
    for s, f in enumerate(formulas):
        def show(e: sympy.Expr) -> str:
            return str(sympy.simplify(e).evalf(digits) if e.free_symbols else e.evalf(digits)).replace("1.0*", "")
        lines.append(f"stage {s}:")
        lines.append(f"  F ms      = {show(f.forward_ms)}")
        lines.append(f"  B ms      = {show(f.backward_input_ms)}")
        lines.append(f"  W ms      = {show(f.backward_weight_ms)}")
        lines.append(f"  comm ms   = {show(f.comm_ms)}")
        lines.append(f"  FLOPs     = {f.flops}")
        lines.append(f"  memory B  = {f.memory_bytes}")
    return "\n".join(lines)
