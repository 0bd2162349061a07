"""Split stages: one forward GraphModule per stage with a typed, static-shape boundary.

Stage s receives, from stage s-1 only, every tensor made before it that it or a later stage
reads (a skip connection is relayed stage to stage, so communication stays between
neighbours). Model inputs and the target are read locally: every rank is handed them.
Constants that cross a cut (sizes at micro-batch shape) are inlined, not sent.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import fx
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module

from pipecc.cluster import Cluster, LinkSpec
from pipecc.costs import CostTable
from pipecc.errors import PartitionError
from pipecc.ir import (Captured, InputKind, ParamBinding, Partition, Stage, StageCost, StageInput, StageOutput,
                       TensorSpec, shared_parameters)
from pipecc.passes.annotate_costs import stage_backward_ms
from pipecc.passes.graph_facts import ValueKind, compute_nodes, grad_nodes, output_node, value_kind
from pipecc.passes.partition import InFlight, PartitionProblem, StagePlace, partition_problem, place_stages


def split_stages(captured: Captured, partition: Partition, costs: CostTable, *,
                 stage_to_rank: Sequence[int], in_flight: InFlight, cluster: Cluster | None = None) -> tuple[Stage, ...]:
    """One Stage per partition stage, each with its own GraphModule sharing the model's parameters.
    Stage costs are timed on the stage's rank of `cluster` (its speed and links; default identical ranks)."""
    gm = captured.graph_module
    needs_grad = grad_nodes(gm)
    crossing = _crossing_values(gm, partition)
    problem = partition_problem(captured, costs)
    bounds = _bounds(problem.node_names, partition)
    places = place_stages(costs.device, partition.num_stages, stage_to_rank, cluster)
    stages = []
    for s in range(partition.num_stages):
        received = crossing[s]
        sent = crossing[s + 1] if s + 1 < partition.num_stages else [output_node(gm).args[0]]
        module, inputs = _stage_module(captured, partition, s, received, sent, needs_grad)
        outputs = tuple(StageOutput(n.name, _spec(n, needs_grad)) for n in sent)
        start, stop = bounds[s], bounds[s + 1]
        cost = _stage_cost(problem, costs, start, stop, in_flight(s), sum(o.spec.num_bytes for o in outputs),
                           sum(p.numel() for p in module.parameters()), places[s])
        stages.append(Stage(
            index=s,
            rank=stage_to_rank[s],
            node_names=problem.node_names[start:stop],
            inputs=inputs,
            outputs=outputs,
            params=_bindings(module, captured),
            cost=cost,
            graph=module,
        ))
    return _with_tied_sync(tuple(stages), costs, cluster)


TIED_SYNC_TRANSFERS = 2  # send this rank's gradient and take each peer's, then sum: about two one-way transfers


def _with_tied_sync(stages: tuple[Stage, ...], costs: CostTable, cluster: Cluster | None) -> tuple[Stage, ...]:
    """`stages` with each rank's first stage charged the rank's tied-weight gradient exchange
    (StageCost.sync_ms): per parameter it shares, per peer holding it, TIED_SYNC_TRANSFERS one-way
    transfers of the gradient over the link to that peer (the runtime posts them all, then waits).
    An underestimate on a loaded 2-core machine: GPT's 1 MB tied embedding takes the last rank to
    finish 1.1-2.3 ms (median 1.5) over 2 local gloo ranks, against 0.6 ms on the calibrated link;
    calibration measures the real exchange and keeps it out of the step overhead."""
    shared = shared_parameters(stages)
    if not shared:
        return stages
    num_ranks = max(s.rank for s in stages) + 1
    cluster = Cluster.uniform(num_ranks) if cluster is None else cluster
    default = LinkSpec.of(costs.device)
    sync = [0.0] * num_ranks
    for name, ranks in shared.items():
        for rank in ranks:
            sync[rank] += sum(
                TIED_SYNC_TRANSFERS * cluster.link(rank, peer, default).transfer_ms(costs.param_bytes[name], 1)
                for peer in ranks if peer != rank)
    first = {}
    for stage in stages:
        first.setdefault(stage.rank, stage.index)
    return tuple(dataclasses.replace(s, cost=dataclasses.replace(s.cost, sync_ms=sync[s.rank]))
                 if first[s.rank] == s.index and sync[s.rank] else s for s in stages)


def _bounds(node_names: Sequence[str], partition: Partition) -> list[int]:
    bounds = [0]
    for i in range(1, len(node_names)):
        if partition.stage_of[node_names[i]] != partition.stage_of[node_names[i - 1]]:
            bounds.append(i)
    bounds.append(len(node_names))
    return bounds


def _crossing_values(gm: fx.GraphModule, partition: Partition) -> list[list[fx.Node]]:
    """Per stage s, the tensors made by stages < s and read by stage >= s (or by the output)."""
    last = partition.num_stages
    crossing: list[list[fx.Node]] = [[] for _ in range(last)]
    for node in compute_nodes(gm):
        if value_kind(node) is not ValueKind.TENSOR:
            continue
        made = partition.stage_of[node.name]
        read = max((partition.stage_of.get(u.name, last - 1) for u in node.users), default=made)
        for s in range(made + 1, read + 1):
            crossing[s].append(node)
    return crossing


