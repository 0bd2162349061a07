"""Run one rank's action list: forwards and backwards of its stages, with sends and receives
through a Transport. The same interpreter serves the local and the distributed runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn

from pipecc.errors import PipelineRuntimeError
from pipecc.ir import Action, ActionKind, InputKind, Schedule, Stage, TensorSpec


@dataclass(frozen=True)
class Message:
    """One boundary's tensors for one micro-batch: forward activations of `stage`'s outputs, or
    the gradients of `stage`'s activation inputs."""

    direction: str  # "F" or "B"
    stage: int  # the sending stage
    microbatch: int


class Transport(Protocol):
    def send(self, message: Message, tensors: list[torch.Tensor], dst_rank: int) -> None: ...
    def recv(self, message: Message, specs: Sequence[TensorSpec], src_rank: int) -> list[torch.Tensor]: ...
    def flush(self) -> None: ...


@dataclass
class StageState:
    """What a stage keeps between the forward and the backward of each micro-batch."""

    leaves: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # received activations
    outputs: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # between B and W: the (output, output gradient) pairs that W differentiates again
    weight_pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class RankExecutor:
    """Executes actions for the stages of one rank (or of every rank, in the local runtime)."""

    def __init__(self, stages: Sequence[Stage], schedule: Schedule, transport: Transport,
                 device: torch.device) -> None:
        self.stages = stages  # all stages of the plan; only the local ones' graphs are run
        self.schedule = schedule
        self.transport = transport
        self.device = device
        self.last_stage = schedule.num_stages - 1

    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor],
            target: torch.Tensor) -> torch.Tensor | None:
        """Run `actions` for one step; returns the mean micro-batch loss if this rank has the last stage."""
        m = self.schedule.num_microbatches
        micro_inputs = [t.chunk(m) if isinstance(t, torch.Tensor) else [t] * m for t in inputs]
        micro_target = target.chunk(m)
        state = {a.stage: StageState() for a in actions}
        stage_specs = self.stages
        activations: dict[tuple[int, int], list[torch.Tensor]] = {}  # (producing stage, mb) -> outputs
        grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}  # (stage, mb) -> grads of its activation inputs
        losses: dict[int, torch.Tensor] = {}
        for action in actions:
            s, mb = action.stage, action.microbatch
            try:
                match action.kind:
                    case ActionKind.F:
                        received = activations.pop((s - 1, mb), [])
                        outputs = self._forward(self.stages[s], state[s], mb, received,
                                                [chunks[mb] for chunks in micro_inputs], micro_target[mb])
                        if s == self.last_stage:
                            losses[mb] = outputs[0].detach()
                        else:
                            activations[(s, mb)] = [o.detach() for o in outputs]
                    case ActionKind.BW:
                        output_grads = grads.pop((s + 1, mb), None)
                        grads[(s, mb)] = self._backward(self.stages[s], state[s], mb, output_grads, m)
                    case ActionKind.B:
                        output_grads = grads.pop((s + 1, mb), None)
                        grads[(s, mb)] = self._backward_input(self.stages[s], state[s], mb, output_grads, m)
                    case ActionKind.W:
                        self._backward_weight(self.stages[s], state[s], mb)
                    case ActionKind.SEND_F:
                        self.transport.send(Message("F", s, mb), activations.pop((s, mb)),
                                            self.schedule.stage_to_rank[s + 1])
                    case ActionKind.RECV_F:
                        specs = [i.spec for i in stage_specs[s].activation_inputs]
                        activations[(s - 1, mb)] = self.transport.recv(Message("F", s - 1, mb), specs,
                                                                       self.schedule.stage_to_rank[s - 1])
                    case ActionKind.SEND_B:
                        sent = [g if g is not None else zero_grad_like(i.spec, self.device)
                                for g, i in zip(grads.pop((s, mb)), stage_specs[s].activation_inputs)
                                if i.spec.requires_grad]
                        self.transport.send(Message("B", s, mb), sent, self.schedule.stage_to_rank[s - 1])
                    case ActionKind.RECV_B:
                        specs = [i.spec for i in stage_specs[s + 1].activation_inputs if i.spec.requires_grad]
                        received_grads = self.transport.recv(Message("B", s + 1, mb), specs,
                                                             self.schedule.stage_to_rank[s + 1])
                        grads[(s + 1, mb)] = _expand_grads(received_grads, stage_specs[s + 1])
            except PipelineRuntimeError as err:
                err.add_note(f"while running action {action} (stage {s}, micro-batch {mb})")
                raise
        self.transport.flush()
        if not losses:
            return None
        return torch.stack([losses[mb] for mb in range(m)]).mean()

    def _forward(self, stage: Stage, state: StageState, mb: int, received: list[torch.Tensor],
                 inputs: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args: list[torch.Tensor] = []
        leaves: list[torch.Tensor | None] = []
        received_iter = iter(received)
        for spec in stage.inputs:
            if spec.kind is InputKind.ACTIVATION:
                value = next(received_iter).detach().requires_grad_(spec.spec.requires_grad)
                leaves.append(value if spec.spec.requires_grad else None)
            elif spec.kind is InputKind.TARGET:
                value = target
            else:
                value = inputs[spec.input_index]
            args.append(value)
        with torch.enable_grad():
            outputs = stage.graph(*args)
        state.leaves[mb] = leaves
        state.outputs[mb] = outputs
        return outputs

    def _output_grad_pairs(self, stage: Stage, state: StageState, mb: int,
                           output_grads: list[torch.Tensor | None] | None,
                           num_microbatches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(output, its gradient) for every output that carries a gradient back into this stage."""
        outputs = state.outputs.pop(mb)
        if stage.index == self.last_stage:
            # loss = mean of micro-batch losses, so each micro-batch's loss carries weight 1/m
            return [(outputs[0], torch.full_like(outputs[0], 1.0 / num_microbatches))]
        assert output_grads is not None, f"stage {stage.index} has no output gradients for micro-batch {mb}"
        return [(o, g) for o, g in zip(outputs, output_grads) if g is not None and o.requires_grad]

    def _backward(self, stage: Stage, state: StageState, mb: int,
                  output_grads: list[torch.Tensor | None] | None, num_microbatches: int) -> list[torch.Tensor | None]:
        """BW: the fused backward; parameter gradients accumulate in .grad, returns the input gradients."""
        pairs = self._output_grad_pairs(stage, state, mb, output_grads, num_microbatches)
        leaves = state.leaves.pop(mb)
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return [leaf.grad if leaf is not None else None for leaf in leaves]

    def _backward_input(self, stage: Stage, state: StageState, mb: int,
                        output_grads: list[torch.Tensor | None] | None,
                        num_microbatches: int) -> list[torch.Tensor | None]:
        """B: the gradients of the stage's activation inputs only. The autograd graph stays alive
        for W, which differentiates the same outputs with respect to the parameters."""
        pairs = self._output_grad_pairs(stage, state, mb, output_grads, num_microbatches)
        leaves = state.leaves.pop(mb)
        state.weight_pending[mb] = pairs
        wanted = [leaf for leaf in leaves if leaf is not None]
        if not pairs or not wanted:
            return [None] * len(leaves)
        computed = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                            retain_graph=True, allow_unused=True))
        return [next(computed) if leaf is not None else None for leaf in leaves]

    def _backward_weight(self, stage: Stage, state: StageState, mb: int) -> None:
        """W: the parameter gradients of micro-batch `mb`, accumulated into .grad; frees its graph."""
        pairs = state.weight_pending.pop(mb)
        params = [p for p in stage.graph.parameters() if p.requires_grad]
        if not pairs or not params:
            return
        computed = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
        for param, grad in zip(params, computed):
            if grad is not None:
                accumulate_grad(param, grad)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad, as autograd's AccumulateGrad does (the first gradient is copied, never aliased)."""
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad += grad


def _expand_grads(received: list[torch.Tensor], stage: Stage) -> list[torch.Tensor | None]:
    """Received gradients (only for inputs that need them) put back at their input positions."""
    it = iter(received)
    return [next(it) if i.spec.requires_grad else None for i in stage.activation_inputs]


def zero_grad_like(spec: TensorSpec, device: torch.device) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.torch_dtype, device=device)


def param_device(modules: Sequence[nn.Module]) -> torch.device:
    for module in modules:
        for tensor in module.parameters():
            return tensor.device
    return torch.device("cpu")
