"""Run one rank's action list: forwards and backwards of its stages, with sends and receives
through a Transport. The same interpreter serves the local and the distributed runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn

from pipecc.errors import PipelineRuntimeError
from pipecc.ir import Action, ActionKind, InputKind, Schedule, Stage, TensorSpec
from pipecc.passes.rng import dropout_microbatch
from pipecc.passes.simulate import TimedAction, matching_send


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


class RankExecutor:
    """Executes actions for the stages of one rank (or of every rank, in the local runtime)."""

    def __init__(self, stages: Sequence[Stage], schedule: Schedule, transport: Transport,
                 device: torch.device, recorder: TimelineRecorder | None = None, check_finite: bool = False) -> None:
        self.stages = stages  # all stages of the plan; only the local ones' graphs are run
        self.schedule = schedule
        self.transport = transport
        self.device = device
        self.last_stage = schedule.num_stages - 1
        self.recorder = recorder  # None: no timestamps taken at all
        self.check_finite = check_finite  # nan/inf in a stage output or input gradient: PipelineRuntimeError
        self.current: Action | None = None  # the action running (or the last one run): failure reports name it

    def run(self, actions: Sequence[Action], inputs: Sequence[torch.Tensor],
            target: torch.Tensor) -> torch.Tensor | None:
        """Run `actions` for one step; returns the mean micro-batch loss if this rank has the last stage."""
        m = self.schedule.num_microbatches
        micro_inputs = [t.chunk(m) if isinstance(t, torch.Tensor) else [t] * m for t in inputs]
        micro_target = target.chunk(m)
        runners = {s: stage_runner(self.stages[s], s == self.last_stage, m) for s in {a.stage for a in actions}}
        stage_specs = self.stages
        activations: dict[tuple[int, int], list[torch.Tensor]] = {}  # (producing stage, mb) -> outputs
        grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}  # (stage, mb) -> grads of its activation inputs
        losses: dict[int, torch.Tensor] = {}
        for action in actions:
            s, mb = action.stage, action.microbatch
            self.current = action
            started = time.perf_counter() if self.recorder is not None else 0.0
            try:
                match action.kind:
                    case ActionKind.F:
                        received = activations.pop((s - 1, mb), [])
                        args = _stage_args(self.stages[s], received, [chunks[mb] for chunks in micro_inputs],
                                           micro_target[mb])
                        with dropout_microbatch(mb):  # seeded dropout draws this micro-batch's masks
                            outputs = runners[s].forward(mb, args)
                        if self.check_finite:
                            check_finite(self.stages[s], [o.name for o in self.stages[s].outputs], outputs, mb,
                                         "output", "forward")
                        if s == self.last_stage:
                            losses[mb] = outputs[0].detach()
                        else:
                            activations[(s, mb)] = [o.detach() for o in outputs]
                    case ActionKind.BW | ActionKind.B:
                        backward = runners[s].backward if action.kind is ActionKind.BW else runners[s].backward_input
                        grads[(s, mb)] = backward(mb, grads.pop((s + 1, mb), None))
                        if self.check_finite:
                            check_finite(self.stages[s], [i.name for i in self.stages[s].activation_inputs],
                                         grads[(s, mb)], mb, "input gradient", "backward")
                    case ActionKind.W:
                        runners[s].backward_weight(mb)
                    case ActionKind.SEND_F:
                        self.transport.send(Message("F", s, mb), activations.pop((s, mb)),
                                            self.schedule.stage_to_rank[s + 1])
                    case ActionKind.RECV_F:
                        activations[(s - 1, mb)] = self.transport.recv(*incoming(action, self.stages, self.schedule))
                    case ActionKind.SEND_B:
                        sent = [g if g is not None else zero_grad_like(i.spec, self.device)
                                for g, i in zip(grads.pop((s, mb)), stage_specs[s].activation_inputs)
                                if i.spec.requires_grad]
                        self.transport.send(Message("B", s, mb), sent, self.schedule.stage_to_rank[s - 1])
                    case ActionKind.RECV_B:
                        received_grads = self.transport.recv(*incoming(action, self.stages, self.schedule))
                        grads[(s + 1, mb)] = _expand_grads(received_grads, stage_specs[s + 1])
            except PipelineRuntimeError as err:
                err.add_note(f"while running action {action} (stage {s}, micro-batch {mb})")
                raise
            if self.recorder is not None:
                self.recorder.record(action, started, time.perf_counter())
        self.transport.flush()
        if not losses:
            return None
        return torch.stack([losses[mb] for mb in range(m)]).mean()


def incoming(action: Action, stages: Sequence[Stage], schedule: Schedule
             ) -> tuple[Message, list[TensorSpec], int]:
    """What a RECV_F or RECV_B action receives: the message, its tensors' specs, and the sending rank.
    Activations come from the previous stage (all of this stage's activation inputs); gradients
    from the next stage (of its activation inputs that require grad)."""
    kind, sender, mb = matching_send(action)  # ValueError for an action that receives nothing
    if kind is ActionKind.SEND_F:
        return Message("F", sender, mb), [i.spec for i in stages[action.stage].activation_inputs], \
            schedule.stage_to_rank[sender]
    return (Message("B", sender, mb), [i.spec for i in stages[sender].activation_inputs if i.spec.requires_grad],
            schedule.stage_to_rank[sender])


class TimelineRecorder:
    """When each action ran: time.perf_counter() around it (two clock reads, nothing else), in ms
    since `origin` (the runtimes take it right after a barrier at the step's start). A send is timed
    while it is posted (isend), a receive until its tensors have arrived."""

    def __init__(self, stage_to_rank: Sequence[int]) -> None:
        self.stage_to_rank = tuple(stage_to_rank)
        self.origin = time.perf_counter()
        self._raw: list[tuple[Action, float, float]] = []

    def record(self, action: Action, start: float, end: float) -> None:
        self._raw.append((action, start, end))

    def events(self) -> tuple[TimedAction, ...]:
        """The recorded actions in the order they ran, each with its rank."""
        ms = lambda t: (t - self.origin) * 1e3  # noqa: E731
        return tuple(TimedAction(self.stage_to_rank[a.stage], a, ms(start), ms(end)) for a, start, end in self._raw)


def _stage_args(stage: Stage, received: list[torch.Tensor], inputs: list[torch.Tensor],
                target: torch.Tensor) -> list[torch.Tensor]:
    """The stage module's positional arguments: received activations, model inputs, the target."""
    received_iter = iter(received)
    args = []
    for spec in stage.inputs:
        if spec.kind is InputKind.ACTIVATION:
            args.append(next(received_iter))
        elif spec.kind is InputKind.TARGET:
            args.append(target)
        else:
            args.append(inputs[spec.input_index])
    return args


OutputGrads = list[torch.Tensor | None] | None  # gradients of a stage's outputs (None: last stage)


class StageRunner(Protocol):
    """Runs one stage's F, B, W and BW for any micro-batch, keeping what lies between them."""

    def forward(self, mb: int, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]: ...
    def backward(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]: ...
    def backward_input(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]: ...
    def backward_weight(self, mb: int) -> None: ...


def stage_runner(stage: Stage, is_last: bool, num_microbatches: int) -> StageRunner:
    """The graph-level F/B/W runner when the plan split this stage's backward, else autograd's."""
    if stage.backward_split is not None:
        return GraphStageRunner(stage, is_last, num_microbatches)
    return AutogradStageRunner(stage, is_last, num_microbatches)


def _with_output_grads(stage: Stage, outputs: tuple[torch.Tensor, ...], output_grads: OutputGrads, is_last: bool,
                       num_microbatches: int) -> list[torch.Tensor | None]:
    """The gradient of each stage output (None where none flows back)."""
    if is_last:
        # loss = mean of micro-batch losses, so each micro-batch's loss carries weight 1/m
        return [torch.full_like(outputs[0], 1.0 / num_microbatches)]
    assert output_grads is not None, f"stage {stage.index} has no output gradients"
    return list(output_grads)


class AutogradStageRunner:
    """F builds an autograd graph; BW is one autograd backward; B differentiates w.r.t. the received
    activations keeping the graph, W w.r.t. the parameters (re-walking the graph from the outputs)."""

    def __init__(self, stage: Stage, is_last: bool, num_microbatches: int) -> None:
        self.stage, self.is_last, self.num_microbatches = stage, is_last, num_microbatches
        self.leaves: dict[int, list[torch.Tensor | None]] = {}  # received activations, per micro-batch
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        # between B and W: the (output, output gradient) pairs that W differentiates again
        self.weight_pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forward(self, mb: int, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        leaves: list[torch.Tensor | None] = []
        for i, spec in enumerate(self.stage.inputs):
            if spec.kind is InputKind.ACTIVATION:
                args[i] = args[i].detach().requires_grad_(spec.spec.requires_grad)
                leaves.append(args[i] if spec.spec.requires_grad else None)
        with torch.enable_grad():
            outputs = self.stage.graph(*args)
        self.leaves[mb] = leaves
        self.outputs[mb] = outputs
        return outputs

    def _pairs(self, mb: int, output_grads: OutputGrads) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(output, its gradient) for every output that carries a gradient back into this stage."""
        outputs = self.outputs.pop(mb)
        grads = _with_output_grads(self.stage, outputs, output_grads, self.is_last, self.num_microbatches)
        return [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]

    def backward(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]:
        """BW: the fused backward; parameter gradients accumulate in .grad, returns the input gradients."""
        pairs = self._pairs(mb, output_grads)
        leaves = self.leaves.pop(mb)
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return [leaf.grad if leaf is not None else None for leaf in leaves]

    def backward_input(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]:
        """B: the gradients of the stage's activation inputs only; the autograd graph stays for W."""
        pairs = self._pairs(mb, output_grads)
        leaves = self.leaves.pop(mb)
        self.weight_pending[mb] = pairs
        wanted = [leaf for leaf in leaves if leaf is not None]
        if not pairs or not wanted:
            return [None] * len(leaves)
        computed = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                            retain_graph=True, allow_unused=True))
        return [next(computed) if leaf is not None else None for leaf in leaves]

    def backward_weight(self, mb: int) -> None:
        """W: the parameter gradients of micro-batch `mb`, accumulated into .grad; frees its graph."""
        pairs = self.weight_pending.pop(mb)
        params = [p for p in self.stage.graph.parameters() if p.requires_grad]
        if not pairs or not params:
            return
        computed = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
        for param, grad in zip(params, computed):
            if grad is not None:
                accumulate_grad(param, grad)


class GraphStageRunner:
    """F, B and W are the stage's split graphs (passes/split_backward.py), run without autograd:
    F keeps what B and W read, B keeps only what W reads, W accumulates into .grad."""

    def __init__(self, stage: Stage, is_last: bool, num_microbatches: int) -> None:
        assert stage.backward_split is not None
        self.stage, self.split = stage, stage.backward_split
        self.is_last, self.num_microbatches = is_last, num_microbatches
        tensors = dict(stage.graph.named_parameters(remove_duplicate=False))
        tensors.update(stage.graph.named_buffers(remove_duplicate=False))
        self.weights = [tensors[name] for name in self.split.weight_names]
        self.grad_params = [tensors[name] for name in self.split.grad_param_names]
        activation_index = {i: k for k, i in enumerate(
            i for i, inp in enumerate(stage.inputs) if inp.kind is InputKind.ACTIVATION)}
        self.grad_slots = [activation_index[i] for i in self.split.grad_input_positions]
        self.num_activations = len(activation_index)
        self.device = param_device([stage.graph])
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.saved: dict[int, tuple[torch.Tensor, ...]] = {}  # F -> B
        self.held: dict[int, tuple[torch.Tensor, ...]] = {}  # B -> W

    def forward(self, mb: int, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            results = self.split.forward(*self.weights, *args)
        num_outputs = len(self.stage.outputs)
        outputs = tuple(results[:num_outputs])
        # B needs the loss (for its gradient's dtype and shape), not the activations F sent on
        self.outputs[mb] = outputs if self.is_last else ()
        self.saved[mb] = tuple(results[num_outputs:])
        return outputs

    def backward(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]:
        """BW: B then W at once (bitwise the fused backward)."""
        grads = self.backward_input(mb, output_grads)
        self.backward_weight(mb)
        return grads

    def backward_input(self, mb: int, output_grads: OutputGrads) -> list[torch.Tensor | None]:
        outputs = self.outputs.pop(mb)
        grads = _with_output_grads(self.stage, outputs, output_grads, self.is_last, self.num_microbatches)
        tangents = [grads[i] if grads[i] is not None else zero_grad_like(self.stage.outputs[i].spec, self.device)
                    for i in self.split.tangent_positions]
        with torch.no_grad():
            results = self.split.backward_input(*self.weights, *self.saved.pop(mb), *tangents)
        num_grads = len(self.split.grad_input_positions)
        self.held[mb] = tuple(results[num_grads:])
        input_grads: list[torch.Tensor | None] = [None] * self.num_activations
        for slot, grad in zip(self.grad_slots, results[:num_grads]):
            input_grads[slot] = grad
        return input_grads

    def backward_weight(self, mb: int) -> None:
        with torch.no_grad():
            param_grads = self.split.backward_weight(*self.weights, *self.held.pop(mb))
        for param, grad in zip(self.grad_params, param_grads):
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


def check_finite(stage: Stage, names: Sequence[str], tensors: Sequence[torch.Tensor | None], mb: int, what: str,
                 phase: str) -> None:
    """PipelineRuntimeError naming the stage, the value and the micro-batch if a tensor holds nan or inf."""
    for name, tensor in zip(names, tensors):
        if tensor is None or not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise PipelineRuntimeError(
                f"stage {stage.index} (rank {stage.rank}) computed {bad} non-finite value{'s' if bad > 1 else ''} "
                f"(nan/inf) in {what} {name} in the {phase} of micro-batch {mb}.\n"
                f"Check micro-batch {mb}'s inputs and the ops of stage {stage.index} (log or division by zero, "
                "overflow); check_finite=False turns this check off."
            )


def zero_grad_like(spec: TensorSpec, device: torch.device) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.torch_dtype, device=device)


def param_device(modules: Sequence[nn.Module]) -> torch.device:
    for module in modules:
        for tensor in module.parameters():
            return tensor.device
    return torch.device("cpu")