def _spec(node: fx.Node, needs_grad: set[str]) -> TensorSpec:
    return TensorSpec.of(node.meta["val"], requires_grad=node.name in needs_grad)


def _stage_module(captured: Captured, partition: Partition, stage: int, received: list[fx.Node],
                  sent: list[fx.Node], needs_grad: set[str]) -> tuple[fx.GraphModule, tuple[StageInput, ...]]:
    gm = captured.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    inputs: list[StageInput] = []
    for node in received:
        env[node] = graph.placeholder(node.name)
        inputs.append(StageInput(node.name, InputKind.ACTIVATION, _spec(node, needs_grad)))
    members = [n for n in compute_nodes(gm) if partition.stage_of[n.name] == stage]
    member_set = set(members)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    used = {a for n in members for a in n.all_input_nodes} | set(sent)
    for position, node in enumerate(placeholders):
        if node not in used:
            continue
        env[node] = graph.placeholder(node.name)
        kind = InputKind.TARGET if node.name == captured.target_name else InputKind.MODEL_INPUT
        inputs.append(StageInput(node.name, kind, _spec(node, needs_grad), position if kind is InputKind.MODEL_INPUT else -1))

    def lookup(node: fx.Node) -> object:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.get_attr(str(node.target))
            return env[node]
        if node not in member_set and value_kind(node) is ValueKind.CONSTANT:
            return node.meta["val"]  # static at micro-batch shape: inline it
        raise PartitionError(f"stage {stage} reads {node.name}, which no earlier stage sends.")

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(n) for n in sent))
    with _use_lazy_graph_module(True):  # its Python code is made when first run or read (codegen makes its own)
        module = _make_graph_module(gm, graph, class_name=f"Stage{stage}")
    return module, tuple(inputs)


def _bindings(module: fx.GraphModule, captured: Captured) -> tuple[ParamBinding, ...]:
    bindings = [ParamBinding(name, captured.canonical_names.get(name, name), True)
                for name, _ in module.named_parameters(remove_duplicate=False)]
    bindings += [ParamBinding(name, captured.canonical_names.get(name, name), False)
                 for name, _ in module.named_buffers(remove_duplicate=False)]
    return tuple(bindings)


def _stage_cost(problem: PartitionProblem, costs: CostTable, start: int, stop: int, in_flight: int,
                bytes_to_next: int, num_params: int, place: StagePlace) -> StageCost:
    """Times at the rank's speed; traffic over its links (none to a neighbour on the same rank)."""
    names = problem.node_names[start:stop]
    speed = place.speed
    traffic = problem.traffic
    backward_input_ms, backward_weight_ms = stage_backward_ms(sum(costs[n].backward_input_ms for n in names),
                                                              sum(costs[n].backward_weight_ms for n in names),
                                                              first_stage=start == 0)
    return StageCost(
        num_nodes=len(names),
        num_params=num_params,
        flops=sum(costs[n].flops_forward for n in names),
        param_bytes=problem.stage_param_bytes(start, stop),
        forward_ms=sum(costs[n].forward_ms for n in names) / speed,
        backward_input_ms=backward_input_ms / speed,
        backward_weight_ms=backward_weight_ms / speed,
        send_forward_ms=traffic.forward_ms(stop, place.link_out) if stop < problem.num_nodes else 0.0,
        send_backward_ms=traffic.backward_ms(start, place.link_in) if start > 0 else 0.0,
        bytes_to_next=bytes_to_next if stop < problem.num_nodes else 0,
        saved_bytes=sum(problem.saved_bytes[start:stop]) + problem.activation_bytes(start),
        memory_bytes=problem.stage_memory_bytes(start, stop, in_flight),
        comm_ms=problem.link_ms(start, place.link_in) + problem.link_ms(stop, place.link_out),
        action_overhead_ms=problem.device.action_overhead_ms / speed,
        message_overhead_ms=problem.device.message_overhead_ms,
        receive_overhead_ms=problem.device.receive_overhead_ms,
        message_ms_per_mb=problem.device.message_ms_per_mb,
        step_overhead_ms=problem.device.step_overhead_ms,
        # per op that does work (a view does none; calibrate counts its samples' ops the same way)
        autograd_forward_ms=problem.device.autograd_op_overhead_ms / speed
        * sum(1 for n in names if costs[n].flops_forward or costs[n].bytes_forward),
    )


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise PartitionError unless each stage receives exactly what its predecessor sends."""
    for prev, stage in zip(stages, stages[1:]):
        sent = [(o.name, o.spec) for o in prev.outputs]
        received = [(i.name, i.spec) for i in stage.activation_inputs]
        if sent != received:
            raise PartitionError(f"stage {stage.index} expects {received} but stage {prev.index} sends {sent}.")
    if stages and stages[0].activation_inputs:
        raise PartitionError("stage 0 expects activations, but nothing comes before it.")
    loss = stages[-1].outputs
    if len(loss) != 1 or loss[0].spec.shape not in ((), (1,)):
        raise PartitionError(f"the last stage must return the scalar loss, not {loss}.")
